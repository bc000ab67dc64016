"""Multi-scale deformable attention as Triton kernels (forward and backward).

One program handles ``BLOCK_Q`` queries of one (batch n, head m) pair and all ``D`` channels of the
head: for every level l and point p it computes the pixel position ``(x W_l - 0.5, y H_l - 0.5)``,
loads the 4 bilinear corners as (BLOCK_Q, D) tiles (masked to zero outside the map) and accumulates
``attention * bilinear weight * corner`` in fp32 (fp64 for fp64 values).

The backward program recomputes the corners and, per point,
  - adds ``attention * bilinear weight * grad_out`` to the value gradient of each corner (atomic adds
    into an fp32 / fp64 buffer, cast to the value dtype at the end),
  - reduces ``dot_c = <grad_out, corner_c>`` over D and writes the attention-weight gradient
    ``sum_c bilinear_c * dot_c`` and the location gradient
    ``attention * (d bilinear / d (x, y)) . dot * (W_l, H_l)`` (one writer per point: no atomics).

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before this module is imported, Triton's
interpreter runs it on CPU tensors (slow; used by the tests).
"""
import torch
import triton
import triton.language as tl

__all__ = ["ms_deform_attn_triton"]


@triton.jit
def _corner(value_base, grad_value_base, s_start, width, height, cx, cy, valid_q, offs_d, mask_d,
            ROW: tl.constexpr):
    """Pointers and mask of one bilinear corner tile (BLOCK_Q, BLOCK_D)."""
    valid = valid_q & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    s = (s_start + cy * width + cx).to(tl.int64)
    offsets = s[:, None] * ROW + offs_d[None, :]
    mask = valid[:, None] & mask_d[None, :]
    return value_base + offsets, grad_value_base + offsets, mask


