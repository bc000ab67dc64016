"""Batched, normalised image input of the meta-architectures."""
from typing import Dict, List, Tuple

import torch
from detectron2.structures import ImageList

__all__ = ["batch_images"]


def batch_images(batched_inputs: List[Dict], pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                 size_divisibility: int) -> Tuple[ImageList, torch.Tensor]:
    """Normalises ``x["image"]`` (C, H, W) of every input and pads them into one batch.

    Args:
        pixel_mean, pixel_std: (C, 1, 1) on the model's device.

    Returns:
        tuple: ImageList (B, C, H, W) and its padding mask (B, H, W) bool, True at padding.
    """
    device = pixel_mean.device
    images = [(x["image"].to(device) - pixel_mean) / pixel_std for x in batched_inputs]
    images = ImageList.from_tensors(images, size_divisibility)
    batch, _, height, width = images.tensor.shape
    padding_mask = torch.ones((batch, height, width), dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(images.image_sizes):
        padding_mask[i, :h, :w] = False
    return images, padding_mask
