"""Expert FFNs of the conditional MoE, stored as stacked weights, and their weight-space mixture.

Every expert e is a two-layer FFN ``x -> W2_e GELU(W1_e x + b1_e) + b2_e``. Routing is per segment
(see ``gate.py``), so all tokens of one routing share the same experts and gates; the layer runs, per
distinct routing u with gates g_u (E,) (zero outside its top-k experts), ONE dense FFN whose weights are
the gate-weighted mixture ``W1_u = sum_e g_ue W1_e`` (likewise b1, W2, b2). See ``layer.py`` for why.

Two implementations of that computation:

* :func:`mixed_expert_ffn` (:class:`MixedExpertFFN`), used by the layer: forward and backward written by
  hand to keep the weight-space work (building the U mixtures, folding their gradients back into the E
  experts and the gates) to about one pass over each large tensor;
* :meth:`ExpertFFNs.merged` + :func:`grouped_ffn`: plain autograd ops, the reference the tests compare to.
"""
import math
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["ExpertFFNs", "MixedExpertFFN", "grouped_ffn", "mixed_expert_ffn"]


class ExpertFFNs(nn.Module):
    """E stacked FFN experts d -> ffn -> d.

    Attributes:
        w1: (E, ffn, d); b1: (E, ffn); w2: (E, d, ffn); b2: (E, d) (``nn.Linear`` layout, out x in).

    Args:
        d_model: d.
        ffn_dim: hidden width of every expert.
        num_experts: E.
    """

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))
        self.b1 = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self):
        """Each expert initialised like an independent ``nn.Linear`` pair (uniform +-1/sqrt(fan_in))."""
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def merged(self, gate_weights: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Weight-space mixtures of the experts.

        Args:
            gate_weights: (U, E), one row of gates per routing (zeros for unselected experts).

        Returns:
            w1 (U, ffn, d), b1 (U, ffn), w2 (U, d, ffn), b2 (U, d).
        """
        g = gate_weights.to(self.w1.dtype)
        num = g.shape[0]
        # one (U, E) x (E, ffn*d) matmul per tensor: the E stacked experts are read once for all U routings
        return ((g @ self.w1.flatten(1)).view(num, *self.w1.shape[1:]), g @ self.b1,
                (g @ self.w2.flatten(1)).view(num, *self.w2.shape[1:]), g @ self.b2)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Reference: output of expert ``index`` alone on x (..., d)."""
        return F.linear(F.gelu(F.linear(x, self.w1[index], self.b1[index])), self.w2[index], self.b2[index])


def _ffn(x, w1, b1, w2, b2, dropout: float, training: bool):
    hidden = F.dropout(F.gelu(F.linear(x, w1, b1)), dropout, training)
    return F.dropout(F.linear(hidden, w2, b2), dropout, training)


def grouped_ffn(x_sorted: torch.Tensor, counts: List[int], w1, b1, w2, b2, dropout: float = 0.0,
                training: bool = False, max_padding: float = 0.25) -> torch.Tensor:
    """Runs FFN u on the u-th contiguous group of tokens, for every routing u.

    Uses one padded batched matmul over the U groups when padding them to the longest group wastes at
    most ``max_padding`` of the work (many small groups: one kernel instead of U), else one dense
    matmul per group (a loop over the few distinct routings, never over tokens).

    Args:
        x_sorted: (N, d) tokens sorted by routing.
        counts: U python ints summing to N, tokens of each routing.
        w1 (U, ffn, d), b1 (U, ffn), w2 (U, d, ffn), b2 (U, d): per-routing FFN weights.

    Returns:
        (N, d), outputs in the order of ``x_sorted``.
    """
    num_groups, num_tokens = len(counts), x_sorted.shape[0]
    if num_groups == 1:
        return _ffn(x_sorted, w1[0], b1[0], w2[0], b2[0], dropout, training)
    longest = max(counts)
    if num_groups * longest <= (1.0 + max_padding) * num_tokens:
        group = torch.repeat_interleave(torch.arange(num_groups, device=x_sorted.device),
                                        torch.tensor(counts, device=x_sorted.device), output_size=num_tokens)
        starts = torch.tensor([0] + counts[:-1], device=x_sorted.device).cumsum(0)
        slot = torch.arange(num_tokens, device=x_sorted.device) - starts[group]
        padded = x_sorted.new_zeros(num_groups, longest, x_sorted.shape[1]).index_put((group, slot), x_sorted)
        hidden = F.dropout(F.gelu(torch.baddbmm(b1.unsqueeze(1), padded, w1.transpose(1, 2))), dropout, training)
        out = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))[group, slot]
        return F.dropout(out, dropout, training)
    # unbind (not w1[u]): its backward stacks the U gradients once instead of U zero-filled (U, ...) tensors
    weights = zip(w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0))
    outputs = [_ffn(chunk, *params, dropout, training) for chunk, params in zip(torch.split(x_sorted, counts), weights)]
    return torch.cat(outputs, dim=0)


