"""Swin Transformer backbones from timm behind Detectron2's ``Backbone`` interface.

The timm model is kept whole (``self.swin``), so timm checkpoints load by name with
:meth:`SwinBackbone.load_timm_state_dict`; its classification head is removed. Inputs of any size
work (timm's dynamic image size pads windows internally).
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

__all__ = ["SwinBackbone", "build_swin_backbone", "SWIN_STAGE_NAMES"]

logger = logging.getLogger(__name__)

# Detectron2 names of the four Swin stages (strides 4, 8, 16, 32).
SWIN_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class SwinBackbone(Backbone):
    """A timm Swin Transformer returning its four stages as ``res2..res5`` (NCHW).

    Args:
        model_name: timm model name, e.g. ``"swin_base_patch4_window12_384"``.
        out_features: subset of ``("res2", "res3", "res4", "res5")``.
        drop_path_rate: stochastic depth rate.
        weights: optional path of a timm state dict (``.pth``/``.safetensors``) loaded by name.
    """

    def __init__(self, model_name: str, out_features: List[str], drop_path_rate: float = 0.0,
                 weights: Optional[str] = None):
        super().__init__()
        import timm

        unknown = [name for name in out_features if name not in SWIN_STAGE_NAMES]
        if unknown:
            raise ValueError(f"SwinBackbone out_features {unknown} are not Swin stages; valid: {SWIN_STAGE_NAMES}")
        self.swin = timm.create_model(model_name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                      dynamic_img_size=True, strict_img_size=False)
        info = self.swin.feature_info
        self._out_features = list(out_features)
        self._out_feature_channels = {SWIN_STAGE_NAMES[i]: info[i]["num_chs"] for i in range(4)}
        self._out_feature_strides = {SWIN_STAGE_NAMES[i]: info[i]["reduction"] for i in range(4)}
        self._stage_indices = [SWIN_STAGE_NAMES.index(name) for name in self._out_features]
        if weights:
            self.load_timm_state_dict(weights)

    def load_timm_state_dict(self, path_or_state_dict) -> List[str]:
        """Loads timm Swin weights by name (the classification head is ignored).

        Args:
            path_or_state_dict: a file saved by ``torch.save(model.state_dict())`` / safetensors,
                or the state dict itself.

        Returns:
            the names of this backbone's parameters that were not in the state dict.
        """
        state_dict = path_or_state_dict
        if isinstance(path_or_state_dict, str):
            if path_or_state_dict.endswith(".safetensors"):
                from safetensors.torch import load_file

                state_dict = load_file(path_or_state_dict)
            else:
                state_dict = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
                state_dict = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        result = self.swin.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            logger.warning("Swin weights: %d keys not used, e.g. %s", len(result.unexpected_keys),
                           result.unexpected_keys[:5])
        if result.missing_keys:
            logger.warning("Swin weights: %d parameters not found, e.g. %s", len(result.missing_keys),
                           result.missing_keys[:5])
        return list(result.missing_keys)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 3, H, W).

        Returns:
            dict of the requested stages, ``res{i}``: (B, C_i, H / s_i, W / s_i) with s_i = 4..32.
        """
        stages = self.swin.forward_intermediates(images, indices=max(self._stage_indices) + 1,
                                                 intermediates_only=True, output_fmt="NCHW")
        return {SWIN_STAGE_NAMES[i]: stages[i] for i in self._stage_indices}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> SwinBackbone:
    """Builds the timm Swin named by ``MODEL.UP2.BACKBONE.SWIN_NAME`` (``MODEL.BACKBONE.NAME:
    "build_swin_backbone"``)."""
    if input_shape.channels != 3:
        raise ValueError(f"Swin backbones take 3-channel images, got {input_shape.channels} channels")
    backbone_cfg = cfg.MODEL.UP2.BACKBONE
    return SwinBackbone(backbone_cfg.SWIN_NAME, list(backbone_cfg.OUT_FEATURES), backbone_cfg.DROP_PATH_RATE)
