"""The Triton kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1), against the PyTorch
implementation, forward and backward.

The interpreter must be switched on before ``triton`` decorates the kernels, so the checks run in a
subprocess: the pytest process and its other tests keep the normal Triton. Tolerances: fp32 and fp64
relative 1e-5 (both accumulate in fp32 / fp64, only the summation order differs); bf16 relative 2e-2
of the largest magnitude (value and output rounded to bf16's 8-bit mantissa, both sides accumulate
in fp32)."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")

SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, os.path.join(sys.argv[1], "tests", "layers"))
    import torch
    import up2  # noqa: F401
    from up2.layers import MSDeformAttn, ms_deform_attn, resolve_msda_impl
    from test_ms_deform_attn import _forward_backward, _module_inputs, random_inputs

    results = {"auto_on_cpu": resolve_msda_impl("auto", torch.device("cpu"))}
    cases = [  # (name, level shapes, channels, value dtype)
        ("fp32_three_levels", [(6, 9), (3, 5), (1, 2)], 8, torch.float32),
        ("fp32_single_level_d3", [(4, 7)], 3, torch.float32),
        ("fp64", [(5, 4), (2, 3)], 4, torch.float64),
        ("bf16", [(6, 9), (3, 5)], 8, torch.bfloat16),
        ("fp16", [(6, 9), (3, 5)], 8, torch.float16),
    ]
    for name, shapes, channels, dtype in cases:
        inputs = random_inputs(shapes, batch=2, queries=5, heads=2, channels=channels, points=2, seed=11)
        value, spatial_shapes, level_start_index, locations, weights = inputs
        coord = torch.float64 if dtype == torch.float64 else torch.float32
        args = (value.to(dtype), spatial_shapes, level_start_index, locations.to(coord), weights.to(coord))
        got = _forward_backward(lambda *a: ms_deform_attn(*a, impl="triton"), *args)
        ref = _forward_backward(lambda *a: ms_deform_attn(*a, impl="pytorch"), *args)
        results[name] = {
            "dtypes": [str(t.dtype) for t in got],
            "errors": [float((g.double() - r.double()).abs().max() / r.double().abs().max()) for g, r in zip(got, ref)],
        }
    for boxes in (False, True):
        layer, module_inputs = _module_inputs(seed=12, boxes=boxes)
        out_pytorch = layer(*module_inputs)
        layer.impl = "triton"
        out_triton = layer(*module_inputs)
        results[f"module_boxes_{boxes}"] = float((out_triton - out_pytorch).abs().max() / out_pytorch.abs().max())
    print("RESULTS " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted_results():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, root], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def test_auto_stays_pytorch_on_cpu_even_when_interpreting(interpreted_results):
    assert interpreted_results["auto_on_cpu"] == "pytorch"


@pytest.mark.parametrize("case,tol", [("fp32_three_levels", 1e-5), ("fp32_single_level_d3", 1e-5), ("fp64", 1e-5),
                                      ("bf16", 2e-2), ("fp16", 2e-3)])
def test_triton_matches_pytorch_forward_and_backward(interpreted_results, case, tol):
    result = interpreted_results[case]
    value_dtype = {"fp64": "torch.float64", "bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(
        case, "torch.float32")
    coord_dtype = "torch.float64" if case == "fp64" else "torch.float32"
    assert result["dtypes"] == [value_dtype, value_dtype, coord_dtype, coord_dtype]
    for name, error in zip(("output", "grad value", "grad locations", "grad weights"), result["errors"]):
        assert error < tol, f"{case} {name}: relative error {error:.2e} >= {tol}"


@pytest.mark.parametrize("boxes", [False, True])
def test_module_output_same_with_pytorch_and_triton(interpreted_results, boxes):
    assert interpreted_results[f"module_boxes_{boxes}"] < 1e-5
