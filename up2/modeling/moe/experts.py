"""Expert FFNs of the conditional MoE, stored as stacked weights, and their weight-space mixture.

Every expert e is a two-layer FFN ``x -> W2_e GELU(W1_e x + b1_e) + b2_e``. Routing is per segment
(see ``gate.py``), so all tokens of one routing share the same experts and gates; the layer runs, per
distinct routing u with gates g_u (E,) (zero outside its top-k experts), ONE dense FFN whose weights are
the gate-weighted mixture ``W1_u = sum_e g_ue W1_e`` (likewise b1, W2, b2). See ``layer.py`` for why.
"""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExpertFFNs", "grouped_ffn"]


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
