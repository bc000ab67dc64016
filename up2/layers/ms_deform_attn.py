"""Multi-scale deformable attention (Deformable DETR, eq. 2-3): public function, dispatch, module.

``ms_deform_attn(..., impl=...)`` runs one of three implementations with the same semantics as the
released Deformable DETR / MaskDINO op, so their weights work unchanged:

- ``"cuda"``: the compiled extension ``MultiScaleDeformableAttention`` (sources in ``csrc/``, built by
  ``setup.py`` when nvcc is found); CUDA tensors, fp64 / fp32 / fp16 / bf16.
- ``"triton"``: the Triton kernels of ``ms_deform_attn_triton.py``; CUDA tensors (or any tensor with
  ``TRITON_INTERPRET=1``), fp64 / fp32 / fp16 / bf16.
- ``"pytorch"``: ``ms_deform_attn_pytorch.py``; any device, fp64 / fp32 / fp16 / bf16. While an ONNX
  export traces the model it runs the per-level ``grid_sample`` form of the same op (ONNX GridSample).
- ``"auto"`` (default, config key ``MODEL.UP2.MSDA_IMPL``): the extension for CUDA tensors when it
  is built, else Triton for CUDA tensors when it imports, else PyTorch. Each choice is logged once.

Input checks (all implementations): shapes and level counts must agree, the five tensors must be on
one device, and ``value`` / ``sampling_locations`` / ``attention_weights`` must be contiguous (the
compiled kernels index raw memory); violations raise ``ValueError`` naming expected and got.
``MSDeformAttn`` makes its own tensors contiguous.

Dtypes and autocast: the op computes in ``value.dtype`` (accumulating in fp32 for fp16 / bf16) and
returns that dtype; sampling locations and attention weights are used in fp32 (fp64 when ``value``
is fp64) because bf16 locations are off by up to a third of a pixel on a 152-pixel-wide map. The op
runs with autocast disabled: a bf16 ``value`` produced by an autocast ``value_proj`` stays bf16.
"""
import functools
import logging
import math
import os

import torch
from torch import nn

from up2.layers.export_friendly import is_exporting
from up2.layers.ms_deform_attn_pytorch import ms_deform_attn_grid_sample_reference, ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "MSDeformAttn", "MSDA_IMPLS", "MSDAUnavailableError", "resolve_msda_impl"]

logger = logging.getLogger(__name__)

MSDA_IMPLS = ("auto", "cuda", "triton", "pytorch")
EXTENSION_NAME = "MultiScaleDeformableAttention"
_CUDA_HOWTO = (f"the compiled extension {EXTENSION_NAME} is not built: reinstall up2 with "
               "`FORCE_CUDA=1 pip install -e . --no-build-isolation` on a machine with nvcc (CUDA toolkit "
               "matching torch.version.cuda), or use impl='auto' / 'triton' / 'pytorch'")
_logged_choices = set()


class MSDAUnavailableError(RuntimeError):
    """The requested deformable-attention implementation cannot run here; the message says how to get it."""


@functools.lru_cache(maxsize=None)
def _extension():
    """The compiled extension module, or None (the import error is logged at debug level)."""
    try:
        import MultiScaleDeformableAttention as extension  # noqa: N813
    except ImportError as error:
        logger.debug("%s not importable: %s", EXTENSION_NAME, error)
        return None
    return extension


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    """None when ``triton`` imports, else the import error text."""
    try:
        import triton  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        return str(error)
    return None


