"""The MoE layer's export path: while a graph is traced it computes the fused path's values with
out-of-place ops, and the exported ONNX graph gives them (the fused path writes into slices in place,
which tracing drops)."""
import numpy as np
import pytest
import torch

import up2  # noqa: F401
from up2.modeling.moe import (
    MODALITY_IMAGE, MODALITY_TEXT, SIDE_INPUT, ConditionalMoEFFN, build_routing_plan, make_attributes,
)

D, HIDDEN = 16, 24
IMAGE = make_attributes("detection", MODALITY_IMAGE, SIDE_INPUT, False)
TEXT = make_attributes("captioning", MODALITY_TEXT, SIDE_INPUT, True)


def _layer():
    torch.manual_seed(0)
    layer = ConditionalMoEFFN(D, HIDDEN, num_experts=4, top_k=2).eval()
    with torch.no_grad():  # make the gate sensitive to the attributes
        for p in layer.gate.parameters():
            p.normal_(0, 1.0)
    return layer


@pytest.mark.parametrize("segments", [[0] * 7, [0, 1, 1, 0, 1, 0, 0]], ids=["one_routing", "interleaved"])
def test_traceable_path_equals_fused_path(segments, monkeypatch):
    layer = _layer()
    attrs = torch.tensor([[IMAGE, TEXT]] * 2)
    seg = torch.tensor([segments] * 2)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    plan = build_routing_plan(attrs, seg)
    with torch.no_grad():
        fused, _ = layer(x, plan=plan)
        monkeypatch.setattr("up2.modeling.moe.layer.is_exporting", lambda: True)
        traced_form, _ = layer(x, plan=plan)
    torch.testing.assert_close(traced_form, fused, rtol=0, atol=1e-6)


def test_exported_layer_depends_on_its_input(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    layer = _layer()
    plan = build_routing_plan(torch.tensor([[IMAGE, TEXT]]), torch.tensor([[0, 0, 1, 1, 1, 0]]))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, plan=plan)[0]

    x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(2))
    path = str(tmp_path / "moe.onnx")
    with torch.no_grad():
        torch.onnx.export(Wrapper().eval(), (x,), path, input_names=["x"], dynamo=False, opset_version=17)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for seed in (2, 3):
            x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(seed))
            np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], layer(x, plan=plan)[0].numpy(),
                                       atol=1e-5)
