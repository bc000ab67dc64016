// Python bindings of the compiled multi-scale deformable attention (extension
// `MultiScaleDeformableAttention`). Shapes (Deformable DETR conventions):
//   value              (N, S, M, D)        fp64 / fp32 / fp16 / bf16, contiguous
//   spatial_shapes     (L, 2) int64        (H_l, W_l)
//   level_start_index  (L,)   int64
//   sampling_loc       (N, Lq, M, L, P, 2) normalised (x, y); fp32 (fp64 when value is fp64)
//   attn_weight        (N, Lq, M, L, P)    same dtype as sampling_loc
//   output             (N, Lq, M * D)      value dtype (accumulated in fp32 / fp64)
#include <torch/extension.h>

#include <vector>

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight);

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                                     const at::Tensor& grad_output);

namespace {

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  const std::pair<const char*, const at::Tensor*> tensors[] = {
      {"value", &value},
      {"spatial_shapes", &spatial_shapes},
      {"level_start_index", &level_start_index},
      {"sampling_loc", &sampling_loc},
      {"attn_weight", &attn_weight}};
  for (const auto& item : tensors) {
    TORCH_CHECK(item.second->is_cuda(), "ms_deform_attn: ", item.first, " must be a CUDA tensor");
    TORCH_CHECK(item.second->is_contiguous(), "ms_deform_attn: ", item.first, " must be contiguous");
    TORCH_CHECK(item.second->device() == value.device(), "ms_deform_attn: ", item.first,
                " must be on the device of value (", value.device(), "), got ", item.second->device());
  }
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "ms_deform_attn: spatial_shapes must be (L, 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
              "ms_deform_attn: level_start_index must be (", num_levels, ",), got ", level_start_index.sizes());
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(0) == value.size(0) && sampling_loc.size(2) == value.size(2) &&
                  sampling_loc.size(3) == num_levels && sampling_loc.size(5) == 2,
              "ms_deform_attn: sampling_loc must be (N, Lq, M, L, P, 2) with N, M of value ", value.sizes(),
              " and L = ", num_levels, ", got ", sampling_loc.sizes());
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
              "ms_deform_attn: attn_weight must be (N, Lq, M, L, P) = ", sampling_loc.sizes().slice(0, 5), ", got ",
              attn_weight.sizes());
  const auto coord_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sampling_loc.scalar_type() == coord_type && attn_weight.scalar_type() == coord_type,
              "ms_deform_attn: sampling_loc and attn_weight must be ", coord_type, " for ", value.scalar_type(),
              " values, got ", sampling_loc.scalar_type(), " and ", attn_weight.scalar_type());
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                  const at::Tensor& attn_weight) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                                const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  TORCH_CHECK(grad_output.is_cuda() && grad_output.is_contiguous() && grad_output.device() == value.device(),
              "ms_deform_attn: grad_output must be a contiguous CUDA tensor on the device of value");
  TORCH_CHECK(grad_output.numel() == sampling_loc.size(0) * sampling_loc.size(1) * value.size(2) * value.size(3),
              "ms_deform_attn: grad_output must be (N, Lq, M * D), got ", grad_output.sizes());
  return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                                      grad_output.to(value.scalar_type()));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward,
        "multi-scale deformable attention forward: (value, spatial_shapes, level_start_index, sampling_loc, "
        "attn_weight) -> (N, Lq, M * D)");
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward,
        "multi-scale deformable attention backward: (value, spatial_shapes, level_start_index, sampling_loc, "
        "attn_weight, grad_output) -> [grad_value, grad_sampling_loc, grad_attn_weight]");
}
