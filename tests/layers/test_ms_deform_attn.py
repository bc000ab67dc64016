"""Multi-scale deformable attention: values against an independent loop implementation, gradients,
dtypes, autocast, input errors, implementation selection and the MSDeformAttn module.

Triton (interpreted on CPU) is checked in test_ms_deform_attn_triton.py; the CUDA tests here skip
without a GPU or without the built extension."""
import importlib
import logging
import math

import pytest
import torch

import up2  # noqa: F401
from up2.layers import (
    MSDAUnavailableError,
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_grid_sample_reference,
    resolve_msda_impl,
)

msda_module = importlib.import_module("up2.layers.ms_deform_attn")  # the module, not the function


def level_layout(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def random_inputs(shapes, batch=2, queries=3, heads=2, channels=3, points=2, dtype=torch.float64, seed=0,
                  spread=(-0.25, 1.25)):
    """Random inputs; locations in ``spread`` (partly outside [0, 1]) and kept away from pixel-centre
    grid lines, where bilinear interpolation is not differentiable."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, num_values = level_layout(shapes)
    levels = len(shapes)
    value = torch.randn(batch, num_values, heads, channels, generator=gen, dtype=torch.float64)
    low, high = spread
    locations = low + (high - low) * torch.rand(batch, queries, heads, levels, points, 2, generator=gen,
                                                dtype=torch.float64)
    scale = spatial_shapes.flip(-1).to(torch.float64).view(1, 1, 1, levels, 1, 2)
    pixel = locations * scale - 0.5
    frac = pixel - pixel.floor()
    pixel = pixel.floor() + frac.clamp(0.05, 0.95)           # at least 0.05 px from any grid line
    locations = (pixel + 0.5) / scale
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    return (value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Eq. 2-3 with explicit loops: bilinear interpolation of pixel centres (align_corners=False),
    zero outside the map."""
    value, sampling_locations, attention_weights = (
        t.detach().double() for t in (value, sampling_locations, attention_weights))
    n_batch, _, n_heads, channels = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    out = torch.zeros(n_batch, n_queries, n_heads, channels, dtype=torch.float64)
    starts = [0]
    for height, width in spatial_shapes.tolist()[:-1]:
        starts.append(starts[-1] + height * width)
    for n in range(n_batch):
        for q in range(n_queries):
            for m in range(n_heads):
                for level, (height, width) in enumerate(spatial_shapes.tolist()):
                    for p in range(n_points):
                        x = float(sampling_locations[n, q, m, level, p, 0]) * width - 0.5
                        y = float(sampling_locations[n, q, m, level, p, 1]) * height - 0.5
                        a = float(attention_weights[n, q, m, level, p])
                        for yy in (math.floor(y), math.floor(y) + 1):
                            for xx in (math.floor(x), math.floor(x) + 1):
                                if 0 <= xx < width and 0 <= yy < height:
                                    w = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                    out[n, q, m] += a * w * value[n, starts[level] + yy * width + xx, m]
    return out.view(n_batch, n_queries, n_heads * channels)


CASES = {
    "three_levels_non_square": [(3, 5), (2, 3), (1, 2)],
    "single_level": [(4, 3)],
    "tall_and_wide": [(1, 6), (5, 1)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_equal_naive_loops_fp64(case):
    inputs = random_inputs(CASES[case])
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # some points far outside and exactly on the map border
    locations[0, 0, 0, 0, 0] = torch.tensor([-3.0, 0.5], dtype=torch.float64)
    locations[0, 0, 1, 0, 0] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    expected = naive_ms_deform_attn(value, spatial_shapes, locations, weights)
    got = ms_deform_attn(*inputs, impl="pytorch")
    assert got.dtype == torch.float64 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(ms_deform_attn_grid_sample_reference(*inputs), expected, rtol=0, atol=1e-10)


def test_all_points_outside_give_zero():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(CASES["single_level"])
    locations = locations + 5.0
    assert ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights).abs().max() == 0


@pytest.mark.parametrize("case", ["three_levels_non_square", "single_level"])
def test_gradcheck_pytorch(case):
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        CASES[case], batch=1, queries=2, heads=2, channels=2, seed=1)
    value.requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, loc, a: ms_deform_attn(v, spatial_shapes, level_start_index, loc, a, impl="pytorch"),
        (value, locations, weights), eps=1e-6, atol=1e-7)


