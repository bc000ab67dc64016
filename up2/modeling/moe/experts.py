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

# The (E, ffn, d) expert gradients are larger than glibc's mmap threshold (at most 32 MiB), so each is a
# fresh mmap() whose 4 KiB pages all fault on first write (~18k faults at d=768, E=8: slower than the writes
# themselves). CPU buffers of at least HUGEPAGE_MIN_BYTES are advised to use transparent huge pages (what
# PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation): same contents, ~500x fewer faults. Smaller
# buffers are left alone: the allocator recycles them without faults. Advisory only (Linux; skipped
# elsewhere or when libc cannot be loaded).
HUGEPAGE_MIN_BYTES = 32 << 20
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


def _new_buffer(shape, like: torch.Tensor) -> torch.Tensor:
    """Uninitialised tensor with like's dtype and device; large CPU ones backed by huge pages (Linux)."""
    out = like.new_empty(shape)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= HUGEPAGE_MIN_BYTES and sys.platform.startswith("linux"):
        page = 4096
        start = -(-out.data_ptr() // page) * page  # whole pages inside the buffer only
        _advise_hugepages(start, (out.data_ptr() + nbytes - start) // page * page)
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
      (U, E) x (E, ffn*d) product reading unselected experts, no gather); the matmuls write straight
      into slices of the outputs (no padding, no concatenation) and the biases are broadcast to their
      rows by one (N, U) x (U, n) product;
    * the backward computes each routing's mixed-weight gradient dW_u (one matmul into one reused
      buffer) and folds it at once into the expert gradients, ``dW_e (+)= g_ue dW_u``, and the gate
      gradients, ``dL/dg_ue = <dW_u, W_e>``, one BLAS call each, while dW_u is fresh: no zero-filled
      (U, ...) gradient of the mixtures, no stacking; unselected experts get zero-filled gradients; the
      bias gradients of all routings are one (U, N) x (N, n) product;
    * small weight spaces (<= ``SMALL_WEIGHT_SPACE`` elements per stacked tensor) use (U, E)-dense
      products instead: fewer calls, when the call overhead outweighs the extra reads;
    * the weight-space work is BLAS calls rather than elementwise kernels: on a CPU shared with other
      processes they keep their speed where elementwise kernels with 2 threads can slow down several
      times;
    * buffers are allocated per routing (recycled by the allocator), the (E, ffn, d) expert gradients
      with huge pages (see ``_new_buffer``);
    * the token permutation is one row gather in each direction (their backward is a gather by the
      inverse permutation, not a scatter), skipped when the plan is already grouped.

    Args of :meth:`forward` (use :func:`mixed_expert_ffn`): x (N, d); gates (U, k); w1 (E, ffn, d);
    b1 (E, ffn); w2 (E, d, ffn); b2 (E, d); routes: U lists of k expert indices; counts: U ints summing
    to N; order / inverse: (N,) long permutation sorting the tokens by routing and its inverse, or None
    when the tokens are already grouped; dropout, training as in ``F.dropout``.
    """

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, routes, counts, order, inverse, dropout, training):
        num_routes, num_experts, num_tokens = len(counts), w1.shape[0], x.shape[0]
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        rows = [slice(bounds[u], bounds[u + 1]) for u in range(num_routes)]
        index = torch.tensor(routes, device=gates.device)
        # (U, E) gates, zero outside the selected experts (repeated experts add up)
        dense_gates = gates.new_zeros(num_routes, num_experts).scatter_add_(1, index, gates).to(w1.dtype)
        small = w1.numel() <= SMALL_WEIGHT_SPACE
        x_sorted = x if order is None else x.index_select(0, order)
        mixed = []  # [W1_u for u] + [W2_u for u]
        for stacked in (w1, w2):
            flat = stacked.view(num_experts, -1)
            if small:
                mixed.extend((dense_gates @ flat).view(num_routes, *stacked.shape[1:]).unbind(0))
            else:  # one allocation per routing (<= 32 MiB ones are recycled by the allocator: no page faults)
                for u in range(num_routes):
                    span = _span(routes[u])
                    mixed.append(torch.mv(flat[span].t(), dense_gates[u, span]).view(stacked.shape[1:]))
        mb1, mb2 = dense_gates @ b1, dense_gates @ b2
        if w1.dtype != x.dtype:
            mixed, mb1, mb2 = [t.to(x.dtype) for t in mixed], mb1.to(x.dtype), mb2.to(x.dtype)
        mw1, mw2 = mixed[:num_routes], mixed[num_routes:]
        # (U, N) indicator of the routings' rows: one matmul broadcasts the U biases to their rows (and, in
        # the backward, sums the rows of each routing) instead of one copy / reduction per routing
        member = x.new_zeros(num_routes, num_tokens)
        for u, r in enumerate(rows):
            member[u, r] = 1
        pre = member.t() @ mb1
        for u, r in enumerate(rows):
            pre[r].addmm_(x_sorted[r], mw1[u].t())
        act, mask1, mask2 = F.gelu(pre), None, None
        if training and dropout > 0:
            act, mask1 = torch.native_dropout(act, dropout, True)
        y = member.t() @ mb2
        for u, r in enumerate(rows):
            y[r].addmm_(act[r], mw2[u].t())
        if training and dropout > 0:
            y, mask2 = torch.native_dropout(y, dropout, True)
        if inverse is not None:
            y = y.index_select(0, inverse)
        ctx.save_for_backward(x_sorted, pre, act, w1, b1, w2, b2, dense_gates, index, member, order, inverse, mask1,
                              mask2, *mixed)
        ctx.routes, ctx.rows, ctx.dropout, ctx.small, ctx.gates_dtype = routes, rows, dropout, small, gates.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        (x_sorted, pre, act, w1, b1, w2, b2, dense_gates, index, member, order, inverse, mask1, mask2,
         *mixed) = ctx.saved_tensors
        routes, rows, small = ctx.routes, ctx.rows, ctx.small
        num_routes, num_experts = dense_gates.shape
        mw1, mw2 = mixed[:num_routes], mixed[num_routes:]
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_experts = any(ctx.needs_input_grad[2:6])
        need_params = need_experts or need_gates
        scale = 1.0 / (1.0 - ctx.dropout) if mask1 is not None else 1.0
        dy = grad_y.contiguous() if order is None else grad_y.index_select(0, order)
        if mask2 is not None:
            dy = _aten.native_dropout_backward(dy, mask2, scale)
        d_gates = dense_gates.new_zeros(num_routes, num_experts) if need_gates else None  # dL/d dense_gates
        grads = [None] * 4

        def weight_grads(layer, d_out, inputs):
            """Gradients of the U mixed weights of one FFN layer (d_out: (N, out), inputs: (N, in)), folded
            into the expert and gate gradients; returns the expert gradient of that layer's weight."""
            weight = (w1, w2)[layer]
            flat = weight.view(num_experts, -1)
            shape = (d_out.shape[1], inputs.shape[1])
            if small:  # all U at once, then (E, U) x (U, ...) and (U, ...) x (..., E) products
                d_w = d_out.new_empty(num_routes, *shape)
                for u, r in enumerate(rows):
                    torch.mm(d_out[r].t(), inputs[r], out=d_w[u])
                d_flat = d_w.view(num_routes, -1).to(weight.dtype)
                if need_gates:
                    d_gates.addmm_(d_flat, flat.t())
                return (dense_gates.t() @ d_flat).view(weight.shape) if need_experts else None
            # one routing at a time through one buffer: dW_u is read right after it is written
            grad = _new_buffer(weight.shape, weight) if need_experts else None
            grad_flat = grad.view(num_experts, -1) if need_experts else None
            touched = set()
            d_w = d_out.new_empty(shape)
            for u, r in enumerate(rows):
                torch.mm(d_out[r].t(), inputs[r], out=d_w)
                d_flat = d_w.view(-1).to(weight.dtype)
                if need_gates:
                    span = _span(routes[u])
                    d_gates[u, span].addmv_(flat[span], d_flat)
                if need_experts:
                    column = d_flat.view(1, -1).t()  # (ffn*d, 1): dW_e (+)= g_ue dW_u as one BLAS call
                    for e in sorted(set(routes[u])):
                        if e in touched:
                            grad_flat[e].addmv_(column, dense_gates[u, e:e + 1])
                        else:
                            torch.mv(column, dense_gates[u, e:e + 1], out=grad_flat[e])
                            touched.add(e)
            if need_experts:
                for e in range(num_experts):
                    if e not in touched:
                        grad_flat[e].zero_()
            return grad

        def bias_grads(layer, d_out):
            bias = (b1, b2)[layer]
            d_b = (member @ d_out).to(bias.dtype)  # (U, n): row sums of each routing
            if need_gates:
                d_gates.addmm_(d_b, bias.t())
            return dense_gates.t() @ d_b if need_experts else None

        d_act = torch.empty_like(pre)
        for u, r in enumerate(rows):
            torch.mm(dy[r], mw2[u], out=d_act[r])
        if need_params:
            grads[2], grads[3] = weight_grads(1, dy, act), bias_grads(1, dy)
        if mask1 is not None:
            d_act = _aten.native_dropout_backward(d_act, mask1, scale)
        d_pre = _aten.gelu_backward.grad_input(d_act, pre, grad_input=d_act)  # in place
        del d_act
        dx = None
        if need_x:
            dx = torch.empty_like(x_sorted)
            for u, r in enumerate(rows):
                torch.mm(d_pre[r], mw1[u], out=dx[r])
            if inverse is not None:
                dx = dx.index_select(0, inverse)
        if need_params:
            grads[0], grads[1] = weight_grads(0, d_pre, x_sorted), bias_grads(0, d_pre)
        if need_gates:
            d_gates = d_gates.gather(1, index).to(ctx.gates_dtype)
        expert_grads = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grads)]
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
        raise ValueError(f"mixed_expert_ffn: {len(routes)} routes, gates {tuple(gates.shape)} and counts "
                         f"{list(counts)} do not match {x.shape[0]} tokens")
    if not counts:  # no tokens
        return x.new_zeros(x.shape)
    routes = [[int(e) for e in experts] for experts in routes]
    return MixedExpertFFN.apply(x, gates, w1, b1, w2, b2, routes, list(counts), order, inverse, float(dropout),
                                bool(training))
