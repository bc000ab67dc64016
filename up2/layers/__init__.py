"""Layers shared by the up2 models: multi-scale deformable attention (PyTorch, Triton, CUDA)."""
from up2.layers.ms_deform_attn import (
    MSDA_IMPLS,
    MSDAUnavailableError,
    MSDeformAttn,
    ms_deform_attn,
    resolve_msda_impl,
)
from up2.layers.ms_deform_attn_pytorch import ms_deform_attn_grid_sample_reference, ms_deform_attn_pytorch

__all__ = [
    "MSDA_IMPLS",
    "MSDAUnavailableError",
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_grid_sample_reference",
    "ms_deform_attn_pytorch",
    "resolve_msda_impl",
]
