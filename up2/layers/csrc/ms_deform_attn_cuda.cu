// CUDA kernels of multi-scale deformable attention (Deformable DETR, eq. 2-3).
//
// out[n, q, m, d] = sum_{l, p} A[n, q, m, l, p] * bilinear(V_l[n, :, :, m, d], x W_l - 0.5, y H_l - 0.5)
// with (x, y) = sampling_loc[n, q, m, l, p], align_corners=False and zeros outside the map.
//
// One thread per output element (n, q, m, d): consecutive threads read consecutive channels of the same
// corner (coalesced). Accumulation in acc_t = at::opmath_type<scalar_t> (fp32 for fp16 / bf16 / fp32,
// fp64 for fp64); sampling locations and attention weights are acc_t tensors.
//
// Backward, per thread (n, q, m, d) and point (l, p), with corners c = (dy, dx) and bilinear weights b_c:
//   grad_value[corner c, d]   += A * b_c * g[d]                       (atomic, acc_t buffer)
//   grad_attn[n, q, m, l, p]  += sum_d g[d] * sample[d]
//   grad_loc x                += sum_d g[d] * A * db/dx . v[d] * W_l  (y likewise with H_l)
// The sums over d are warp-shuffle reductions when D is a power of two <= 32 (the D threads of one
// (n, q, m) then sit in one warp and one of them stores), atomic adds otherwise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace {

constexpr int kThreads = 256;

struct Geometry {
  int64_t batch, num_values, heads, channels, queries, levels, points;
};

