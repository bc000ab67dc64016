"""Backbones: any timm model (``build_timm_backbone``) and timm Swin (``build_swin_backbone``); ResNets
come from Detectron2."""
from up2.modeling.image_encoder.backbone.swin import SwinBackbone, build_swin_backbone  # noqa: F401
from up2.modeling.image_encoder.backbone.timm_backbone import TimmBackbone, build_timm_backbone  # noqa: F401
