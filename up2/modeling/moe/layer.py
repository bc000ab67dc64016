"""Conditional MoE FFN with attribute-level routing (UPv2 §4.3, Uni-Perceiver-MoE), and the dense FFN.

Semantics (weight-space mixing). A segment with attributes a is routed by the gate to its top-k experts
S(a) with renormalised gates g (softmax over the k kept logits). The layer applies to every token of the
segment the FFN whose parameters are the gate-weighted mixture of the selected experts' parameters::

    W1 = sum_{e in S(a)} g_e W1_e,  b1 = sum g_e b1_e,  W2 = sum g_e W2_e,  b2 = sum g_e b2_e
    y = W2 GELU(W1 x + b1) + b2

This is *not* the output mixture ``sum_e g_e FFN_e(x)`` of token-level MoEs: the two agree only for the
first (linear) layer; the GELU in between makes them different functions. We choose weight-space mixing
(as in parameter-merged / "soft merging of experts" MoEs, and as ``docs/architecture.md`` describes UPv2's
attribute-level MoE: W = g1 W_a + g2 W_b, one dense matmul) because routing is constant over a segment:
the mixed weights are built once per distinct routing (a few per batch) and each token costs ONE dense
FFN instead of k, i.e. near-dense cost. Gradients still reach only the gate and the selected experts.

Tokens are grouped by routing (:class:`RoutingPlan`, shared by every layer of a decoder since attributes
and segments do not change between layers) and the layer runs :func:`~up2.modeling.moe.experts.mixed_expert_ffn`,
a hand-written forward / backward: the U mixtures are written once (k selected experts read per routing),
each group is one dense matmul per FFN layer, and the backward folds the U mixed-weight gradients into
the expert and gate gradients with one pass over each large tensor. The cost above a dense FFN of the
same width is this weight-space work, O((U + E) ffn d) per call whatever the number of tokens, plus the
(E, ffn, d) expert gradients themselves (``benchmarks/moe.py`` measures the ratio).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from up2.layers import is_exporting
from up2.modeling.moe.experts import ExpertFFNs, grouped_ffn, mixed_expert_ffn
from up2.modeling.moe.gate import DEFAULT_NUM_ATTRIBUTE_VALUES, AttributeGate, num_attribute_values

__all__ = ["ConditionalMoEFFN", "FFN", "RoutingPlan", "build_routing_plan", "build_ffn"]


@dataclass
class RoutingPlan:
    """Tokens grouped by their segment's attribute vector; computed once per batch, reused by every layer.

    Attributes:
        attributes: (U, A) long, the distinct attribute vectors that own at least one token, in the
            order of their first token.
        counts: U python ints, tokens of each attribute vector (sum N = B*T).
        order: (N,) long, flat token indices sorted by attribute vector (stable).
        inverse: (N,) long, ``sorted[inverse]`` restores the (B*T) order.
        contiguous: True when ``order`` is the identity (every routing's tokens already form one run, e.g.
            a single routing, or one sequence whose segments each route differently): the layer then
            skips the two permutations.
    """

    attributes: torch.Tensor
    counts: List[int]
    order: torch.Tensor
    inverse: torch.Tensor
    contiguous: bool = False


def build_routing_plan(segment_attributes: torch.Tensor, segment_ids: torch.Tensor) -> RoutingPlan:
    """
    Args:
        segment_attributes: (B, S, A) long, the attributes of each segment.
        segment_ids: (B, T) long in [0, S), the segment of each token (give padding tokens any valid
            segment; their outputs are computed and may be ignored).

    Returns:
        RoutingPlan.
    """
    if segment_attributes.dim() != 3 or segment_ids.dim() != 2 or segment_ids.shape[0] != segment_attributes.shape[0]:
        raise ValueError(f"build_routing_plan: expected segment_attributes (B, S, A) and segment_ids (B, T), got "
                         f"{tuple(segment_attributes.shape)} and {tuple(segment_ids.shape)}")
    num_segments = segment_attributes.shape[1]
    if segment_ids.numel() and (int(segment_ids.min()) < 0 or int(segment_ids.max()) >= num_segments):
        raise ValueError(f"build_routing_plan: segment_ids must lie in [0, S={num_segments}), got values in "
                         f"[{int(segment_ids.min())}, {int(segment_ids.max())}]")
    batch, _, num_attrs = segment_attributes.shape
    distinct, seg_route = torch.unique(segment_attributes.reshape(-1, num_attrs), dim=0, return_inverse=True)
    token_route = seg_route.view(batch, num_segments).gather(1, segment_ids.long()).reshape(-1)
    present, token_route, counts = torch.unique(token_route, return_inverse=True, return_counts=True)
    # number the routings in the order of their first token, so already grouped tokens need no permutation
    positions = torch.arange(token_route.numel(), device=token_route.device)
    first = torch.full_like(counts, token_route.numel()).scatter_reduce(0, token_route, positions, "amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(first.numel(), device=first.device)
    token_route = rank[token_route]
    order = torch.argsort(token_route, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = positions
    contiguous = bool((token_route[1:] >= token_route[:-1]).all()) if token_route.numel() > 1 else True
    routes_by_rank = first.argsort()
    return RoutingPlan(distinct[present[routes_by_rank]], counts[routes_by_rank].tolist(), order, inverse, contiguous)


class ConditionalMoEFFN(nn.Module):
    """Attribute-routed MoE FFN (weight-space mixing of the top-k experts, see the module docstring).

    Args:
        d_model: d.
        ffn_dim: hidden width of every expert.
        num_experts: E.
        top_k: k.
        num_attribute_values: number of values of each attribute (task, modality, side, causal).
        dropout: after the activation and after the output projection.
        balance_loss_weight: weight of the load-balancing loss returned by ``forward`` (0: not computed).
    """

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int = 8, top_k: int = 2,
                 num_attribute_values: Sequence[int] = DEFAULT_NUM_ATTRIBUTE_VALUES, dropout: float = 0.0,
                 balance_loss_weight: float = 0.0):
        super().__init__()
        self.gate = AttributeGate(d_model, num_experts, top_k, num_attribute_values)
        self.experts = ExpertFFNs(d_model, ffn_dim, num_experts)
        self.dropout = dropout
        self.balance_loss_weight = balance_loss_weight

    def route(self, attributes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., A) attributes -> dense gates (..., E) (zero outside the top-k), indices (..., k), logits (..., E)."""
        indices, gates, logits = self.gate(attributes)
        dense = torch.zeros_like(logits).scatter(-1, indices, gates)
        return dense, indices, logits

    def balance_loss(self, logits: torch.Tensor, indices: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Switch-style loss E * sum_e f_e P_e over tokens (1 when balanced), f_e = share of the k
        assignments that go to expert e, P_e = mean full-softmax gate probability of e."""
        weights = torch.tensor(counts, dtype=logits.dtype, device=logits.device)
        weights = weights / weights.sum()
        num_experts, top_k = logits.shape[-1], indices.shape[-1]
        probs = (weights[:, None] * logits.softmax(-1)).sum(0)
        assigned = torch.zeros_like(logits).scatter(-1, indices, 1.0 / top_k)
        fraction = (weights[:, None] * assigned).sum(0)
        return num_experts * (fraction * probs).sum()

    def _traceable_ffn(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                       plan: RoutingPlan) -> torch.Tensor:
        """The values of :func:`mixed_expert_ffn` from out-of-place ops (mixed weights, then one FFN per
        routing), for graph export: the fused path writes into slices of its outputs in place, which a
        traced graph does not record. x (N, d) -> (N, d)."""
        dense_gates = gates.new_zeros(gates.shape[0], self.experts.num_experts).scatter_add(1, indices, gates)
        w1, b1, w2, b2 = self.experts.merged(dense_gates)
        x_sorted = x if plan.contiguous else x.index_select(0, plan.order)
        y = grouped_ffn(x_sorted, plan.counts, w1, b1, w2, b2, self.dropout, self.training)
        return y if plan.contiguous else y.index_select(0, plan.inverse)

    def forward(self, x: torch.Tensor, segment_attributes: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, plan: Optional[RoutingPlan] = None):
        """
        Args:
            x: (B, T, d) tokens.
            segment_attributes: (B, S, A) long; segment_ids: (B, T) long in [0, S). Not needed if ``plan``
                (from :func:`build_routing_plan` on the same two tensors) is given.

        Returns:
            tuple: y (B, T, d), and the weighted load-balancing loss (0-dim tensor; a constant 0 when
            ``balance_loss_weight`` is 0).
        """
        if plan is None:
            plan = build_routing_plan(segment_attributes, segment_ids)
        batch, length, dim = x.shape
        if sum(plan.counts) != batch * length:
            raise ValueError(f"ConditionalMoEFFN: routing plan covers {sum(plan.counts)} tokens, x has "
                             f"{batch}x{length}")
        indices, gates, logits = self.gate(plan.attributes)
        e = self.experts
        order, inverse = (None, None) if plan.contiguous else (plan.order, plan.inverse)
        args = (indices.tolist(), plan.counts, e.w1, e.b1, e.w2, e.b2, order, inverse, self.dropout, self.training)
        device_type = x.device.type
        if is_exporting():
            y = self._traceable_ffn(x.reshape(-1, dim), indices, gates, plan)
        elif torch.is_autocast_enabled(device_type):  # like F.linear under autocast: computed in the autocast dtype
            with torch.autocast(device_type, enabled=False):
                y = mixed_expert_ffn(x.reshape(-1, dim).to(torch.get_autocast_dtype(device_type)), gates, *args)
        else:
            y = mixed_expert_ffn(x.reshape(-1, dim), gates, *args)
        y = y.view(batch, length, dim)
        if self.balance_loss_weight > 0:
            aux = self.balance_loss_weight * self.balance_loss(logits, indices, plan.counts)
        else:
            aux = x.new_zeros(())
        return y, aux


class FFN(nn.Module):
    """Dense FFN d -> ffn -> d (GELU) with the interface of :class:`ConditionalMoEFFN` (MoE off).

    The routing arguments are accepted and ignored; the auxiliary loss is a constant 0.
    """

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, segment_attributes=None, segment_ids=None, plan=None):
        """x (B, T, d) -> (y (B, T, d), 0-dim zero tensor)."""
        hidden = F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training)
        return F.dropout(self.fc2(hidden), self.dropout, self.training), x.new_zeros(())


def build_ffn(cfg, d_model: int, ffn_dim: int) -> nn.Module:
    """:class:`ConditionalMoEFFN` if ``MODEL.UP2.MOE.ENABLED`` else :class:`FFN`; dropout is
    ``MODEL.UP2.DECODER.DROPOUT``; the task attribute takes one value per registered task type."""
    moe, dropout = cfg.MODEL.UP2.MOE, cfg.MODEL.UP2.DECODER.DROPOUT
    if not moe.ENABLED:
        return FFN(d_model, ffn_dim, dropout)
    if moe.BALANCE_LOSS_WEIGHT < 0:
        raise ValueError(f"MODEL.UP2.MOE.BALANCE_LOSS_WEIGHT must be >= 0, got {moe.BALANCE_LOSS_WEIGHT}")
    return ConditionalMoEFFN(d_model, ffn_dim, num_experts=moe.NUM_EXPERTS, top_k=moe.TOP_K,
                             num_attribute_values=num_attribute_values(), dropout=dropout,
                             balance_loss_weight=moe.BALANCE_LOSS_WEIGHT)
