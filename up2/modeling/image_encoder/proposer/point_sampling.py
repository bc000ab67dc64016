"""Point sampling of masks at normalised coordinates (Mask2Former-style point losses).

Coordinates are ``(x, y)`` in ``[0, 1]`` relative to the whole map, so masks of different resolutions
(predicted masks at stride 4, ground-truth masks at the padded image size) are sampled at the same
image locations. With ``align_corners=False`` the point ``((j + 0.5) / W, (i + 0.5) / H)`` falls
exactly on the centre of pixel ``(i, j)``. Borders are extended (``padding_mode="border"``): a point in the
outer half pixel of a map takes the border pixels' values, so a mask touching the image border is not
faded towards 0 there.
"""
import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "importance_split", "sample_uncertain_points", "uncertainty"]

logger = logging.getLogger(__name__)


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear sampling of feature maps at normalised points.

    Args:
        input: (N, C, H, W) maps.
        point_coords: (N, P, 2) ``(x, y)`` coordinates in ``[0, 1]``.
        align_corners: as in :func:`torch.nn.functional.grid_sample`.

    Returns:
        (N, C, P) sampled values (border values extended outside the pixel centres).
    """
    if input.dim() != 4 or point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(f"point_sample expects input (N, C, H, W) and point_coords (N, P, 2), got "
                         f"{tuple(input.shape)} and {tuple(point_coords.shape)}")
    grid = (2.0 * point_coords.to(input.dtype) - 1.0).unsqueeze(2)  # (N, P, 1, 2) in [-1, 1]
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="border",
                         align_corners=align_corners).squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of mask logits: ``-|logit|`` (largest where the prediction is closest to 0.5)."""
    return -logits.abs()


def importance_split(num_points: int, oversample_ratio: float, importance_sample_ratio: float) -> Tuple[int, int, int]:
    """How :func:`sample_uncertain_points` splits ``num_points``.

    Returns:
        ``(num_oversampled, num_uncertain, num_random)``: ``kP`` random candidates, the
        ``ceil(beta * P)`` most uncertain of them, and ``P - ceil(beta * P)`` uniform random points.
    """
    if num_points <= 0:
        raise ValueError(f"num_points must be > 0, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_oversampled = int(math.ceil(num_points * oversample_ratio - 1e-9))
    num_uncertain = min(int(math.ceil(importance_sample_ratio * num_points - 1e-9)), num_points)
    return num_oversampled, num_uncertain, num_points - num_uncertain


def _rand(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    """Uniform [0, 1) values drawn with ``generator`` on its own device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


@torch.no_grad()
def sample_uncertain_points(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                            importance_sample_ratio: float,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mask2Former importance sampling: points where the predicted masks are most uncertain.

    Draws ``kP`` uniform candidates (k = ``oversample_ratio``), keeps the ``ceil(beta * P)``
    (beta = ``importance_sample_ratio``) with the smallest ``|logit|`` and fills the rest with fresh
    uniform points. The candidates are drawn first, then the random points, from ``generator``.

    Args:
        mask_logits: (N, 1, H, W) or (N, H, W) mask logits (not modified; no gradient).
        num_points: P.
        oversample_ratio: k >= 1.
        importance_sample_ratio: beta in [0, 1].
        generator: optional ``torch.Generator`` for reproducible points.

    Returns:
        (N, P, 2) float32 ``(x, y)`` coordinates in ``[0, 1]``: the ``ceil(beta * P)`` uncertain
        points first, in decreasing uncertainty, then the random ones (see :func:`importance_split`).
    """
    if mask_logits.dim() == 3:
        mask_logits = mask_logits.unsqueeze(1)
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"mask_logits must be (N, 1, H, W) or (N, H, W), got {tuple(mask_logits.shape)}")
    num_masks, device = mask_logits.shape[0], mask_logits.device
    num_oversampled, num_uncertain, num_random = importance_split(num_points, oversample_ratio,
                                                                  importance_sample_ratio)
    candidates = _rand((num_masks, num_oversampled, 2), generator, device, torch.float32)
    scores = uncertainty(point_sample(mask_logits.float(), candidates))[:, 0]  # (N, kP)
    top = scores.topk(num_uncertain, dim=1).indices  # (N, ceil(beta P))
    chosen = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random:
        chosen = torch.cat([chosen, _rand((num_masks, num_random, 2), generator, device, torch.float32)], dim=1)
    return chosen
