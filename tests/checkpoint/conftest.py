"""Fixtures shared by the weight-conversion tests: a random timm Swin-T and the same weights in Microsoft's
layout."""
import re

import pytest
import torch

SWIN = "swin_tiny_patch4_window7_224"


@pytest.fixture(scope="module")
def timm_swin():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)  # dynamic image size: small test images (windows padded as in up2's wrapper)
    return timm.create_model(SWIN, pretrained=False, num_classes=10, dynamic_img_size=True,
                             strict_img_size=False).eval()


@pytest.fixture(scope="module")
def official_swin_checkpoint(timm_swin):
    """``timm_swin``'s weights as a checkpoint of the official (Microsoft) Swin code: ``{"model": state_dict}``."""
    return _timm_to_official(timm_swin.state_dict())


def _timm_to_official(state_dict):
    """Written independently of the converter: Microsoft's layout ends stage i with the patch merging that
    timm puts at the start of stage i + 1; the head is a plain Linear; index buffers and masks are saved."""
    official = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        official[key.replace("head.fc.", "head.")] = value
        if key.endswith("attn.relative_position_bias_table"):
            official[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                49, 49, dtype=torch.long)
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return {"model": official}
