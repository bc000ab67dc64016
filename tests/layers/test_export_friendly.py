"""Export-friendly forms: adaptive average pooling as two matrix products, and the deformable attention's
grid-sample form while a graph is traced; both give the eager values, and onnxruntime gives them too."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import up2  # noqa: F401
from up2.layers import adaptive_avg_pool2d, ms_deform_attn
from up2.layers.export_friendly import adaptive_pool_matrix

ms_deform_attn_module = __import__("sys").modules["up2.layers.ms_deform_attn"]


@pytest.mark.parametrize("size,out", [((32, 32), 28), ((16, 24), 7), ((28, 28), 28), ((9, 5), (4, 3))])
def test_pooling_matrices_give_adaptive_average_pooling(size, out, monkeypatch):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    expected = F.adaptive_avg_pool2d(x, out)
    torch.testing.assert_close(adaptive_avg_pool2d(x, out), expected)  # eager: F itself
    monkeypatch.setattr("up2.layers.export_friendly.is_exporting", lambda: True)
    torch.testing.assert_close(adaptive_avg_pool2d(x, out), expected, rtol=0, atol=1e-6)


def test_pooling_matrix_rows_average_their_bins():
    matrix = adaptive_pool_matrix(5, 3)
    torch.testing.assert_close(matrix.sum(1), torch.ones(3))
    assert matrix[1].nonzero().flatten().tolist() == [1, 2, 3]  # bin 1 of 5 -> 3: [floor(5/3), ceil(10/3))


def test_pooling_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Pool(torch.nn.Module):
        def forward(self, x):
            return adaptive_avg_pool2d(x, 7)

    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "pool.onnx")
    torch.onnx.export(Pool(), (x,), path, input_names=["x"], dynamo=False, opset_version=17)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, F.adaptive_avg_pool2d(x, 7).numpy(), atol=1e-6)


def test_deformable_attention_uses_grid_sample_while_exporting(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    value = torch.randn(2, 60, 2, 4, generator=gen)
    locations = torch.rand(2, 5, 2, 2, 3, 2, generator=gen) * 1.2 - 0.1
    weights = torch.rand(2, 5, 2, 2, 3, generator=gen)
    eager = ms_deform_attn(value, shapes, starts, locations, weights, impl="pytorch")
    calls = []
    reference = ms_deform_attn_module.ms_deform_attn_grid_sample_reference
    monkeypatch.setattr(ms_deform_attn_module, "is_exporting", lambda: True)
    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn_grid_sample_reference",
                        lambda *args: calls.append(1) or reference(*args))
    exported_form = ms_deform_attn(value, shapes, starts, locations, weights, impl="pytorch")
    assert calls == [1]
    torch.testing.assert_close(exported_form, eager, rtol=0, atol=1e-5)
