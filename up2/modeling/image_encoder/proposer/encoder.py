"""Deformable transformer encoder of the region proposer (paper Appendix A; Deformable DETR §4.1).

The encoder runs on the projected levels F'1..F'4 (strides 8, 16, 32, 64). Each layer is
post-norm, as in Deformable DETR::

    x = LayerNorm(x + Dropout(MSDeformAttn(x + pos, ref, x)))
    x = LayerNorm(x + Dropout(FFN(x)))

with ``pos`` = sine position encoding of each pixel (normalised by the valid, unpadded extent of its
image) + a learned embedding of its level, and ``ref`` = the pixel centre in the valid region, given
to every level in that level's normalised coordinates (valid ratios).
"""
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from up2.layers import MSDeformAttn
from up2.modeling.image_encoder.position_encoding import sine_encoding_of_coordinates

__all__ = ["DeformableEncoder", "DeformableEncoderLayer", "masked_sine_position_encoding", "valid_ratios_of",
           "flatten_levels"]


def masked_sine_position_encoding(mask: torch.Tensor, channels: int) -> torch.Tensor:
    """Sine encoding of pixel centres normalised by the valid (unpadded) extent of each image.

    Args:
        mask: (B, H, W) bool, True at padded pixels (padding at the bottom / right).
        channels: C, divisible by 4; C/2 features for y then C/2 for x.

    Returns:
        (B, C, H, W).
    """
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    height = y[:, -1:, :].clamp(min=1)
    width = x[:, :, -1:].clamp(min=1)
    coords = torch.stack([(y - 0.5) / height, (x - 0.5) / width], dim=-1)  # (B, H, W, 2) as (y, x)
    return sine_encoding_of_coordinates(coords, channels // 2).permute(0, 3, 1, 2)


def valid_ratios_of(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) fraction (w, h) of the (B, H, W) map that is not padding."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / width, valid_h / height], dim=-1)


def flatten_levels(srcs: List[torch.Tensor], masks: List[torch.Tensor]):
    """Flattens levels for deformable attention.

    Args:
        srcs: L maps (B, C, H_l, W_l).
        masks: L padding masks (B, H_l, W_l), True at padding.

    Returns:
        ``(flat (B, S, C), mask_flat (B, S), spatial_shapes (L, 2) long, level_start_index (L,) long,
        valid_ratios (B, L, 2))``.
    """
    shapes = [src.shape[-2:] for src in srcs]
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=srcs[0].device)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], dim=1)
    mask_flat = torch.cat([mask.flatten(1) for mask in masks], dim=1)
    valid_ratios = torch.stack([valid_ratios_of(mask) for mask in masks], dim=1)
    return flat, mask_flat, spatial_shapes, level_start_index, valid_ratios


def encoder_reference_points(spatial_shapes: List[Tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid extent, seen from every level.

    Args:
        spatial_shapes: L pairs (H_l, W_l).
        valid_ratios: (B, L, 2) (w, h).

    Returns:
        (B, S, L, 2) normalised (x, y).
    """
    device = valid_ratios.device
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(width, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        ys = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
        xs = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack([xs, ys], dim=-1))
    points = torch.cat(points, dim=1)  # (B, S, 2)
    return points[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """One post-norm encoder layer: deformable self-attention over all levels + FFN."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int, msda_impl: str = "auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """
        Args:
            src, pos: (B, S, C); reference_points: (B, S, L, 2); padding_mask: (B, S) bool.

        Returns:
            (B, S, C).
        """
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(torch.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """Deformable transformer encoder over L feature levels.

    Args:
        hidden_dim: C of every level.
        num_layers: encoder depth (``ENC_LAYERS``).
        num_levels: L (``NUM_FEATURE_LEVELS``).
        nheads, n_points, dim_feedforward, dropout: layer settings (Table 7).
        msda_impl: deformable attention implementation (``MODEL.UP2.MSDA_IMPL``).
    """

    @configurable
    def __init__(self, *, hidden_dim: int, num_layers: int, num_levels: int, nheads: int, n_points: int,
                 dim_feedforward: int, dropout: float, msda_impl: str = "auto"):
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(f"DeformableEncoder: hidden_dim must be divisible by 4, got {hidden_dim}")
        self.hidden_dim, self.num_levels = hidden_dim, num_levels
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(hidden_dim, dim_feedforward, dropout, num_levels, nheads, n_points, msda_impl)
            for _ in range(num_layers))
        for layer in self.layers:
            for name, param in layer.named_parameters():
                if param.dim() > 1 and "self_attn" not in name:
                    nn.init.xavier_uniform_(param)

    @classmethod
    def from_config(cls, cfg):
        prop = cfg.MODEL.UP2.PROPOSER
        return {"hidden_dim": prop.HIDDEN_DIM, "num_layers": prop.ENC_LAYERS, "num_levels": prop.NUM_FEATURE_LEVELS,
                "nheads": prop.NHEADS, "n_points": prop.ENC_N_POINTS, "dim_feedforward": prop.DIM_FEEDFORWARD,
                "dropout": prop.DROPOUT, "msda_impl": cfg.MODEL.UP2.MSDA_IMPL}

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """
        Args:
            srcs: L maps (B, C, H_l, W_l) in increasing stride (F'1..F'4).
            masks: L padding masks (B, H_l, W_l) bool, True at padding.

        Returns:
            dict with ``memory`` (B, S, C) encoded features of all levels (S = sum H_l W_l),
            ``padding_mask`` (B, S), ``spatial_shapes`` (L, 2) long, ``level_start_index`` (L,) long,
            ``valid_ratios`` (B, L, 2) and ``shapes`` (list of L (H_l, W_l) python ints).
        """
        if len(srcs) != self.num_levels or len(masks) != self.num_levels:
            raise ValueError(f"DeformableEncoder: expected {self.num_levels} levels, got {len(srcs)} maps and "
                             f"{len(masks)} masks")
        pos = [masked_sine_position_encoding(mask, self.hidden_dim).to(src.dtype)
               + self.level_embed[i].view(1, -1, 1, 1) for i, (src, mask) in enumerate(zip(srcs, masks))]
        memory, mask_flat, spatial_shapes, level_start_index, valid_ratios = flatten_levels(srcs, masks)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) for p in pos], dim=1)
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        reference_points = encoder_reference_points(shapes, valid_ratios).to(memory.dtype)
        for layer in self.layers:
            memory = layer(memory, pos_flat, reference_points, spatial_shapes, level_start_index, mask_flat)
        return {"memory": memory, "padding_mask": mask_flat, "spatial_shapes": spatial_shapes,
                "level_start_index": level_start_index, "valid_ratios": valid_ratios, "shapes": shapes}

    @staticmethod
    def split_levels(memory: torch.Tensor, shapes: List[Tuple[int, int]]) -> List[torch.Tensor]:
        """(B, S, C) -> L maps (B, C, H_l, W_l)."""
        sizes = [h * w for h, w in shapes]
        return [part.transpose(1, 2).reshape(part.shape[0], -1, h, w)
                for part, (h, w) in zip(memory.split(sizes, dim=1), shapes)]
