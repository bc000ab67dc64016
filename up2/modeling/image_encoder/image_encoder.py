"""The image encoder f_image (paper eq. 1): backbone, region proposer and global pooling, returning
the global and regional tokens the unified decoder reads.

``MODEL.UP2.IMAGE_TOKENS`` selects the tokens of ``image_tokens`` (paper Table 2): "both" (global
then regional), "global" or "regional".
"""
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import Backbone, build_backbone
from torch import nn

from up2.modeling.image_encoder.proposer import DeformableRegionProposer  # noqa: F401  (registers it)
from up2.modeling.build import build_global_pool, build_proposer

__all__ = ["ImageEncoder", "IMAGE_TOKEN_CHOICES"]

IMAGE_TOKEN_CHOICES = ("both", "global", "regional")


class ImageEncoder(nn.Module):
    """Backbone + region proposer + global pooling.

    Args:
        backbone: Detectron2 backbone with the levels the proposer reads.
        proposer: a region proposer (``PROPOSER_REGISTRY``).
        global_pool: global pooling over the proposer's last level; None when ``image_tokens`` is
            "regional" (then it would receive no gradient).
        image_tokens: one of IMAGE_TOKEN_CHOICES.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, proposer: nn.Module, global_pool: Optional[nn.Module],
                 image_tokens: str):
        super().__init__()
        if image_tokens not in IMAGE_TOKEN_CHOICES:
            raise ValueError(f"MODEL.UP2.IMAGE_TOKENS: unknown value {image_tokens!r}; expected one of "
                             f"{list(IMAGE_TOKEN_CHOICES)}")
        if (global_pool is None) != (image_tokens == "regional"):
            raise ValueError("ImageEncoder needs a global pooling exactly when global tokens are used")
        self.backbone = backbone
        self.proposer = proposer
        self.global_pool = global_pool
        self.image_tokens = image_tokens

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        image_tokens = cfg.MODEL.UP2.IMAGE_TOKENS
        global_pool = None
        if image_tokens != "regional":
            global_pool = build_global_pool(cfg, cfg.MODEL.UP2.PROPOSER.HIDDEN_DIM)
        return {"backbone": backbone, "proposer": build_proposer(cfg, backbone.output_shape()),
                "global_pool": global_pool, "image_tokens": image_tokens}

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor,
                targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None) -> Dict:
        """
        Args:
            images: (B, 3, H, W) normalised, padded images.
            padding_mask: (B, H, W) bool, True at padding.
            targets: detection training only (see the proposer): boxes and masks per image.

        Returns:
            the proposer's outputs (``regional_tokens`` (B, O, d), ``boxes`` (B, O, 4), ``masks``
            (B, O, H/4, W/4), ``objectness`` (B, O), ``losses`` with targets, ...) plus

            * ``global_tokens`` (B, M' + h*w, d) and ``global_padding_mask`` (B, M' + h*w) (absent
              in "regional" mode);
            * ``image_tokens`` (B, n, d) and ``image_padding_mask`` (B, n) bool (True = padding):
              global then regional tokens, or one of them, per ``image_tokens``.
        """
        outputs = self.proposer(self.backbone(images), padding_mask, targets)
        regional = outputs["regional_tokens"]
        regional_mask = torch.zeros(regional.shape[:2], dtype=torch.bool, device=regional.device)
        if self.global_pool is None:
            outputs.update(image_tokens=regional, image_padding_mask=regional_mask)
            return outputs
        level_mask = outputs["last_level_mask"]
        global_tokens = self.global_pool(outputs["last_level"], level_mask)
        pooled = global_tokens.shape[1] - (level_mask[0].numel() if self.global_pool.include_flattened else 0)
        global_mask = torch.zeros(global_tokens.shape[:2], dtype=torch.bool, device=global_tokens.device)
        if self.global_pool.include_flattened:
            global_mask[:, pooled:] = level_mask.flatten(1)
        outputs.update(global_tokens=global_tokens, global_padding_mask=global_mask)
        if self.image_tokens == "global":
            # The proposal fusion layers feed only the regional tokens: keep them in the graph (zero
            # contribution) so that every parameter gets a gradient under DDP.
            outputs.update(image_tokens=global_tokens + 0 * regional.sum(), image_padding_mask=global_mask)
        else:
            outputs.update(image_tokens=torch.cat([global_tokens, regional], dim=1),
                           image_padding_mask=torch.cat([global_mask, regional_mask], dim=1))
        return outputs
