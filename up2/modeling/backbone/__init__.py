"""Backbones: timm Swin (``build_swin_backbone``); ResNets come from Detectron2."""
from up2.modeling.backbone.swin import SwinBackbone, build_swin_backbone  # noqa: F401
