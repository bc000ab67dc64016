"""Sine position encodings of feature-map positions and of boxes (DETR convention)."""
import math

import torch

__all__ = ["sine_position_encoding_2d", "sine_encoding_of_coordinates"]


def sine_encoding_of_coordinates(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Encodes each normalised coordinate with ``num_feats`` sines/cosines.

    Args:
        coords: (..., K) coordinates in [0, 1].
        num_feats: features per coordinate (even).

    Returns:
        (..., K * num_feats): for each coordinate, interleaved sin/cos of ``2*pi*c / T^(2i/num_feats)``.
    """
    if num_feats % 2:
        raise ValueError(f"num_feats must be even, got {num_feats}")
    dim_t = torch.arange(num_feats // 2, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * dim_t / num_feats)
    angles = coords.float().unsqueeze(-1) * (2 * math.pi) / dim_t  # (..., K, num_feats / 2)
    encoding = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., K, num_feats)
    return encoding.flatten(-2).to(coords.dtype if coords.is_floating_point() else torch.float32)


def sine_position_encoding_2d(height: int, width: int, channels: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h*w, C) encoding of pixel centres: C/2 features for y then C/2 for x, row-major order."""
    if channels % 4:
        raise ValueError(f"channels must be divisible by 4, got {channels}")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # (h*w, 2) as (y, x)
    return sine_encoding_of_coordinates(grid, channels // 2).to(dtype)
