"""Swin Transformer backbones from timm behind Detectron2's ``Backbone`` interface.

A :class:`~up2.modeling.image_encoder.backbone.TimmBackbone` whose timm model is kept under ``self.swin`` (the prefix
of the converters' ``timm_swin`` / ``official_swin`` outputs); timm checkpoints load by name with
:meth:`SwinBackbone.load_timm_state_dict`. Inputs of any size work (timm's dynamic image size pads
windows internally).
"""
from typing import List, Optional

from detectron2.modeling import BACKBONE_REGISTRY, ShapeSpec

from up2.modeling.image_encoder.backbone.timm_backbone import STAGE_NAMES, TimmBackbone

__all__ = ["SwinBackbone", "build_swin_backbone", "SWIN_STAGE_NAMES"]

# Detectron2 names of the four Swin stages (strides 4, 8, 16, 32).
SWIN_STAGE_NAMES = STAGE_NAMES


class SwinBackbone(TimmBackbone):
    """A timm Swin Transformer returning its four stages as ``res2..res5`` (NCHW).

    Args:
        model_name: timm model name, e.g. ``"swin_base_patch4_window12_384"``.
        out_features: subset of ``("res2", "res3", "res4", "res5")``.
        drop_path_rate: stochastic depth rate.
        weights: optional path of a timm state dict (``.pth``/``.safetensors``) loaded by name.
    """

    timm_attribute = "swin"

    def __init__(self, model_name: str, out_features: List[str], drop_path_rate: float = 0.0,
                 weights: Optional[str] = None):
        # the final norm is kept (as in released up2 Swin checkpoints) although only a classifier reads it
        super().__init__(model_name, out_features, drop_path_rate, weights=weights, prune_norm=False,
                         dynamic_img_size=True, strict_img_size=False)


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> SwinBackbone:
    """Builds the timm Swin named by ``MODEL.UP2.BACKBONE.SWIN_NAME`` (``MODEL.BACKBONE.NAME:
    "build_swin_backbone"``)."""
    if input_shape.channels != 3:
        raise ValueError(f"Swin backbones take 3-channel images, got {input_shape.channels} channels")
    backbone_cfg = cfg.MODEL.UP2.BACKBONE
    return SwinBackbone(backbone_cfg.SWIN_NAME, list(backbone_cfg.OUT_FEATURES), backbone_cfg.DROP_PATH_RATE,
                        weights=backbone_cfg.WEIGHTS or None)