# ---------------------------------------------------------------------------------------------------------
# Fused weight-space-mixed FFN (the layer's fast path)
# ---------------------------------------------------------------------------------------------------------

_aten = torch.ops.aten

# Large buffers cost page faults: glibc serves allocations >= its mmap threshold (at most 32 MiB) with fresh
# mmap()s and trims freed heap memory back to the system, so the first write of every 4 KiB page of such a
# buffer traps into the kernel (~18k faults for an (E, ffn, d) gradient at d=768: slower than the writes).
# CPU buffers of at least HUGEPAGE_MIN_BYTES are advised to use transparent huge pages instead (what
# PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation): same contents, ~500x fewer faults.
# Advisory only (Linux; silently skipped elsewhere or when libc cannot be loaded).
HUGEPAGE_MIN_BYTES = 2 << 20
_HUGEPAGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise = None


def _advise_hugepages(start: int, length: int):
    global _madvise
    if _madvise is None:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
    if _madvise and length > 0:
        _madvise(start, length, _MADV_HUGEPAGE)


def _new_buffer(shape, like: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """Uninitialised tensor with like's dtype and device; large CPU ones backed by huge pages (Linux).

    ``aligned``: for internal buffers, start the data on a huge-page boundary (the tensor is a view into
    a slightly larger allocation), so that no 4 KiB pages remain at its ends.
    """
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes < HUGEPAGE_MIN_BYTES or not sys.platform.startswith("linux"):
        return like.new_empty(shape)
    if not aligned:
        out = like.new_empty(shape)
        page = 4096
        start = -(-out.data_ptr() // page) * page
        _advise_hugepages(start, (out.data_ptr() + nbytes - start) // page * page)
        return out
    spare = 2 * _HUGEPAGE // like.element_size()
    block = like.new_empty(numel + spare)
    offset = (-block.data_ptr() % _HUGEPAGE) // like.element_size()
    out = block[offset:offset + numel].view(shape)
    _advise_hugepages(out.data_ptr(), -(-nbytes // _HUGEPAGE) * _HUGEPAGE)
    return out


def _span(indices: Sequence[int]) -> slice:
    """Copy-free selection of ``indices`` (along one axis) for one BLAS call: the slice over exactly these
    indices when they are distinct and equally spaced once sorted (always for one or two, i.e. top-1 /
    top-2), else ``slice(None)`` (every index; the caller's zero weights cancel the others)."""
    indices = sorted(indices)
    steps = {b - a for a, b in zip(indices, indices[1:])}
    if len(steps) > 1 or 0 in steps:
        return slice(None)
    return slice(indices[0], indices[-1] + 1, steps.pop() if steps else 1)


# Stacked expert tensors up to this many elements use (U, E) x (E, ...) products for the weight-space work
# (3 calls per tensor, whatever U and E); larger ones one matrix-vector product per routing / expert over
# the selected rows only (less memory traffic; the call overhead no longer matters).
SMALL_WEIGHT_SPACE = 1 << 20


class MixedExpertFFN(torch.autograd.Function):
    """Per-routing FFN with weight-space-mixed expert parameters, forward and backward by hand.

    Rows ``[s_u, s_u + counts[u])`` of the (sorted) tokens use the FFN with parameters
    ``W_u = sum_j gates[u, j] W_{routes[u][j]}`` (W1, b1, W2, b2). Same values and gradients as building
    the mixtures with autograd and running :func:`grouped_ffn`, with much less memory traffic and fewer
    kernel calls (the weight-space work does not shrink with the number of tokens, so it decides the cost
    relative to a dense FFN):

    * each mixture is one matrix-vector product over a strided view of its k selected experts (no
      (U, E) x (E, ffn*d) product reading unselected experts, no gather), all U written into one buffer
      per layer tensor; the matmuls write straight into slices of the outputs (no padding, no
      concatenation), the biases are broadcast to their rows by one (N, U) x (U, n) product;
    * the backward writes the U mixed-weight gradients dW_u into one buffer (one matmul each), then the
      expert gradients ``dW_e = sum_u g_ue dW_u`` with one matrix-vector product per expert over the
      routings that selected it (unselected experts are zero-filled), and the gate gradients
      ``dL/dg_ue = <dW_u, W_e>`` (+ the bias terms) with one matrix-vector product per routing: every
      large tensor is read about once, and no zero-filled gradient of the mixtures is materialised;
      the bias gradients of all routings are one (U, N) x (N, n) product;
    * small weight spaces (<= ``SMALL_WEIGHT_SPACE`` elements per stacked tensor) use three
      (U, E)-dense products per tensor instead, fewer calls when the data is small;
    * the weight-space work is BLAS calls rather than elementwise kernels: on a CPU shared with other
      processes they keep their speed where elementwise kernels with 2 threads can slow down several
      times;
    * large CPU buffers are backed by transparent huge pages (see ``_new_buffer``);
    * the token permutation is two row gathers, one in each direction (their backward is a gather by the
      inverse permutation, not a scatter).

    Args of :meth:`forward` (use :func:`mixed_expert_ffn`): x (N, d); gates (U, k); w1 (E, ffn, d);
    b1 (E, ffn); w2 (E, d, ffn); b2 (E, d); routes: U lists of k expert indices; counts: U ints summing
    to N; order / inverse: (N,) long permutation sorting the tokens by routing and its inverse, or None
    when the tokens are already grouped; dropout, training as in ``F.dropout``.
    """

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, routes, counts, order, inverse, dropout, training):
        num_routes, num_experts = len(counts), w1.shape[0]
        (num_tokens, dim), hidden_dim = x.shape, w1.shape[1]
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        rows = [slice(bounds[u], bounds[u + 1]) for u in range(num_routes)]
        index = torch.tensor(routes, device=gates.device)
        # (U, E) gates, zero outside the selected experts (repeated experts add up)
        dense_gates = gates.new_zeros(num_routes, num_experts).scatter_add_(1, index, gates).to(w1.dtype)
        small = w1.numel() <= SMALL_WEIGHT_SPACE
        x_sorted = x if order is None else torch.index_select(x, 0, order, out=_new_buffer(x.shape, x, True))
        mixed = []
        for stacked in (w1, w2):
            out = _new_buffer((num_routes, *stacked.shape[1:]), stacked, True)
            flat, out_flat = stacked.view(num_experts, -1), out.view(num_routes, -1)
            if small:
                torch.mm(dense_gates, flat, out=out_flat)
            else:
                for u in range(num_routes):
                    span = _span(routes[u])
                    torch.mv(flat[span].t(), dense_gates[u, span], out=out_flat[u])
            mixed.append(out)
        mw1, mw2 = mixed
        mb1, mb2 = dense_gates @ b1, dense_gates @ b2
        if mw1.dtype != x.dtype:
            mw1, mb1, mw2, mb2 = (t.to(x.dtype) for t in (mw1, mb1, mw2, mb2))
        # (U, N) indicator of the routings' rows: one matmul broadcasts the U biases to their rows (and, in
        # the backward, sums the rows of each routing) instead of one copy / reduction per routing
        member = x.new_zeros(num_routes, num_tokens)
        for u, r in enumerate(rows):
            member[u, r] = 1
        pre = torch.mm(member.t(), mb1, out=_new_buffer((num_tokens, hidden_dim), x, True))
        for u, r in enumerate(rows):
            pre[r].addmm_(x_sorted[r], mw1[u].t())
        act, mask1, mask2 = torch._C._nn.gelu(pre, out=_new_buffer(pre.shape, pre, True)), None, None
        if training and dropout > 0:
            act, mask1 = torch.native_dropout(act, dropout, True)
        y = torch.mm(member.t(), mb2, out=_new_buffer((num_tokens, dim), x, inverse is not None))
        for u, r in enumerate(rows):
            y[r].addmm_(act[r], mw2[u].t())
        if training and dropout > 0:
            y, mask2 = torch.native_dropout(y, dropout, True)
        if inverse is not None:
            y = torch.index_select(y, 0, inverse, out=_new_buffer(y.shape, y))
        ctx.save_for_backward(x_sorted, pre, act, mw1, mw2, w1, b1, w2, b2, dense_gates, index, member, order,
                              inverse, mask1, mask2)
        ctx.routes, ctx.rows, ctx.dropout, ctx.small, ctx.gates_dtype = routes, rows, dropout, small, gates.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        (x_sorted, pre, act, mw1, mw2, w1, b1, w2, b2, dense_gates, index, member, order, inverse, mask1,
         mask2) = ctx.saved_tensors
        routes, rows, small = ctx.routes, ctx.rows, ctx.small
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_experts = any(ctx.needs_input_grad[2:6])
        need_params = need_experts or need_gates
        num_routes, num_experts = dense_gates.shape
        scale = 1.0 / (1.0 - ctx.dropout) if mask1 is not None else 1.0
        dy = grad_y.contiguous() if order is None else torch.index_select(grad_y, 0, order,
                                                                           out=_new_buffer(grad_y.shape, grad_y, True))
        if mask2 is not None:
            dy = _aten.native_dropout_backward(dy, mask2, scale)
        d_gates = dense_gates.new_zeros(num_routes, num_experts) if need_gates else None  # dL/d dense_gates
        users = [[u for u in range(num_routes) if e in routes[u]] for e in range(num_experts)]
        grads = {}

        def fold(d_weights, d_biases, weight, bias):
            """Expert and gate gradients from the U mixed-weight gradients d_weights (U, ...), d_biases (U, n)."""
            if d_weights.dtype != weight.dtype:
                d_weights, d_biases = d_weights.to(weight.dtype), d_biases.to(weight.dtype)
            flat, d_flat = weight.view(num_experts, -1), d_weights.view(num_routes, -1)
            if need_gates:
                d_gates.addmm_(d_biases, bias.t())
                if small:
                    d_gates.addmm_(d_flat, flat.t())
                else:
                    for u in range(num_routes):
                        span = _span(routes[u])
                        d_gates[u, span].addmv_(flat[span], d_flat[u])
            if not need_experts:
                return None, None
            grad = _new_buffer(weight.shape, weight)
            grad_flat = grad.view(num_experts, -1)
            if small:
                torch.mm(dense_gates.t(), d_flat, out=grad_flat)
            else:
                for e in range(num_experts):
                    if users[e]:
                        span = _span(users[e])
                        torch.mv(d_flat[span].t(), dense_gates[span, e], out=grad_flat[e])
                    else:
                        grad_flat[e].zero_()
            return grad, dense_gates.t() @ d_biases

        d_act = _new_buffer(pre.shape, pre, True)
        if need_params:
            d_w = _new_buffer(mw2.shape, mw2, True)
            d_b = member @ dy
        for u, r in enumerate(rows):
            if need_params:
                torch.mm(dy[r].t(), act[r], out=d_w[u])
            torch.mm(dy[r], mw2[u], out=d_act[r])
        if need_params:
            grads[2], grads[3] = fold(d_w, d_b, w2, b2)
            del d_w
        if mask1 is not None:
            d_act = _aten.native_dropout_backward(d_act, mask1, scale)
        d_pre = _aten.gelu_backward.grad_input(d_act, pre, grad_input=d_act)  # in place
        del d_act
        dx = _new_buffer(x_sorted.shape, x_sorted, inverse is not None) if need_x else None
        if need_params:
            d_w = _new_buffer(mw1.shape, mw1, True)
            d_b = member @ d_pre
        for u, r in enumerate(rows):
            if need_params:
                torch.mm(d_pre[r].t(), x_sorted[r], out=d_w[u])
            if need_x:
                torch.mm(d_pre[r], mw1[u], out=dx[r])
        if need_params:
            grads[0], grads[1] = fold(d_w, d_b, w1, b1)
            del d_w
        if need_gates:
            d_gates = d_gates.gather(1, index).to(ctx.gates_dtype)
        if need_x and inverse is not None:
            dx = torch.index_select(dx, 0, inverse, out=_new_buffer(dx.shape, dx))
        expert_grads = [grads.get(i) if ctx.needs_input_grad[2 + i] else None for i in range(4)]
        return (dx, d_gates, *expert_grads, None, None, None, None, None, None)


def mixed_expert_ffn(x: torch.Tensor, gates: torch.Tensor, routes: Sequence[Sequence[int]], counts: Sequence[int],
                     w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     order: Optional[torch.Tensor] = None, inverse: Optional[torch.Tensor] = None,
                     dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Weight-space-mixed FFN of every routing on its tokens (see :class:`MixedExpertFFN`).

    Args:
        x: (N, d) tokens (any order).
        gates: (U, k) gates of the selected experts of each routing.
        routes: U sequences of k expert indices (python ints).
        counts: U python ints summing to N, tokens of each routing.
        w1, b1, w2, b2: stacked expert parameters (E, ffn, d), (E, ffn), (E, d, ffn), (E, d).
        order, inverse: (N,) long, ``x[order]`` groups the tokens by routing (counts[0] tokens of routing
            0 first ...) and ``inverse`` is the inverse permutation; both None when x is already grouped.
        dropout, training: dropout after the activation and after the output projection.

    Returns:
        (N, d) outputs in the order of x.
    """
    if (order is None) != (inverse is None):
        raise ValueError("mixed_expert_ffn: give both order and inverse, or neither")
    if len(routes) != len(counts) or gates.shape[0] != len(counts) or sum(counts) != x.shape[0]:
        raise ValueError(f"mixed_expert_ffn: {len(routes)} routes, gates {tuple(gates.shape)} and counts {list(counts)} "
                         f"do not match {x.shape[0]} tokens")
    routes = [[int(e) for e in experts] for experts in routes]
    return MixedExpertFFN.apply(x, gates, w1, b1, w2, b2, routes, list(counts), order, inverse, float(dropout),
                                bool(training))