// Corner (y, x) of one level for the thread's channel; zero outside the map.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_corner(const scalar_t* level_value, int y, int x, int height, int width,
                                             int64_t row_stride) {
  if (y < 0 || x < 0 || y >= height || x >= width) return acc_t(0);
  return static_cast<acc_t>(level_value[(static_cast<int64_t>(y) * width + x) * row_stride]);
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index, const acc_t* __restrict__ sampling_loc,
                               const acc_t* __restrict__ attn_weight, scalar_t* __restrict__ output, Geometry g,
                               int64_t total) {
  const int64_t row_stride = g.heads * g.channels;  // distance between two positions of S
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = index % g.channels;
    const int64_t query_head = index / g.channels;  // (n * Lq + q) * M + m
    const int64_t m = query_head % g.heads;
    const int64_t n = query_head / (g.heads * g.queries);
    const scalar_t* value_nmd = value + n * g.num_values * row_stride + m * g.channels + d;
    const int64_t first_point = query_head * g.levels * g.points;
    acc_t acc = 0;
    for (int64_t l = 0; l < g.levels; ++l) {
      const int height = static_cast<int>(spatial_shapes[2 * l]);
      const int width = static_cast<int>(spatial_shapes[2 * l + 1]);
      const scalar_t* level_value = value_nmd + level_start_index[l] * row_stride;
      for (int64_t p = 0; p < g.points; ++p) {
        const int64_t point = first_point + l * g.points + p;
        const acc_t y = sampling_loc[2 * point + 1] * height - acc_t(0.5);
        const acc_t x = sampling_loc[2 * point] * width - acc_t(0.5);
        if (!(y > -1 && x > -1 && y < height && x < width)) continue;  // also skips NaN
        const int y0 = static_cast<int>(floor(y));
        const int x0 = static_cast<int>(floor(x));
        const acc_t fy = y - y0, fx = x - x0;
        const acc_t sample =
            (1 - fy) * ((1 - fx) * load_corner<scalar_t, acc_t>(level_value, y0, x0, height, width, row_stride) +
                        fx * load_corner<scalar_t, acc_t>(level_value, y0, x0 + 1, height, width, row_stride)) +
            fy * ((1 - fx) * load_corner<scalar_t, acc_t>(level_value, y0 + 1, x0, height, width, row_stride) +
                  fx * load_corner<scalar_t, acc_t>(level_value, y0 + 1, x0 + 1, height, width, row_stride));
        acc += attn_weight[point] * sample;
      }
    }
    output[index] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_corner_grad(acc_t* level_grad, int y, int x, int height, int width,
                                                int64_t row_stride, acc_t grad) {
  if (y < 0 || x < 0 || y >= height || x >= width) return;
  gpuAtomicAdd(level_grad + (static_cast<int64_t>(y) * width + x) * row_stride, grad);
}

// kWarpReduce: D is a power of two <= 32, so each (n, q, m) group of D threads lies in one warp.
template <typename scalar_t, typename acc_t, bool kWarpReduce>
__global__ void backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                                const int64_t* __restrict__ level_start_index,
                                const acc_t* __restrict__ sampling_loc, const acc_t* __restrict__ attn_weight,
                                const scalar_t* __restrict__ grad_output, acc_t* __restrict__ grad_value,
                                acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn, Geometry g,
                                int64_t total) {
  const int64_t row_stride = g.heads * g.channels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // the loop bound is uniform over the block so that every lane reaches the shuffles
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x); base < total; base += stride) {
    const int64_t index = base + threadIdx.x;
    const bool active = index < total;
    const int64_t safe = active ? index : 0;
    const int64_t d = safe % g.channels;
    const int64_t query_head = safe / g.channels;
    const int64_t m = query_head % g.heads;
    const int64_t n = query_head / (g.heads * g.queries);
    const int64_t offset_nmd = n * g.num_values * row_stride + m * g.channels + d;
    const scalar_t* value_nmd = value + offset_nmd;
    acc_t* grad_value_nmd = grad_value + offset_nmd;
    const acc_t go = active ? static_cast<acc_t>(grad_output[safe]) : acc_t(0);
    const int64_t first_point = query_head * g.levels * g.points;
    for (int64_t l = 0; l < g.levels; ++l) {
      const int height = static_cast<int>(spatial_shapes[2 * l]);
      const int width = static_cast<int>(spatial_shapes[2 * l + 1]);
      const scalar_t* level_value = value_nmd + level_start_index[l] * row_stride;
      acc_t* level_grad = grad_value_nmd + level_start_index[l] * row_stride;
      for (int64_t p = 0; p < g.points; ++p) {
        const int64_t point = first_point + l * g.points + p;
        const acc_t y = sampling_loc[2 * point + 1] * height - acc_t(0.5);
        const acc_t x = sampling_loc[2 * point] * width - acc_t(0.5);
        const acc_t attention = attn_weight[point];
        acc_t grad_a = 0, grad_x = 0, grad_y = 0;
        if (active && y > -1 && x > -1 && y < height && x < width) {
          const int y0 = static_cast<int>(floor(y));
          const int x0 = static_cast<int>(floor(x));
          const acc_t fy = y - y0, fx = x - x0;
          const acc_t v00 = load_corner<scalar_t, acc_t>(level_value, y0, x0, height, width, row_stride);
          const acc_t v01 = load_corner<scalar_t, acc_t>(level_value, y0, x0 + 1, height, width, row_stride);
          const acc_t v10 = load_corner<scalar_t, acc_t>(level_value, y0 + 1, x0, height, width, row_stride);
          const acc_t v11 = load_corner<scalar_t, acc_t>(level_value, y0 + 1, x0 + 1, height, width, row_stride);
          const acc_t b00 = (1 - fy) * (1 - fx), b01 = (1 - fy) * fx, b10 = fy * (1 - fx), b11 = fy * fx;
          grad_a = go * (b00 * v00 + b01 * v01 + b10 * v10 + b11 * v11);
          grad_x = go * attention * ((1 - fy) * (v01 - v00) + fy * (v11 - v10)) * width;
          grad_y = go * attention * ((1 - fx) * (v10 - v00) + fx * (v11 - v01)) * height;
          const acc_t ag = attention * go;
          add_corner_grad<scalar_t, acc_t>(level_grad, y0, x0, height, width, row_stride, b00 * ag);
          add_corner_grad<scalar_t, acc_t>(level_grad, y0, x0 + 1, height, width, row_stride, b01 * ag);
          add_corner_grad<scalar_t, acc_t>(level_grad, y0 + 1, x0, height, width, row_stride, b10 * ag);
          add_corner_grad<scalar_t, acc_t>(level_grad, y0 + 1, x0 + 1, height, width, row_stride, b11 * ag);
        }
        if (kWarpReduce) {
          const int width_d = static_cast<int>(g.channels);
          grad_a = group_sum(grad_a, width_d);
          grad_x = group_sum(grad_x, width_d);
          grad_y = group_sum(grad_y, width_d);
          if (active && d == 0) {
            grad_attn[point] = grad_a;
            grad_loc[2 * point] = grad_x;
            grad_loc[2 * point + 1] = grad_y;
          }
        } else if (active) {
          gpuAtomicAdd(grad_attn + point, grad_a);
          gpuAtomicAdd(grad_loc + 2 * point, grad_x);
          gpuAtomicAdd(grad_loc + 2 * point + 1, grad_y);
        }
      }
    }
  }
}

Geometry geometry(const at::Tensor& value, const at::Tensor& sampling_loc) {
  return Geometry{value.size(0),        value.size(1),        value.size(2),       value.size(3),
                  sampling_loc.size(1), sampling_loc.size(3), sampling_loc.size(4)};
}

unsigned int num_blocks(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 30)));
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight) {
  const at::cuda::OptionalCUDAGuard guard(value.device());
  const Geometry g = geometry(value, sampling_loc);
  auto output = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_loc.data_ptr<acc_t>(), attn_weight.data_ptr<acc_t>(), output.data_ptr<scalar_t>(), g, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                                     const at::Tensor& grad_output) {
  const at::cuda::OptionalCUDAGuard guard(value.device());
  const Geometry g = geometry(value, sampling_loc);
  const auto acc_type = sampling_loc.scalar_type();
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::zeros_like(sampling_loc);
  auto grad_attn = at::zeros_like(attn_weight);
  const int64_t total = grad_output.numel();
  if (total > 0) {
    const bool warp_reduce = g.channels <= 32 && (g.channels & (g.channels - 1)) == 0;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto kernel = warp_reduce ? backward_kernel<scalar_t, acc_t, true> : backward_kernel<scalar_t, acc_t, false>;
      kernel<<<num_blocks(total), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_loc.data_ptr<acc_t>(), attn_weight.data_ptr<acc_t>(), grad_output.data_ptr<scalar_t>(),
          grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(), g, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}
