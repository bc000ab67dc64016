"""Deformable transformer decoder of the region proposer with iterative box refinement
(Deformable DETR §4.1 / DINO), objectness and mask-embedding heads.

Each layer is post-norm::

    q = LayerNorm(q + SelfAttn(q + pos, q + pos, q, attn_mask))      # attn_mask: DN groups
    q = LayerNorm(q + MSDeformAttn(q + pos, ref_box * valid_ratios, memory))
    q = LayerNorm(q + FFN(q))

where ``pos = MLP(sine(ref_box))``. After layer i, ``h_i = LayerNorm_out(q)`` gives

* the box ``sigmoid(box_head_i(h_i) + inverse_sigmoid(ref_box))``: a per-layer box MLP refines the
  reference; the refined box, detached, is the next layer's reference;
* the objectness logit ``objectness_head(h_i)`` and the mask embedding ``mask_embed(h_i)`` (one head
  each, shared by all layers and by the encoder outputs, as MaskDINO).

Denoising (training): :meth:`DeformableDecoder.denoising_queries` turns the output of
:func:`~up2.modeling.image_encoder.proposer.denoising.prepare_contrastive_denoising` into queries whose content is a
2-entry label embedding (background / foreground) and whose references are the noised boxes; they are
prepended to the matching queries and the DN attention mask is used in self-attention.
"""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from torch import nn

from up2.layers import MSDeformAttn
from up2.modeling.image_encoder.position_encoding import sine_encoding_of_coordinates
from up2.modeling.image_encoder.proposer.query_selection import MLP, inverse_sigmoid

__all__ = ["DeformableDecoder", "DeformableDecoderLayer"]


class DeformableDecoderLayer(nn.Module):
    """Self-attention (optionally masked), deformable cross-attention, FFN; post-norm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int, msda_impl: str = "auto"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask=None, attn_mask=None):
        """
        Args:
            tgt, query_pos: (B, Q, C); reference_points: (B, Q, L, 4) boxes for each level.
            memory: (B, S, C); memory_padding_mask: (B, S) bool; attn_mask: (Q, Q) bool, True = blocked.

        Returns:
            (B, Q, C).
        """
        q = k = tgt + query_pos
        attn, _ = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(attn))
        cross = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                                memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(cross))
        ffn = self.linear2(self.dropout3(torch.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """Deformable decoder with per-layer box refinement and shared objectness / mask-embedding heads.

    Args:
        hidden_dim: d.
        num_layers: ``DEC_LAYERS``.
        num_levels, nheads, n_points, dim_feedforward, dropout: layer settings (Table 7).
        mask_dim: channels of the mask embedding (``MASK_DIM``).
        dn_enabled: build the 2-entry DN label embedding.
        msda_impl: deformable attention implementation.
    """

    @configurable
    def __init__(self, *, hidden_dim: int, num_layers: int, num_levels: int, nheads: int, n_points: int,
                 dim_feedforward: int, dropout: float, mask_dim: int, dn_enabled: bool = True,
                 msda_impl: str = "auto"):
        super().__init__()
        if hidden_dim % 8:
            raise ValueError(f"DeformableDecoder: hidden_dim must be divisible by 8, got {hidden_dim}")
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(hidden_dim, dim_feedforward, dropout, num_levels, nheads, n_points, msda_impl)
            for _ in range(num_layers))
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        self.norm = nn.LayerNorm(hidden_dim)
        self.box_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        self.objectness_head = nn.Linear(hidden_dim, 1)
        nn.init.constant_(self.objectness_head.bias, -4.6)  # prior probability 0.01
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.label_embed = nn.Embedding(2, hidden_dim) if dn_enabled else None

    @classmethod
    def from_config(cls, cfg):
        prop = cfg.MODEL.UP2.PROPOSER
        return {"hidden_dim": prop.HIDDEN_DIM, "num_layers": prop.DEC_LAYERS, "num_levels": prop.NUM_FEATURE_LEVELS,
                "nheads": prop.NHEADS, "n_points": prop.DEC_N_POINTS, "dim_feedforward": prop.DIM_FEEDFORWARD,
                "dropout": prop.DROPOUT, "mask_dim": prop.MASK_DIM, "dn_enabled": prop.DN_ENABLED,
                "msda_impl": cfg.MODEL.UP2.MSDA_IMPL}

    def denoising_queries(self, dn: Dict[str, torch.Tensor]):
        """Content (B, T_dn, d) = label embedding of ``dn["labels"]`` and reference boxes (B, T_dn, 4)."""
        if self.label_embed is None:
            raise RuntimeError("DeformableDecoder: denoising queries requested but dn_enabled=False")
        return self.label_embed(dn["labels"]), dn["boxes"]

    def forward(self, content: torch.Tensor, reference_boxes: torch.Tensor, memory: torch.Tensor,
                memory_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                valid_ratios: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> Dict[str, List[torch.Tensor]]:
        """
        Args:
            content: (B, Q, d) content queries (DN queries first when denoising).
            reference_boxes: (B, Q, 4) initial cxcywh boxes in [0, 1] (detached).
            memory: (B, S, d) encoder output; memory_padding_mask: (B, S) bool.
            spatial_shapes: (L, 2); level_start_index: (L,); valid_ratios: (B, L, 2).
            attn_mask: optional (Q, Q) bool self-attention mask, True = blocked.

        Returns:
            dict of per-layer lists (length ``num_layers``): ``hidden`` (B, Q, d) normalised hidden
            states, ``boxes`` (B, Q, 4) refined cxcywh boxes, ``logits`` (B, Q, 1) objectness logits and
            ``mask_embeds`` (B, Q, mask_dim).
        """
        ratios = torch.cat([valid_ratios, valid_ratios], dim=-1)[:, None].to(memory.dtype)  # (B, 1, L, 4)
        reference = reference_boxes.detach()
        out = {"hidden": [], "boxes": [], "logits": [], "mask_embeds": []}
        tgt = content
        for layer, box_head in zip(self.layers, self.box_heads):
            query_pos = self.ref_point_head(
                sine_encoding_of_coordinates(reference, self.hidden_dim // 2).to(memory.dtype))
            tgt = layer(tgt, query_pos, reference[:, :, None] * ratios, memory, spatial_shapes, level_start_index,
                        memory_padding_mask, attn_mask)
            hidden = self.norm(tgt)
            boxes = (box_head(hidden) + inverse_sigmoid(reference)).sigmoid()
            out["hidden"].append(hidden)
            out["boxes"].append(boxes)
            out["logits"].append(self.objectness_head(hidden))
            out["mask_embeds"].append(self.mask_embed(hidden))
            reference = boxes.detach()
        return out