@triton.jit
def _point(loc_ptr, attn_ptr, point, mask_q, width, height):
    """Attention, top-left corner and fractional position of one sampling point per query."""
    x = tl.load(loc_ptr + point * 2, mask=mask_q, other=0.0)
    y = tl.load(loc_ptr + point * 2 + 1, mask=mask_q, other=0.0)
    attention = tl.load(attn_ptr + point, mask=mask_q, other=0.0)
    width_f = width.to(x.dtype)
    height_f = height.to(x.dtype)
    # clamp far-away points (all 4 corners outside either way) so the integer cast stays defined
    px = tl.minimum(tl.maximum(x * width_f - 0.5, -2.0), width_f + 1.0)
    py = tl.minimum(tl.maximum(y * height_f - 0.5, -2.0), height_f + 1.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return attention, x0f.to(tl.int32), y0f.to(tl.int32), px - x0f, py - y0f, width_f, height_f


@triton.jit
def _msda_forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, num_queries, num_values,
                         M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_nm = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = (pid_nm // M).to(tl.int64)
    m = pid_nm % M
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    value_base = value_ptr + n * num_values * M * D + m * D
    query_head = (n * num_queries + offs_q) * M + m            # (BLOCK_Q,) index of (n, q, m)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for level in tl.static_range(L):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        s_start = tl.load(starts_ptr + level).to(tl.int32)
        for p in tl.static_range(P):
            point = (query_head * L + level) * P + p
            attention, x0, y0, fx, fy, _, _ = _point(loc_ptr, attn_ptr, point, mask_q, width, height)
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                ptrs, _, mask = _corner(value_base, value_base, s_start, width, height, x0 + dx, y0 + dy, mask_q,
                                        offs_d, mask_d, M * D)
                wx = fx * dx + (1.0 - fx) * (1 - dx)
                wy = fy * dy + (1.0 - fy) * (1 - dy)
                corner_value = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
                acc += (attention * wx * wy).to(ACC)[:, None] * corner_value
    out_ptrs = out_ptr + query_head.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_d[None, :])


@triton.jit
def _msda_backward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr,
                          grad_loc_ptr, grad_attn_ptr, num_queries, num_values,
                          M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_nm = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = (pid_nm // M).to(tl.int64)
    m = pid_nm % M
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    value_base = value_ptr + n * num_values * M * D + m * D
    grad_value_base = grad_value_ptr + n * num_values * M * D + m * D
    query_head = (n * num_queries + offs_q) * M + m
    grad_out = tl.load(grad_out_ptr + query_head.to(tl.int64)[:, None] * D + offs_d[None, :],
                       mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(ACC)
    for level in tl.static_range(L):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        s_start = tl.load(starts_ptr + level).to(tl.int32)
        for p in tl.static_range(P):
            point = (query_head * L + level) * P + p
            attention, x0, y0, fx, fy, width_f, height_f = _point(loc_ptr, attn_ptr, point, mask_q, width, height)
            grad_attention = tl.zeros((BLOCK_Q,), dtype=ACC)
            grad_fx = tl.zeros((BLOCK_Q,), dtype=ACC)
            grad_fy = tl.zeros((BLOCK_Q,), dtype=ACC)
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                ptrs, grad_ptrs, mask = _corner(value_base, grad_value_base, s_start, width, height, x0 + dx,
                                                y0 + dy, mask_q, offs_d, mask_d, M * D)
                wx = fx * dx + (1.0 - fx) * (1 - dx)
                wy = fy * dy + (1.0 - fy) * (1 - dy)
                corner_value = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
                dot = tl.sum(corner_value * grad_out, axis=1).to(ACC)       # 0 outside the map
                grad_attention += (wx * wy).to(ACC) * dot
                grad_fx += (wy * (2 * dx - 1)).to(ACC) * dot
                grad_fy += (wx * (2 * dy - 1)).to(ACC) * dot
                tl.atomic_add(grad_ptrs, (attention * wx * wy).to(ACC)[:, None] * grad_out, mask=mask)
            attention_acc = attention.to(ACC)
            tl.store(grad_attn_ptr + point, grad_attention.to(grad_attn_ptr.dtype.element_ty), mask=mask_q)
            tl.store(grad_loc_ptr + point * 2, (grad_fx * attention_acc * width_f.to(ACC)).to(
                grad_loc_ptr.dtype.element_ty), mask=mask_q)
            tl.store(grad_loc_ptr + point * 2 + 1, (grad_fy * attention_acc * height_f.to(ACC)).to(
                grad_loc_ptr.dtype.element_ty), mask=mask_q)


def _launch_config(value, num_queries):
    n, _, m, d = value.shape
    block_d = triton.next_power_of_2(d)
    block_q = max(16, min(64, 4096 // block_d))
    grid = (n * m, triton.cdiv(num_queries, block_q))
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    return grid, block_q, block_d, acc


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, attention):
        n, num_values, m, d = value.shape
        _, num_queries, _, num_levels, num_points, _ = locations.shape
        shapes = spatial_shapes.contiguous()
        starts = level_start_index.contiguous()
        out = torch.empty((n, num_queries, m, d), dtype=value.dtype, device=value.device)
        grid, block_q, block_d, acc = _launch_config(value, num_queries)
        _msda_forward_kernel[grid](value, shapes, starts, locations, attention, out, num_queries, num_values,
                                   M=m, D=d, L=num_levels, P=num_points, BLOCK_Q=block_q, BLOCK_D=block_d, ACC=acc)
        ctx.save_for_backward(value, shapes, starts, locations, attention)
        return out.view(n, num_queries, m * d)

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, starts, locations, attention = ctx.saved_tensors
        _, num_values, m, d = value.shape
        _, num_queries, _, num_levels, num_points, _ = locations.shape
        acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
        grad_locations = torch.empty_like(locations)
        grad_attention = torch.empty_like(attention)
        grid, block_q, block_d, acc = _launch_config(value, num_queries)
        _msda_backward_kernel[grid](value, shapes, starts, locations, attention, grad_out.contiguous(), grad_value,
                                    grad_locations, grad_attention, num_queries, num_values,
                                    M=m, D=d, L=num_levels, P=num_points, BLOCK_Q=block_q, BLOCK_D=block_d,
                                    ACC=acc)
        return grad_value.to(value.dtype), None, None, grad_locations, grad_attention


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention with the Triton kernels.

    Args:
        value: (N, S, M, D) contiguous, fp64 / fp32 / fp16 / bf16.
        spatial_shapes: (L, 2) long, (H_l, W_l); level_start_index: (L,) long (same device).
        sampling_locations: (N, Lq, M, L, P, 2) contiguous, fp32 (fp64 with fp64 values).
        attention_weights: (N, Lq, M, L, P) contiguous, same dtype as the locations.

    Returns:
        (N, Lq, M * D) in ``value.dtype``; accumulation in fp32 (fp64 for fp64).
    """
    return _MSDeformAttnTriton.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
