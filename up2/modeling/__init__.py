"""Modeling: backbones, region proposer, global pooling, text encoder, unified decoder, tasks."""
from up2.modeling import backbone  # noqa: F401  (registers the Swin backbone)
