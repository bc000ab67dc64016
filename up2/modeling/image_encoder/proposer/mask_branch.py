"""Per-pixel mask features and mask prediction of the region proposer (paper eq. 8)::

    mask_i = Upsample( MLP(q_i) . R( G(F_0) + H(F_1^enc) ) )

* G: 1x1 convolution + GroupNorm on the stride-4 backbone level F_0. This is exactly the proposer's
  input projection of ``res2`` (``InputProjection.lateral[0]``), so :class:`MaskBranch` receives
  ``G(F_0)`` already computed (F'_0, stride 4) instead of owning a second copy;
* H: 1x1 convolution + GroupNorm + bilinear upsampling of the stride-8 encoder output F_1^enc to
  stride 4 (``MaskBranch.lateral``);
* R: 3x3 convolution + GroupNorm + ReLU + 1x1 convolution (``MaskBranch.refine``);
* MLP(q_i): the decoder's mask-embedding head.

Masks are predicted at stride 4 as logits (B, Q, H/4, W/4); the Upsample to full resolution is done
at inference only (``ProposalDetector``), losses sample points on the stride-4 logits.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskBranch"]


class MaskBranch(nn.Module):
    """H and R of eq. 8 and the dot product with the query mask embeddings.

    Args:
        hidden_dim: d, channels of G(F_0) and F_1^enc.
        mask_dim: channels of the per-pixel embedding (= the mask-embedding MLP's output).
        num_groups: GroupNorm groups.
    """

    def __init__(self, hidden_dim: int, mask_dim: int, num_groups: int = 32):
        super().__init__()
        self.lateral = nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 1), nn.GroupNorm(num_groups, hidden_dim))
        self.refine = nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
                                    nn.GroupNorm(num_groups, hidden_dim), nn.ReLU(),
                                    nn.Conv2d(hidden_dim, mask_dim, 1))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def pixel_features(self, g_f0: torch.Tensor, f1_enc: torch.Tensor) -> torch.Tensor:
        """R(G(F_0) + H(F_1^enc)).

        Args:
            g_f0: (B, d, H/4, W/4) = G(F_0).
            f1_enc: (B, d, H/8, W/8) stride-8 encoder output.

        Returns:
            (B, mask_dim, H/4, W/4).
        """
        h = F.interpolate(self.lateral(f1_enc), size=g_f0.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(g_f0 + h)

    @staticmethod
    def predict(mask_embeds: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
        """MLP(q) . pixel features.

        Args:
            mask_embeds: (B, Q, mask_dim).
            pixel_features: (B, mask_dim, h, w).

        Returns:
            (B, Q, h, w) mask logits.
        """
        return torch.einsum("bqc,bchw->bqhw", mask_embeds, pixel_features)