def _forward_backward(fn, value, spatial_shapes, level_start_index, locations, weights, grad_seed=3):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def test_fp32_forward_backward_match_grid_sample_reference():
    inputs = random_inputs([(12, 17), (6, 9), (3, 5), (2, 3)], batch=2, queries=40, heads=4, channels=8,
                           points=4, dtype=torch.float32, seed=2)
    got = _forward_backward(lambda *a: ms_deform_attn(*a, impl="pytorch"), *inputs)
    expected = _forward_backward(ms_deform_attn_grid_sample_reference, *inputs)
    for name, g, e in zip(("output", "value", "locations", "weights"), got, expected):
        error = (g.double() - e.double()).abs().max() / e.abs().max()  # location grads reach ~150
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_matches_fp64(dtype, tol):
    """Output and value gradient in the value dtype; location / weight gradients in fp32. Tolerance
    relative to the largest magnitude: bf16 has an 8-bit mantissa (2**-8 ~ 4e-3 per rounding)."""
    inputs = random_inputs([(12, 17), (6, 9)], batch=2, queries=20, heads=2, channels=8, points=4, seed=4)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    expected = _forward_backward(lambda *a: ms_deform_attn(*a, impl="pytorch"), *inputs)
    got = _forward_backward(lambda *a: ms_deform_attn(*a, impl="pytorch"), value.to(dtype), spatial_shapes,
                            level_start_index, locations.float(), weights.float())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for name, g, e in zip(("output", "value", "locations", "weights"), got, expected):
        error = (g.double() - e).abs().max() / e.abs().max()
        assert error < tol, f"{name}: relative error {error:.2e} >= {tol}"


