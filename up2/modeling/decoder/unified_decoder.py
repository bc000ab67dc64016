"""The unified decoder g (paper §4.2–4.3, Appendix B): a BERT-base-like Transformer shared by every task
and modality, with an attribute-routed conditional MoE in every FFN.

A decoder input is a list of :class:`Segment` s (image tokens, words, placeholders ...). The decoder
prepends its learned ``<SPE>`` token, adds a modality (token-type) embedding to every token and a text
position embedding where a segment gives position ids, and routes every token's FFN by its segment's
attributes (task, modality, side, causal; ``up2.modeling.moe.gate``). ``<SPE>`` belongs to the first
segment. Layers are pre-norm (LayerNorm -> attention / FFN -> drop-path -> residual): the similarity head
applies the final LayerNorm. Pre-norm trains stably from scratch, which the small CPU configs need;
layer-scale is off by default (Appendix B) and available as a switch.

Attention masks are boolean, True = "query may attend to key" (``attention_masks.py``); the default is
bidirectional over non-padding tokens. Incremental decoding passes a :class:`~up2.modeling.tasks.KVCache`.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from timm.layers import DropPath
from torch import nn

from up2.modeling.build import DECODER_REGISTRY
from up2.modeling.decoder.attention_masks import bidirectional_mask
from up2.modeling.moe import MODALITY_IMAGE, MODALITY_TEXT, build_ffn, build_routing_plan, make_attributes

__all__ = ["Segment", "DecoderOutput", "UnifiedDecoder", "DecoderLayer"]


class Segment(NamedTuple):
    """One part of a decoder input sequence.

    Attributes:
        tokens: (B, n, d) features already at the decoder width.
        modality: ``MODALITY_IMAGE`` or ``MODALITY_TEXT`` (selects the token-type embedding).
        side: ``SIDE_INPUT`` or ``SIDE_TARGET`` (routing attribute).
        causal: whether the segment attends causally (routing attribute).
        padding_mask: (B, n) bool, True at padding; None = no padding.
        position_ids: (n,) or (B, n) long text positions (-1: none); None = no position embedding.
    """

    tokens: torch.Tensor
    modality: int
    side: int
    causal: bool = False
    padding_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None


class DecoderOutput(NamedTuple):
    """hidden (B, L, d) outputs (``<SPE>`` at index 0 when prepended); padding_mask (B, L) bool;
    aux_loss: 0-dim MoE load-balancing loss summed over layers."""

    hidden: torch.Tensor
    padding_mask: torch.Tensor
    aux_loss: torch.Tensor


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional key/value cache (``scaled_dot_product_attention``)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MODEL.UP2.DECODER: HIDDEN_DIM {dim} is not divisible by NUM_HEADS {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask, cache=None, layer_index: int = 0, cache_keep: Optional[int] = None):
        """x (B, L, d); attn_mask (B, L, K) bool (K = cached + L keys). Returns (B, L, d)."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer_index, k, v, cache_keep)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class DecoderLayer(nn.Module):
    """Pre-norm Transformer layer: x + DropPath(Attn(LN(x))), then x + DropPath(FFN(LN(x))) with the FFN
    a conditional MoE (or dense) from :func:`~up2.modeling.moe.build_ffn`."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, drop_path: float, dropout: float,
                 layer_scale: bool, layer_scale_init: float = 1e-4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.ffn = ffn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x, attn_mask, plan, cache=None, layer_index: int = 0, cache_keep: Optional[int] = None):
        y = self.dropout(self.attn(self.norm1(x), attn_mask, cache, layer_index, cache_keep))
        x = x + self.drop_path(y if self.gamma1 is None else self.gamma1 * y)
        y, aux = self.ffn(self.norm2(x), plan=plan)
        x = x + self.drop_path(y if self.gamma2 is None else self.gamma2 * y)
        return x, aux


@DECODER_REGISTRY.register()
class UnifiedDecoder(nn.Module):
    """The shared decoder g.

    Args:
        dim: width d (768 in the paper).
        num_heads: attention heads (12).
        ffns: one FFN module per layer (conditional MoE or dense), d -> d.
        drop_path: uniform stochastic-depth rate of every layer (0.1).
        dropout: dropout of attention probabilities and residual branches.
        layer_scale: per-channel learnable residual scales (off in UPv2).
        max_positions: size of the text position embedding.
    """

    @configurable
    def __init__(self, *, dim: int, num_heads: int, ffns: Sequence[nn.Module], drop_path: float, dropout: float,
                 layer_scale: bool, max_positions: int):
        super().__init__()
        self.dim = dim
        self.spe_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.type_embedding = nn.Embedding(2, dim)  # MODALITY_IMAGE, MODALITY_TEXT
        self.position_embedding = nn.Embedding(max_positions, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, ffn, drop_path, dropout, layer_scale) for ffn in ffns)
        # MoE load-balancing losses of the forward passes since the last pop_aux_losses() (training only,
        # when the FFNs compute one): the meta-architecture adds them to the task's losses.
        self.collect_aux = any(getattr(ffn, "balance_loss_weight", 0) > 0 for ffn in ffns)
        self._aux_losses: List[torch.Tensor] = []
        nn.init.normal_(self.spe_token, std=0.02)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    @classmethod
    def from_config(cls, cfg):
        dec = cfg.MODEL.UP2.DECODER
        if dec.NUM_LAYERS < 1:
            raise ValueError(f"MODEL.UP2.DECODER.NUM_LAYERS must be >= 1, got {dec.NUM_LAYERS}")
        if not 0.0 <= dec.DROP_PATH < 1.0:
            raise ValueError(f"MODEL.UP2.DECODER.DROP_PATH must be in [0, 1), got {dec.DROP_PATH}")
        return {"dim": dec.HIDDEN_DIM, "num_heads": dec.NUM_HEADS,
                "ffns": [build_ffn(cfg, dec.HIDDEN_DIM, dec.FFN_DIM) for _ in range(dec.NUM_LAYERS)],
                "drop_path": dec.DROP_PATH, "dropout": dec.DROPOUT, "layer_scale": dec.LAYER_SCALE,
                "max_positions": dec.MAX_POSITIONS}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed_segment(self, segment: Segment) -> torch.Tensor:
        """(B, n, d) tokens + modality embedding + text position embedding (where position id >= 0)."""
        tokens = segment.tokens + self.type_embedding.weight[segment.modality]
        if segment.position_ids is not None:
            ids = segment.position_ids.to(tokens.device)
            # checked on CPU position ids only (no host sync on accelerators)
            if ids.device.type == "cpu" and ids.numel() and int(ids.max()) >= self.position_embedding.num_embeddings:
                raise ValueError(f"UnifiedDecoder: text position {int(ids.max())} >= MODEL.UP2.DECODER.MAX_POSITIONS "
                                 f"({self.position_embedding.num_embeddings})")
            valid = (ids >= 0).unsqueeze(-1)
            tokens = tokens + self.position_embedding(ids.clamp(min=0)) * valid.to(tokens.dtype)
        return tokens

    def assemble(self, task: str, segments: Sequence[Segment], prepend_spe: bool = True):
        """Concatenates embedded segments (after ``<SPE>``) and computes the routing plan.

        Returns:
            tuple: tokens (B, L, d), padding_mask (B, L) bool, RoutingPlan.
        """
        if not segments:
            raise ValueError("UnifiedDecoder: a sequence needs at least one segment")
        batch, device = segments[0].tokens.shape[0], segments[0].tokens.device
        parts, paddings, seg_ids = [], [], []
        if prepend_spe:
            parts.append(self.spe_token.expand(batch, -1, -1).to(segments[0].tokens.dtype))
            paddings.append(torch.zeros(batch, 1, dtype=torch.bool, device=device))
            seg_ids.append(torch.zeros(1, dtype=torch.long, device=device))  # <SPE> joins segment 0
        attributes = []
        for index, segment in enumerate(segments):
            if segment.tokens.dim() != 3 or segment.tokens.shape[0] != batch or segment.tokens.shape[2] != self.dim:
                raise ValueError(f"UnifiedDecoder: segment {index} must be (B={batch}, n, d={self.dim}), got "
                                 f"{tuple(segment.tokens.shape)}")
            length = segment.tokens.shape[1]
            parts.append(self.embed_segment(segment))
            pad = segment.padding_mask
            paddings.append(torch.zeros(batch, length, dtype=torch.bool, device=device) if pad is None else pad)
            seg_ids.append(torch.full((length,), index, dtype=torch.long, device=device))
            attributes.append(make_attributes(task, segment.modality, segment.side, segment.causal))
        tokens = torch.cat(parts, dim=1)
        segment_ids = torch.cat(seg_ids).expand(batch, -1)
        segment_attributes = torch.tensor(attributes, device=device).expand(batch, -1, -1)
        return tokens, torch.cat(paddings, dim=1), build_routing_plan(segment_attributes, segment_ids)

    def forward(self, task: str, segments: Sequence[Segment], attn_mask: Optional[torch.Tensor] = None,
                prepend_spe: bool = True, cache=None, cache_keep: Optional[int] = None) -> DecoderOutput:
        """
        Args:
            task: task type (routing attribute), a registered one (``up2.task_specs``).
            segments: the parts of the sequence, in order.
            attn_mask: (L, K) or (B, L, K) bool, True = may attend, over ``[cache (if any), sequence]``
                keys; default: bidirectional over non-padding tokens.
            prepend_spe: put the learned ``<SPE>`` token first.
            cache: a ``KVCache`` to read and extend (incremental decoding); ``cache_keep``: how many of the
                new positions (the first ones) join the cache (default all).

        Returns:
            DecoderOutput.
        """
        tokens, padding_mask, plan = self.assemble(task, segments, prepend_spe)
        if attn_mask is None:
            if cache is not None and cache.length() > 0:
                raise ValueError("UnifiedDecoder: incremental decoding needs an explicit attn_mask")
            attn_mask = bidirectional_mask(padding_mask)
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        attn_mask = attn_mask.to(tokens.device).expand(tokens.shape[0], -1, -1)
        aux = tokens.new_zeros(())
        for index, layer in enumerate(self.layers):
            tokens, layer_aux = layer(tokens, attn_mask, plan, cache, index, cache_keep)
            aux = aux + layer_aux
        if self.collect_aux and self.training:
            self._aux_losses.append(aux)
        return DecoderOutput(tokens, padding_mask, aux)

    def pop_aux_losses(self) -> Optional[torch.Tensor]:
        """Sum of the load-balancing losses collected since the last call (None without MoE balancing)."""
        if not self.collect_aux or not self._aux_losses:
            self._aux_losses = []
            return None
        total = torch.stack(self._aux_losses).sum()
        self._aux_losses = []
        return total


def text_segment(features: torch.Tensor, attention_mask: torch.Tensor, side: int, causal: bool = False) -> Segment:
    """Segment of text-encoder features (B, T, d) with attention mask (B, T) (1 = token), positions 0..T-1."""
    positions = torch.arange(features.shape[1], device=features.device)
    return Segment(features, MODALITY_TEXT, side, causal, attention_mask == 0, positions)


def image_segment(tokens: torch.Tensor, padding_mask: Optional[torch.Tensor], side: int) -> Segment:
    """Segment of image tokens (B, n, d), no text positions."""
    return Segment(tokens, MODALITY_IMAGE, side, False, padding_mask, None)


__all__ += ["text_segment", "image_segment"]
