"""Multi-scale deformable attention in plain PyTorch (Deformable DETR, eq. 2-3).

For every query q, head m, level l and point p, the value map of level l is sampled bilinearly at
the normalised location ``sampling_locations[n, q, m, l, p] = (x, y)`` (``align_corners=False``,
zeros outside the map) and the samples are summed with the attention weights:

    out[n, q, m] = sum_{l, p} A[n, q, m, l, p] * bilinear(V_l[n, :, :, m], x * W_l - 0.5, y * H_l - 0.5)

Two implementations live here:

- :func:`ms_deform_attn_pytorch`, the CPU path and the fallback everywhere. Each bilinear sample is
  4 rows of the flattened value tensor ``(N * S * M, D)``: the 4 corner rows of all levels and points
  are computed at once with index arithmetic into S, the attention weight is folded into the 4 corner
  weights (zero for corners outside the map), and a single ``F.embedding_bag(mode="sum")`` gathers and
  sums the ``4 L P`` weighted rows of each (n, q, m) without materialising them. The backward is
  written by hand (custom autograd.Function): the value gradient is the transposed gather (corners
  sorted by row, one more embedding bag), the corner dot products <grad_out, corner value> come from
  one sampled dense-dense product, and the location / attention-weight gradients follow in closed
  form. Only index / weight tensors of size 4 L P per (n, q, m) are kept for the backward.
- :func:`ms_deform_attn_grid_sample_reference`, the classic per-level ``F.grid_sample`` loop, used as
  the reference by the tests and the benchmark.
"""
import warnings

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_pytorch", "ms_deform_attn_grid_sample_reference"]


def _corners(spatial_shapes, level_start_index, locations, attention, num_values):
    """Rows of the value tensor viewed as (N * S * M, D) and weights of the 4 corners of every point.

    Layout (B, ..., 2 L P) with B = N * Lq * M bags and the last axis interleaving (x, y) of the L * P
    points, per-level constants expanded to (2 L P,) vectors: few ops (each op has a fixed cost in a
    thread pool), each over long contiguous inner loops.

    Args:
        locations: (N, Lq, M, L, P, 2) normalised (x, y), coordinate dtype (fp32 / fp64).
        attention: (N, Lq, M, L, P), coordinate dtype.

    Returns:
        rows: (B, 2, 2, L * P) int32 (int64 if N * S * M >= 2**31) rows of corner (dy, dx); a corner
            outside its map is clamped into it (its weight is 0).
        weights: (B, 2, 2, L * P) attention x bilinear weight, 0 for corners outside the map.
        axis_terms: (2, B, 2, 2 L P): [0] bilinear weight (1 - f, f) of corner 0 / 1 along x (even
            entries of the last axis) and y (odd entries); [1] its derivative w.r.t. f, (-1, +1);
            both 0 for corners outside the map.
        scale: (2 L P,) (W_l, H_l) interleaved.
    """
    n, lq, m, num_levels, num_points, _ = locations.shape
    bags = n * lq * m
    device, dtype = locations.device, locations.dtype
    index_dtype = torch.int32 if n * num_values * m < 2**31 else torch.int64
    # exact integer arithmetic in floating point below 2**24 (fp32) / 2**53 (fp64)
    row_dtype = dtype if num_values * m < 2**24 else torch.float64
    shapes = spatial_shapes.to(device).repeat_interleave(num_points, dim=0)          # (L P, 2) = (H, W)
    scale = shapes.flip(-1).reshape(-1).to(dtype)                                     # (2 L P,) = (W, H, ...)
    starts = level_start_index.to(device).repeat_interleave(num_points)
    # row of pixel (cx, cy) within its (n, m) = (start + cy * W + cx) * M: per-entry multiplier and offset
    multiplier = torch.stack([torch.full_like(starts, m), shapes[:, 1] * m], -1).reshape(-1).to(row_dtype)
    offset = torch.stack([torch.zeros_like(starts), starts * m], -1).reshape(-1).to(row_dtype)
    corner_step = torch.tensor([0.0, 1.0], device=device, dtype=dtype).view(1, 2, 1)
    # lerp(start, end, f): (1 - f, f) for the weights, (-1, +1) for their derivatives
    lerp_start = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], device=device, dtype=dtype).view(2, 1, 2, 1)
    lerp_end = torch.tensor([[0.0, 1.0], [-1.0, 1.0]], device=device, dtype=dtype).view(2, 1, 2, 1)

    # pixel coordinates with align_corners=False: pixel centres at integer + 0.5 in [0, size)
    pixel = torch.addcmul(torch.full_like(scale, -0.5), locations.reshape(bags, -1), scale)  # (B, 2 L P)
    low = pixel.floor().nan_to_num_(nan=-2.0)  # NaN locations: outside (NaN output), never a bad row
    corner = low.unsqueeze(1) + corner_step                                           # (B, 2, 2 L P)
    clamped = torch.clamp(corner, min=torch.zeros_like(scale), max=scale - 1)
    inside = clamped == corner
    axis_terms = torch.lerp(lerp_start, lerp_end, (pixel - low).unsqueeze(1)).mul_(inside)  # (2, B, 2, 2 L P)
    axis_weights = axis_terms[0]
    rows_xy = torch.addcmul(offset, clamped.to(row_dtype), multiplier).to(index_dtype)
    bag_offset = (torch.arange(n, device=device, dtype=index_dtype).view(n, 1, 1) * (num_values * m)
                  + torch.arange(m, device=device, dtype=index_dtype).view(1, 1, m)).expand(n, lq, m).reshape(bags, 1, 1)
    rows = (rows_xy[..., 1::2] + bag_offset).unsqueeze(2) + rows_xy[..., 0::2].unsqueeze(1)
    weights = axis_weights[..., 1::2].unsqueeze(2) * (
        axis_weights[..., 0::2] * attention.reshape(bags, 1, -1)).unsqueeze(1)
    return rows, weights, axis_terms, scale