def test_autocast_keeps_bf16_value_and_fp32_locations():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        CASES["three_levels_non_square"], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), spatial_shapes, level_start_index, locations, weights)
    assert out.dtype == torch.bfloat16
    reference = ms_deform_attn(value.bfloat16().float(), spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_module_under_autocast_runs_in_bf16_and_backpropagates():
    layer, inputs = _module_inputs(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(*inputs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.value_proj.weight.grad is not None and torch.isfinite(layer.value_proj.weight.grad).all()
    reference = layer(*inputs)
    assert ((out.float() - reference).abs().max() / reference.abs().max()) < 3e-2


# ---------------------------------------------------------------------------------------- bad input
def _good_inputs():
    return list(random_inputs(CASES["three_levels_non_square"], dtype=torch.float32))


@pytest.mark.parametrize("mutate,pattern", [
    (lambda x: x.__setitem__(0, x[0][:, :-1].contiguous()), r"S = 22.*sum H\*W = 23"),
    (lambda x: x.__setitem__(1, x[1][:2]), r"level_start_index must be \(L,\) = \(2,\)"),
    (lambda x: x.__setitem__(2, x[2][:2]), r"level_start_index must be \(L,\) = \(3,\).*got shape \(2,\)"),
    (lambda x: x.__setitem__(2, x[2] + 1), r"level_start_index must be \[0, 15, 21\].*got \[1, 16, 22\]"),
    (lambda x: x.__setitem__(3, x[3][:, :, :, :2].contiguous()), r"sampling_locations must be .*\(2, 3, 2, 3, 2, 2\).*"
                                                                 r"got \(2, 3, 2, 2, 2, 2\)"),
    (lambda x: x.__setitem__(4, x[4][..., :1].contiguous()), r"attention_weights must be .*\(2, 3, 2, 3, 2\).*"
                                                             r"got \(2, 3, 2, 3, 1\)"),
    (lambda x: x.__setitem__(0, x[0][0]), r"value must be \(N, S, M, D\), got shape \(23, 2, 3\)"),
    (lambda x: x.__setitem__(0, x[0].transpose(0, 1).contiguous().transpose(0, 1)), r"value must be contiguous"),
    (lambda x: x.__setitem__(3, x[3].transpose(1, 2).contiguous().transpose(1, 2)),
     r"sampling_locations must be contiguous"),
    (lambda x: x.__setitem__(1, x[1].float()), r"must be integer"),
    (lambda x: x.__setitem__(1, x[1].to("meta")), r"one device .*spatial_shapes on meta"),
])
def test_bad_input_names_expected_and_got(mutate, pattern):
    inputs = _good_inputs()
    mutate(inputs)
    with pytest.raises(ValueError, match=pattern):
        ms_deform_attn(*inputs, impl="pytorch")


# ------------------------------------------------------------------------------- implementation choice
def test_auto_on_cpu_is_pytorch_and_logs_once(caplog):
    msda_module._logged_choices.clear()
    inputs = _good_inputs()
    assert resolve_msda_impl("auto", torch.device("cpu")) == "pytorch"
    with caplog.at_level(logging.INFO, logger="up2.layers.ms_deform_attn"):
        first = ms_deform_attn(*inputs)
        second = ms_deform_attn(*inputs)
    lines = [r.getMessage() for r in caplog.records if "deformable attention: using" in r.getMessage()]
    assert len(lines) == 1 and "PyTorch" in lines[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_unknown_impl_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown .* 'cudnn'.*MODEL.UP2.MSDA_IMPL"):
        ms_deform_attn(*_good_inputs(), impl="cudnn")
    with pytest.raises(ValueError, match="impl must be one of"):
        MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, impl="fast")


def test_unavailable_cuda_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(msda_module, "_extension", lambda: None)
    with pytest.raises(MSDAUnavailableError, match="FORCE_CUDA=1 pip install -e . --no-build-isolation"):
        ms_deform_attn(*_good_inputs(), impl="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(msda_module, "_triton_import_error", lambda: None)
    with pytest.raises(MSDAUnavailableError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        ms_deform_attn(*_good_inputs(), impl="triton")
    monkeypatch.setattr(msda_module, "_triton_import_error", lambda: "No module named 'triton'")
    with pytest.raises(MSDAUnavailableError, match="pip install triton"):
        ms_deform_attn(*_good_inputs(), impl="triton")


# ------------------------------------------------------------------------------------------- module
def _module_inputs(seed=0, d_model=16, heads=2, points=2, shapes=((6, 8), (3, 4)), batch=2, queries=5, boxes=False):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = MSDeformAttn(d_model=d_model, n_levels=len(shapes), n_heads=heads, n_points=points, impl="pytorch")
    with torch.no_grad():  # non-trivial offsets and attention
        layer.sampling_offsets.weight.normal_(0, 0.5, generator=gen)
        layer.attention_weights.weight.normal_(0, 0.5, generator=gen)
    spatial_shapes, level_start_index, num_values = level_layout(list(shapes))
    query = torch.randn(batch, queries, d_model, generator=gen)
    if boxes:
        reference = torch.cat([torch.rand(batch, queries, len(shapes), 2, generator=gen),
                               0.1 + 0.3 * torch.rand(batch, queries, len(shapes), 2, generator=gen)], -1)
    else:
        reference = torch.rand(batch, queries, len(shapes), 2, generator=gen)
    flatten = torch.randn(batch, num_values, d_model, generator=gen)
    return layer, (query, reference, flatten, spatial_shapes, level_start_index)


def test_module_parameters_and_initialisation():
    layer = MSDeformAttn()
    names = {name for name, _ in layer.named_parameters()}
    assert names == {f"{lin}.{p}" for lin in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
                     for p in ("weight", "bias")}
    assert layer.sampling_offsets.weight.shape == (8 * 4 * 4 * 2, 256)
    assert layer.attention_weights.weight.shape == (8 * 4 * 4, 256)
    assert layer.sampling_offsets.weight.abs().max() == 0
    assert layer.attention_weights.weight.abs().max() == 0 and layer.attention_weights.bias.abs().max() == 0
    assert layer.value_proj.bias.abs().max() == 0 and layer.output_proj.bias.abs().max() == 0
    bound = math.sqrt(6.0 / (256 + 256))  # xavier uniform
    assert layer.value_proj.weight.abs().max() <= bound and layer.value_proj.weight.std() > bound / 3
    bias = layer.sampling_offsets.bias.view(8, 4, 4, 2)
    # head 0 points right, head 2 down (+y), head 1 diagonally, head 4 left; point p at distance p + 1
    for head, direction in [(0, (1.0, 0.0)), (1, (1.0, 1.0)), (2, (0.0, 1.0)), (4, (-1.0, 0.0))]:
        for p in range(4):
            expected = torch.tensor(direction) * (p + 1)
            torch.testing.assert_close(bias[head, 2, p], expected, atol=1e-6, rtol=0)


def test_module_shapes_and_point_reference_semantics():
    layer, inputs = _module_inputs(seed=1)
    query, reference, flatten, spatial_shapes, level_start_index = inputs
    out = layer(*inputs)
    assert out.shape == query.shape
    n, lq, _ = query.shape
    value = layer.value_proj(flatten).view(n, -1, 2, 8)
    offsets = layer.sampling_offsets(query).view(n, lq, 2, 2, 2, 2)
    weights = layer.attention_weights(query).view(n, lq, 2, 4).softmax(-1).view(n, lq, 2, 2, 2)
    wh = torch.tensor([[8.0, 6.0], [4.0, 3.0]])  # (W, H) per level
    locations = reference[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    expected = layer.output_proj(naive_ms_deform_attn(value.double(), spatial_shapes, locations.double(),
                                                      weights.double()).float())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_module_box_reference_semantics():
    layer, inputs = _module_inputs(seed=2, boxes=True)
    query, reference, flatten, spatial_shapes, level_start_index = inputs
    out = layer(*inputs)
    n, lq, _ = query.shape
    value = layer.value_proj(flatten).view(n, -1, 2, 8)
    offsets = layer.sampling_offsets(query).view(n, lq, 2, 2, 2, 2)
    weights = layer.attention_weights(query).view(n, lq, 2, 4).softmax(-1).view(n, lq, 2, 2, 2)
    centre, size = reference[:, :, None, :, None, :2], reference[:, :, None, :, None, 2:]
    locations = centre + offsets / 2 * size * 0.5  # offsets in units of half the box size / P (P = 2)
    expected = layer.output_proj(naive_ms_deform_attn(value.double(), spatial_shapes, locations.double(),
                                                      weights.double()).float())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_module_padding_mask_zeroes_masked_values():
    layer, inputs = _module_inputs(seed=3)
    query, reference, flatten, spatial_shapes, level_start_index = inputs
    mask = torch.zeros(flatten.shape[:2], dtype=torch.bool)
    mask[0, 30:] = True
    mask[1, ::3] = True
    out = layer(query, reference, flatten, spatial_shapes, level_start_index, input_padding_mask=mask)
    # masked positions contribute exactly zero: garbage there changes nothing ...
    garbage = flatten.masked_fill(mask[..., None], 1e4)
    torch.testing.assert_close(layer(query, reference, garbage, spatial_shapes, level_start_index, mask), out,
                               rtol=0, atol=0)
    # ... and equals the value_proj output zeroed there by hand
    n, lq, _ = query.shape
    value = layer.value_proj(flatten).masked_fill(mask[..., None], 0.0).view(n, -1, 2, 8)
    offsets = layer.sampling_offsets(query).view(n, lq, 2, 2, 2, 2)
    weights = layer.attention_weights(query).view(n, lq, 2, 4).softmax(-1).view(n, lq, 2, 2, 2)
    wh = torch.tensor([[8.0, 6.0], [4.0, 3.0]])
    locations = reference[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    expected = layer.output_proj(ms_deform_attn(value.contiguous(), spatial_shapes, level_start_index,
                                                locations.contiguous(), weights.contiguous()))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, layer(*inputs))


def test_module_rejects_bad_shapes():
    layer, (query, reference, flatten, spatial_shapes, level_start_index) = _module_inputs()
    with pytest.raises(ValueError, match=r"reference_points must be .*got \(2, 5, 2, 3\)"):
        layer(query, torch.rand(2, 5, 2, 3), flatten, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match=r"expected 2 levels"):
        layer(query, reference, flatten, spatial_shapes[:1], level_start_index[:1])
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)


def test_checkpoint_state_dict_round_trip():
    layer, inputs = _module_inputs(seed=6)
    clone = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(*inputs), layer(*inputs), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ CUDA
def _cuda_extension_built():
    return torch.cuda.is_available() and msda_module._extension() is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-10)])
def test_gpu_implementations_match_pytorch(impl, dtype, tol):
    if impl == "cuda" and not _cuda_extension_built():
        pytest.skip("the MultiScaleDeformableAttention extension is not built (FORCE_CUDA=1 pip install -e .)")
    if impl == "triton" and msda_module._triton_import_error() is not None:
        pytest.skip("triton is not importable")
    for channels in (8, 5, 64):  # warp-reduced, atomic and multi-warp paths of the CUDA backward
        inputs = random_inputs([(12, 17), (6, 9), (3, 5)], batch=2, queries=33, heads=3, channels=channels,
                               points=4, seed=7)
        value, spatial_shapes, level_start_index, locations, weights = (t.cuda() for t in inputs)
        coord = torch.float64 if dtype == torch.float64 else torch.float32
        args = (value.to(dtype), spatial_shapes, level_start_index, locations.to(coord), weights.to(coord))
        got = _forward_backward(lambda *a: ms_deform_attn(*a, impl=impl), *args)
        expected = _forward_backward(lambda *a: ms_deform_attn(*a, impl="pytorch"), value, spatial_shapes,
                                     level_start_index, locations, weights)
        for name, g, e in zip(("output", "value", "locations", "weights"), got, expected):
            error = (g.double() - e).abs().max() / e.abs().max()
            assert error < tol, f"{impl} {dtype} D={channels} {name}: relative error {error:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_prefers_extension_then_triton():
    expected = "cuda" if _cuda_extension_built() else (
        "triton" if msda_module._triton_import_error() is None else "pytorch")
    assert resolve_msda_impl("auto", torch.device("cuda")) == expected