def _triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_msda_impl(impl, device):
    """The implementation that ``impl`` means for tensors on ``device``.

    Args:
        impl: one of ``MSDA_IMPLS``.
        device: torch.device of the inputs.

    Returns:
        "cuda", "triton" or "pytorch". Raises ValueError for an unknown name and
        MSDAUnavailableError (with how to get it) for an implementation that cannot run here.
    """
    if impl not in MSDA_IMPLS:
        raise ValueError(f"unknown deformable-attention implementation {impl!r}: expected one of {MSDA_IMPLS} "
                         "(config key MODEL.UP2.MSDA_IMPL)")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if impl == "auto":
        if on_cuda and _extension() is not None:
            return "cuda"
        if on_cuda and _triton_import_error() is None:
            return "triton"
        return "pytorch"
    if impl == "cuda":
        if _extension() is None:
            raise MSDAUnavailableError(_CUDA_HOWTO)
        if not on_cuda:
            raise MSDAUnavailableError(f"impl='cuda' needs CUDA tensors, got tensors on {device}; "
                                       "use impl='pytorch' (or 'auto') on the CPU")
    if impl == "triton":
        if _triton_import_error() is not None:
            raise MSDAUnavailableError(f"impl='triton' needs the triton package ({_triton_import_error()}): "
                                       "`pip install triton` (Linux), or use impl='auto' / 'pytorch'")
        if not on_cuda and not _triton_interpret():
            raise MSDAUnavailableError(f"impl='triton' needs CUDA tensors, got tensors on {device}; set "
                                       "TRITON_INTERPRET=1 before importing up2 to run the kernels in Triton's "
                                       "(slow) CPU interpreter, or use impl='pytorch' (or 'auto')")
    return impl


