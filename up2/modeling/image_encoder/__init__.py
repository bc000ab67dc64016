"""The image encoder f_image (paper Fig. 3, eq. 1-3, Appendix A).

* ``backbone/``: backbone wrappers in Detectron2's ``BACKBONE_REGISTRY`` (any timm model, timm Swin);
  ResNets come from Detectron2 itself;
* ``input_projection.py``: backbone levels -> the proposer width d, plus the extra stride-64 level;
* ``proposer/``: the class-agnostic region proposer (``PROPOSER_REGISTRY``) and its proposal fusion,
  giving the regional tokens;
* ``global_pooling.py``: the global tokens (``GLOBAL_POOL_REGISTRY``);
* ``position_encoding.py``: sine encodings of feature-map positions and of boxes;
* ``image_encoder.py``: :class:`ImageEncoder`, which puts them together.

Importing this package registers the backbones, the proposer and the global pooling.
"""
from up2.modeling.image_encoder import backbone  # noqa: F401  (registers the timm and Swin backbones)
from up2.modeling.image_encoder import global_pooling  # noqa: F401  (registers AttentionPooling)
from up2.modeling.image_encoder import proposer  # noqa: F401  (registers DeformableRegionProposer)
from up2.modeling.image_encoder.image_encoder import IMAGE_TOKEN_CHOICES, ImageEncoder

__all__ = ["ImageEncoder", "IMAGE_TOKEN_CHOICES"]
