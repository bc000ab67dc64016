"""Export-friendly forms of operations: :func:`is_exporting`, and adaptive average pooling that also
exports to ONNX.

ONNX has no adaptive pooling: the exporters handle ``F.adaptive_avg_pool2d`` only when the output size
divides the input size. Bin i of an adaptive pooling covers input rows ``[floor(i * H / h),
ceil((i + 1) * H / h))``; averaging every bin is a product with a constant (h, H) matrix per axis,
``P_h @ x @ P_w^T``, which any exporter writes as two MatMul nodes.
"""
import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["is_exporting", "adaptive_avg_pool2d", "adaptive_pool_matrix"]


def adaptive_pool_matrix(in_size: int, out_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(out_size, in_size) matrix whose row i averages the inputs of adaptive-pooling bin i."""
    matrix = torch.zeros(out_size, in_size, dtype=dtype, device=device)
    for i in range(out_size):
        start, end = (i * in_size) // out_size, math.ceil((i + 1) * in_size / out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def is_exporting() -> bool:
    """True while ``torch.onnx.export`` (or ``torch.export``) traces the model."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def adaptive_avg_pool2d(x: torch.Tensor, output_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` for x (..., H, W); while ONNX export traces the model,
    the same averages as two products with constant pooling matrices (static H, W)."""
    if not is_exporting():
        return F.adaptive_avg_pool2d(x, output_size)
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    height, width = x.shape[-2:]
    rows = adaptive_pool_matrix(int(height), out_h, x.dtype, x.device)
    cols = adaptive_pool_matrix(int(width), out_w, x.dtype, x.device)
    return rows @ x @ cols.t()