def _log_choice(impl, requested, device):
    key = (impl, requested, torch.device(device).type)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("multi-scale deformable attention: using the %s implementation (requested %r, %s tensors)",
                    {"cuda": f"compiled CUDA extension {EXTENSION_NAME}", "triton": "Triton",
                     "pytorch": "PyTorch"}[impl], requested, torch.device(device).type)


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Raises ValueError naming expected vs got for inconsistent shapes, devices, dtypes or layouts."""
    tensors = {"value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
               "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"ms_deform_attn: all inputs must be on one device (expected {value.device}), got "
                         + ", ".join(f"{name} on {device}" for name, device in devices.items()))
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    n, num_values, m, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}")
    num_levels = spatial_shapes.shape[0]
    if level_start_index.shape != (num_levels,):
        raise ValueError(f"ms_deform_attn: level_start_index must be (L,) = ({num_levels},) like spatial_shapes, "
                         f"got shape {tuple(level_start_index.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape "
                         f"{tuple(sampling_locations.shape)}")
    _, lq, _, _, num_points, _ = sampling_locations.shape
    expected = (n, lq, m, num_levels, num_points, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) = {expected} "
                         f"(N, M from value {tuple(value.shape)}, L from spatial_shapes), got "
                         f"{tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != expected[:-1]:
        raise ValueError(f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = {expected[:-1]}, got "
                         f"{tuple(attention_weights.shape)}")
    if spatial_shapes.is_floating_point() or level_start_index.is_floating_point():
        raise ValueError("ms_deform_attn: spatial_shapes and level_start_index must be integer (long) tensors, got "
                         f"{spatial_shapes.dtype} and {level_start_index.dtype}")
    for name in ("value", "sampling_locations", "attention_weights"):
        if not tensors[name].is_floating_point():
            raise ValueError(f"ms_deform_attn: {name} must be floating point, got {tensors[name].dtype}")
        if not tensors[name].is_contiguous():
            raise ValueError(f"ms_deform_attn: {name} must be contiguous (shape {tuple(tensors[name].shape)}, "
                             f"strides {tensors[name].stride()}); call .contiguous() first")
    # one host synchronisation for both checks
    host = torch.cat([spatial_shapes.reshape(-1), level_start_index.reshape(-1)]).tolist()
    sizes = [host[2 * level] * host[2 * level + 1] for level in range(num_levels)]
    if sum(sizes) != num_values:
        raise ValueError(f"ms_deform_attn: value has S = {num_values} positions but spatial_shapes "
                         f"{[tuple(host[2 * i:2 * i + 2]) for i in range(num_levels)]} give sum H*W = {sum(sizes)}")
    starts = [sum(sizes[:level]) for level in range(num_levels)]
    if host[2 * num_levels:] != starts:
        raise ValueError(f"ms_deform_attn: level_start_index must be {starts} for these spatial_shapes, got "
                         f"{host[2 * num_levels:]}")


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl="auto"):
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D) values of all levels, flattened level by level (S = sum_l H_l * W_l).
        spatial_shapes: (L, 2) long, (H_l, W_l) of each level.
        level_start_index: (L,) long, start of each level along S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]; sampled bilinearly with
            align_corners=False and zeros outside the map.
        attention_weights: (N, Lq, M, L, P).
        impl: "auto" | "cuda" | "triton" | "pytorch" (see module docstring).

    Returns:
        (N, Lq, M * D) in ``value.dtype``.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = resolve_msda_impl(impl, value.device)
    _log_choice(chosen, impl, value.device)
    coord_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=value.device.type, enabled=False):
        if chosen == "pytorch" and is_exporting():
            # ONNX has no embedding bag with per-sample weights (the exporters unroll it into a loop):
            # an exported graph samples each level with GridSample instead (same values)
            return ms_deform_attn_grid_sample_reference(value, spatial_shapes, level_start_index,
                                                        sampling_locations, attention_weights)
        if chosen == "pytorch":
            return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights)
        locations, weights = sampling_locations.to(coord_dtype), attention_weights.to(coord_dtype)
        if chosen == "triton":
            from up2.layers.ms_deform_attn_triton import ms_deform_attn_triton
            return ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights)
        return _MSDeformAttnCUDA.apply(value, spatial_shapes, level_start_index, locations, weights)


class _MSDeformAttnCUDA(torch.autograd.Function):
    """Autograd wrapper of the compiled extension (coordinates fp32 / fp64, value any float dtype)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, weights):
        shapes, starts = spatial_shapes.long().contiguous(), level_start_index.long().contiguous()
        ctx.save_for_backward(value, shapes, starts, locations, weights)
        return _extension().ms_deform_attn_forward(value, shapes, starts, locations, weights)

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = _extension().ms_deform_attn_backward(
            value, shapes, starts, locations, weights, grad_out.contiguous())
        return grad_value, None, None, grad_locations, grad_weights


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer with Deformable DETR's parameters and initialisation.

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``) match
    the released Deformable DETR / MaskDINO checkpoints.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, impl="auto"):
        """
        Args:
            d_model: channels C of queries and values; must be divisible by n_heads.
            n_levels: number of feature levels L.
            n_heads: number of heads M (head dim D = C / M).
            n_points: sampling points P per head and level.
            impl: "auto" | "cuda" | "triton" | "pytorch" (``MODEL.UP2.MSDA_IMPL``).
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in MSDA_IMPLS:
            raise ValueError(f"MSDeformAttn: impl must be one of {MSDA_IMPLS}, got {impl!r}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Offsets: zero weight, bias = head m's unit direction on the square (angle 2 pi m / M, scaled so
        that max(|cos|, |sin|) = 1) times point index p + 1; attention weights zero (uniform softmax);
        value / output projections xavier-uniform with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = directions.view(self.n_heads, 1, 1, 2).expand(-1, self.n_levels, self.n_points, -1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalised (x, y) points, or (N, Lq, L, 4) normalised
                (cx, cy, w, h) boxes (offsets then scale with half the box size / P).
            input_flatten: (N, S, C) values of all levels flattened.
            input_spatial_shapes: (L, 2) long, (H_l, W_l).
            input_level_start_index: (L,) long.
            input_padding_mask: optional (N, S) bool, True at padded positions (their values are zeroed).

        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        _, num_values, _ = input_flatten.shape
        m, num_levels, num_points = self.n_heads, self.n_levels, self.n_points
        if input_spatial_shapes.shape[0] != num_levels:
            raise ValueError(f"MSDeformAttn: expected {num_levels} levels in input_spatial_shapes, got "
                             f"shape {tuple(input_spatial_shapes.shape)}")
        if reference_points.shape[:3] != (n, lq, num_levels) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"MSDeformAttn: reference_points must be (N, Lq, L, 2 or 4) = ({n}, {lq}, {num_levels}, "
                             f"2|4), got {tuple(reference_points.shape)}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, num_values, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, num_levels, num_points, 2)
        weights = self.attention_weights(query).view(n, lq, m, num_levels * num_points).softmax(-1)
        weights = weights.view(n, lq, m, num_levels, num_points)
        if reference_points.shape[-1] == 2:
            normaliser = input_spatial_shapes.flip(-1).to(reference_points.dtype)    # (L, 2) = (W, H)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normaliser[None, None, None, :, None, :])
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        output = ms_deform_attn(value.contiguous(), input_spatial_shapes, input_level_start_index,
                                locations.contiguous(), weights.contiguous(), impl=self.impl)
        return self.output_proj(output)
