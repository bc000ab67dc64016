"""Proposal fusion (paper eq. 9) and top-O selection of the regional tokens::

    q_proposal = q_sem + B(box) + M(mask)

* B: sine position encoding of the detached cxcywh box (d/4 features per coordinate, DETR
  convention) followed by ``Linear(d, d)``;
* M: ``adaptive_avg_pool2d`` of the detached mask to P x P (paper: 28 x 28), flattened, followed by
  ``Linear(P*P, d)``. The pooled quantity is the mask *probability* ``sigmoid(logits)``: it is bounded
  in [0, 1] whatever the scale the logits reach during training, so the projection sees inputs of a
  stable range (the paper does not say which of the two it pools).

Optionally (``MODEL.UP2.PROPOSER.FUSION_FEATURE_LEVELS``, not in the paper, empty by default) a fourth
term ``P(pool_mask(F_l))`` adds, for every listed backbone level l, the average of the backbone features
under the proposal's mask (the mask probabilities resized to the level, normalised to sum 1),
concatenated over the levels and projected by ``Linear(sum C_l, d)``. With a pretrained backbone this
gives every regional token the backbone's class evidence of its region at once, where ``q_sem`` of a
from-scratch proposer carries little of it early in training.

Box and mask are detached before fusing (paper Appendix A): no gradient reaches the box or mask
predictions through the fusion. The O proposals with the highest objectness (the final decoder
layer's objectness logit, which the criterion supervises) are kept.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from up2.layers import adaptive_avg_pool2d
from up2.modeling.image_encoder.position_encoding import sine_encoding_of_coordinates

__all__ = ["ProposalFusion", "mask_pooled_features"]


def mask_pooled_features(masks: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average of each feature map under each (soft) mask.

    Args:
        masks: (B, N, h, w) mask logits (detached here).
        features: maps (B, C_l, H_l, W_l).

    Returns:
        (B, N, sum C_l): per mask, the features weighted by ``sigmoid(masks)`` resized to (H_l, W_l)
        (bilinear), divided by the sum of the weights.
    """
    probs = masks.detach().sigmoid()
    pooled = []
    for feature in features:
        weights = F.interpolate(probs, size=feature.shape[-2:], mode="bilinear", align_corners=False)
        weights = weights / weights.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
        pooled.append(torch.einsum("bnhw,bchw->bnc", weights.to(feature.dtype), feature))
    return torch.cat(pooled, dim=-1)


class ProposalFusion(nn.Module):
    """Fuses semantic, box and mask representations and keeps the top-O proposals.

    Args:
        hidden_dim: d (divisible by 8).
        pool_size: P of the mask pooling (``FUSION_MASK_POOL_SIZE``).
        topk: O, proposals kept (``TOPK_QUERIES``).
        feature_channels: channels of the backbone levels pooled under the masks (``FUSION_FEATURE_LEVELS``);
            empty: no such term (the paper's eq. 9).
    """

    def __init__(self, hidden_dim: int, pool_size: int = 28, topk: int = 200, feature_channels: Sequence[int] = ()):
        super().__init__()
        if hidden_dim % 8:
            raise ValueError(f"ProposalFusion: hidden_dim must be divisible by 8, got {hidden_dim}")
        self.hidden_dim, self.pool_size, self.topk = hidden_dim, pool_size, topk
        self.box_proj = nn.Linear(hidden_dim, hidden_dim)
        self.mask_proj = nn.Linear(pool_size * pool_size, hidden_dim)
        self.feature_proj = nn.Linear(sum(feature_channels), hidden_dim) if feature_channels else None

    def fuse(self, q_sem: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
             features: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Eq. 9 for every proposal (plus the mask-pooled backbone features when configured).

        Args:
            q_sem: (B, N, d) final-layer hidden states.
            boxes: (B, N, 4) cxcywh in [0, 1].
            masks: (B, N, h, w) mask logits.
            features: the backbone levels of ``feature_channels``, (B, C_l, H_l, W_l) each.

        Returns:
            (B, N, d).
        """
        box_code = sine_encoding_of_coordinates(boxes.detach(), self.hidden_dim // 4).to(q_sem.dtype)
        batch, num = masks.shape[:2]
        # exports to ONNX (MatMul) where F.adaptive_avg_pool2d does not
        pooled = adaptive_avg_pool2d(masks.detach().sigmoid(), self.pool_size).reshape(batch, num, -1)
        fused = q_sem + self.box_proj(box_code) + self.mask_proj(pooled.to(q_sem.dtype))
        if self.feature_proj is not None:
            if len(features) == 0:
                raise ValueError("ProposalFusion: configured with FUSION_FEATURE_LEVELS but given no features")
            fused = fused + self.feature_proj(mask_pooled_features(masks, features).to(q_sem.dtype))
        return fused

    def forward(self, q_sem: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                objectness: torch.Tensor, features: Sequence[torch.Tensor] = ()) -> Dict[str, torch.Tensor]:
        """
        Args:
            q_sem: (B, N, d); boxes: (B, N, 4); masks: (B, N, h, w) logits; objectness: (B, N, 1) or (B, N) logits;
            features: backbone levels for the optional mask-pooled term (see :meth:`fuse`).

        Returns:
            dict with ``regional_tokens`` (B, O, d), ``boxes`` (B, O, 4), ``masks`` (B, O, h, w),
            ``objectness`` (B, O) and ``keep_indices`` (B, O) long indices into N, by decreasing objectness.
        """
        if objectness.dim() == 3:
            objectness = objectness[..., 0]
        if objectness.shape[1] < self.topk:
            raise ValueError(f"ProposalFusion: {objectness.shape[1]} proposals for top-{self.topk} "
                             "(MODEL.UP2.PROPOSER.TOPK_QUERIES must be <= NUM_QUERIES)")
        fused = self.fuse(q_sem, boxes, masks, features)
        keep = objectness.detach().topk(self.topk, dim=1).indices

        def take(t):
            index = keep.view(*keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            return t.gather(1, index)

        return {"regional_tokens": take(fused), "boxes": take(boxes), "masks": take(masks),
                "objectness": take(objectness), "keep_indices": keep}