def _corner_dots(value_rows, rows, grad_out):
    """dots[b, k] = <grad_out[b], value_rows[rows[b, k]]> without materialising all gathered rows.

    Args:
        value_rows: (R, D); rows: (B, K) int; grad_out: (B, D). Returns (B, K) in fp32 (fp64 for fp64).
    """
    num_bags, k = rows.shape
    out_dtype = torch.float64 if value_rows.dtype == torch.float64 else torch.float32
    if value_rows.dtype in (torch.float32, torch.float64):
        # sampled dense-dense product restricted to the sparsity pattern of the corners
        crow = torch.arange(0, num_bags * k + 1, k, device=rows.device, dtype=rows.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(crow, rows.reshape(-1), grad_out.new_zeros(num_bags * k),
                                              size=(num_bags, value_rows.shape[0]))
            # beta=0 still multiplies the pattern values (0 * NaN = NaN): they must be zeros, not empty
            dots = torch.sparse.sampled_addmm(pattern, grad_out, value_rows.t(), beta=0.0)
        return dots.values().view(num_bags, k).to(out_dtype)
    # half precision: gather a quarter of the corners at a time (bounded memory), reduce in fp32
    chunk = max(1, k // 4)
    parts = []
    for begin in range(0, k, chunk):
        gathered = value_rows.index_select(0, rows[:, begin:begin + chunk].reshape(-1).long()).to(out_dtype)
        parts.append(torch.bmm(gathered.view(num_bags, -1, value_rows.shape[1]),
                               grad_out.to(out_dtype).unsqueeze(-1)).squeeze(-1))
    return torch.cat(parts, dim=1)


def _scatter_rows(rows, weights, grad_out, num_rows):
    """grad[r] = sum over (b, k) with rows[b, k] == r of weights[b, k] * grad_out[b]: the transposed
    weighted gather, computed as an embedding bag over the corners sorted by row. Returns (R, D)."""
    k = rows.shape[1]
    sorted_rows, order = rows.reshape(-1).sort()
    # bag r = the sorted corners whose row is r (empty bags sum to zero)
    offsets = torch.searchsorted(sorted_rows, torch.arange(num_rows, device=rows.device, dtype=rows.dtype))
    return F.embedding_bag(order // k, grad_out, offsets, per_sample_weights=weights.reshape(-1)[order],
                           mode="sum")


class _MSDeformAttnPyTorch(torch.autograd.Function):
    """Forward: one ``F.embedding_bag`` over the 4 L P corners of each (n, q, m). Backward by hand:
    value gradient = the transposed gather; corner-weight gradient = sampled dot products, then the
    chain rule to locations and attention weights in closed form."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, attention):
        n, num_values, m, d = value.shape
        lq = locations.shape[1]
        bags = n * lq * m
        rows, weights, axis_terms, scale = _corners(spatial_shapes, level_start_index, locations, attention,
                                                    num_values)
        rows, weights = rows.view(bags, -1), weights.view(bags, -1)
        out = F.embedding_bag(rows, value.reshape(n * num_values * m, d), per_sample_weights=weights.to(value.dtype),
                              mode="sum")
        ctx.save_for_backward(value, rows, weights, axis_terms, scale, attention)
        return out.view(n, lq, m * d)

    @staticmethod
    def backward(ctx, grad_out):
        value, rows, weights, axis_terms, scale, attention = ctx.saved_tensors
        n, num_values, m, d = value.shape
        bags = rows.shape[0]
        grad_out = grad_out.reshape(bags, d)
        grad_value = grad_locations = grad_attention = None
        if ctx.needs_input_grad[0]:
            acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
            grad_value = _scatter_rows(rows, weights.to(acc_dtype), grad_out.to(acc_dtype), n * num_values * m)
            grad_value = grad_value.to(value.dtype).view(value.shape)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # dots[b, dy, dx, lp] = <grad_out[b], value row of corner (dy, dx) of point lp>
            dots = _corner_dots(value.reshape(-1, d), rows, grad_out.to(value.dtype)).to(axis_terms.dtype)
            # (i, j, B, dy, dx, L P) = term i along y x term j along x: (0, 0) d out / d attention,
            # (0, 1) d out / d frac_x, (1, 0) d out / d frac_y (up to attention), (1, 1) unused
            terms = axis_terms[:, None, :, :, None, 1::2] * axis_terms[None, :, :, None, :, 0::2]
            grads = terms.mul_(dots.view(bags, 2, 2, -1)).sum((3, 4))                    # (2, 2, B, L P)
            if ctx.needs_input_grad[4]:
                grad_attention = grads[0, 0].view(attention.shape)
            if ctx.needs_input_grad[3]:
                factor = attention.reshape(bags, -1, 1) * scale.view(-1, 2)              # (B, L P, 2)
                grad_locations = factor.mul_(torch.stack([grads[0, 1], grads[1, 0]], -1)).view(*attention.shape, 2)
        return grad_value, None, None, grad_locations, grad_attention


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention with one fused gather-and-sum over all levels.

    Args:
        value: (N, S, M, D), fp64 / fp32 / bf16 / fp16; the output has its dtype.
        spatial_shapes: (L, 2) long, (H_l, W_l) per level, S = sum_l H_l * W_l.
        level_start_index: (L,) long.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1] (outside allowed: zeros).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) tensor in ``value.dtype``. Coordinates and corner weights are computed in fp32
        (fp64 when ``value`` or the locations are fp64); gradients of half-precision values are
        accumulated in fp32. Differentiable (first order) w.r.t. the three floating inputs.
    """
    wide = torch.float64 in (value.dtype, sampling_locations.dtype)
    coord_dtype = torch.float64 if wide else torch.float32
    return _MSDeformAttnPyTorch.apply(value, spatial_shapes, level_start_index,
                                      sampling_locations.to(coord_dtype), attention_weights.to(coord_dtype))


def ms_deform_attn_grid_sample_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights):
    """The classic per-level loop: ``F.grid_sample`` of each level, then weight and sum.

    Same arguments and result as :func:`ms_deform_attn_pytorch` ((N, Lq, M * D)); kept as the
    reference for tests and ``benchmarks/msda.py``. Runs entirely in ``value.dtype`` (as the original
    code does; locations and weights are cast to it).
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations.to(value.dtype) - 1
    samples = []
    for level, value_level in enumerate(value.split(sizes, dim=1)):
        height, width = (int(v) for v in spatial_shapes[level].tolist())
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_map = value_level.permute(0, 2, 3, 1).reshape(n * m, d, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)              # (N*M, Lq, P, 2)
        samples.append(F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))                       # (N*M, D, Lq, P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)           # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
