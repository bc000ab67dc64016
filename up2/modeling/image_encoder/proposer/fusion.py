"""Proposal fusion (paper eq. 9) and top-O selection of the regional tokens::

    q_proposal = q_sem + B(box) + M(mask)

* B: sine position encoding of the detached cxcywh box (d/4 features per coordinate, DETR
  convention) followed by ``Linear(d, d)``;
* M: ``adaptive_avg_pool2d`` of the detached mask to P x P (paper: 28 x 28), flattened, followed by
  ``Linear(P*P, d)``. The pooled quantity is the mask *probability* ``sigmoid(logits)``: it is bounded
  in [0, 1] whatever the scale the logits reach during training, so the projection sees inputs of a
  stable range (the paper does not say which of the two it pools).

Box and mask are detached before fusing (paper Appendix A): no gradient reaches the box or mask
predictions through the fusion. The O proposals with the highest objectness (the final decoder
layer's objectness logit, which the criterion supervises) are kept.
"""
from typing import Dict

import torch
from torch import nn

from up2.layers import adaptive_avg_pool2d
from up2.modeling.image_encoder.position_encoding import sine_encoding_of_coordinates

__all__ = ["ProposalFusion"]


class ProposalFusion(nn.Module):
    """Fuses semantic, box and mask representations and keeps the top-O proposals.

    Args:
        hidden_dim: d (divisible by 8).
        pool_size: P of the mask pooling (``FUSION_MASK_POOL_SIZE``).
        topk: O, proposals kept (``TOPK_QUERIES``).
    """

    def __init__(self, hidden_dim: int, pool_size: int = 28, topk: int = 200):
        super().__init__()
        if hidden_dim % 8:
            raise ValueError(f"ProposalFusion: hidden_dim must be divisible by 8, got {hidden_dim}")
        self.hidden_dim, self.pool_size, self.topk = hidden_dim, pool_size, topk
        self.box_proj = nn.Linear(hidden_dim, hidden_dim)
        self.mask_proj = nn.Linear(pool_size * pool_size, hidden_dim)

    def fuse(self, q_sem: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Eq. 9 for every proposal.

        Args:
            q_sem: (B, N, d) final-layer hidden states.
            boxes: (B, N, 4) cxcywh in [0, 1].
            masks: (B, N, h, w) mask logits.

        Returns:
            (B, N, d).
        """
        box_code = sine_encoding_of_coordinates(boxes.detach(), self.hidden_dim // 4).to(q_sem.dtype)
        batch, num = masks.shape[:2]
        # exports to ONNX (MatMul) where F.adaptive_avg_pool2d does not
        pooled = adaptive_avg_pool2d(masks.detach().sigmoid(), self.pool_size).reshape(batch, num, -1)
        return q_sem + self.box_proj(box_code) + self.mask_proj(pooled.to(q_sem.dtype))

    def forward(self, q_sem: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                objectness: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            q_sem: (B, N, d); boxes: (B, N, 4); masks: (B, N, h, w) logits; objectness: (B, N, 1) or (B, N) logits.

        Returns:
            dict with ``regional_tokens`` (B, O, d), ``boxes`` (B, O, 4), ``masks`` (B, O, h, w),
            ``objectness`` (B, O) and ``keep_indices`` (B, O) long indices into N, by decreasing objectness.
        """
        if objectness.dim() == 3:
            objectness = objectness[..., 0]
        if objectness.shape[1] < self.topk:
            raise ValueError(f"ProposalFusion: {objectness.shape[1]} proposals for top-{self.topk} "
                             "(MODEL.UP2.PROPOSER.TOPK_QUERIES must be <= NUM_QUERIES)")
        fused = self.fuse(q_sem, boxes, masks)
        keep = objectness.detach().topk(self.topk, dim=1).indices

        def take(t):
            index = keep.view(*keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            return t.gather(1, index)

        return {"regional_tokens": take(fused), "boxes": take(boxes), "masks": take(masks),
                "objectness": take(objectness), "keep_indices": keep}
