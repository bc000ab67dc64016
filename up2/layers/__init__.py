"""Layers shared by the up2 models: multi-scale deformable attention (PyTorch, Triton, CUDA), export-friendly
forms of operations."""
from up2.layers.export_friendly import adaptive_avg_pool2d, is_exporting
from up2.layers.ms_deform_attn import (
    MSDA_IMPLS,
    MSDAUnavailableError,
    MSDeformAttn,
    ms_deform_attn,
    resolve_msda_impl,
)
from up2.layers.ms_deform_attn_pytorch import ms_deform_attn_grid_sample_reference, ms_deform_attn_pytorch

__all__ = [
    "adaptive_avg_pool2d",
    "is_exporting",
    "MSDA_IMPLS",
    "MSDAUnavailableError",
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_grid_sample_reference",
    "ms_deform_attn_pytorch",
    "resolve_msda_impl",
]
