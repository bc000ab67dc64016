"""Swin backbone wrapper: timm weights load by name; stages equal timm's own stage outputs."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import ShapeSpec, build_backbone

from up2.config import add_up2_config
from up2.modeling.image_encoder.backbone import SwinBackbone

timm = pytest.importorskip("timm")
NAME = "swin_tiny_patch4_window7_224"


def timm_stages(model, images):
    """Independent path: patch embedding then each stage, NHWC -> NCHW."""
    x = model.patch_embed(images)
    outputs = []
    for layer in model.layers:
        x = layer(x)
        outputs.append(x.permute(0, 3, 1, 2))
    return outputs


@pytest.fixture(scope="module")
def saved_timm_swin(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=10).eval()
    path = tmp_path_factory.mktemp("swin") / "swin_t.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def test_timm_state_dict_loads_by_name_and_features_match(saved_timm_swin):
    reference, path = saved_timm_swin
    backbone = SwinBackbone(NAME, ["res2", "res3", "res4", "res5"], weights=path).eval()
    for name, tensor in backbone.swin.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = backbone(images)
        expected = timm_stages(reference, images)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        torch.testing.assert_close(features[name], expected[i], rtol=1e-5, atol=1e-5)


def test_shapes_strides_and_non_square_inputs():
    backbone = SwinBackbone(NAME, ["res3", "res5"]).eval()
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {"res3": (192, 8), "res5": (768, 32)}
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 96, 160))
    assert features["res3"].shape == (1, 192, 12, 20)
    assert features["res5"].shape == (1, 768, 3, 5)


def test_built_from_config_by_backbone_name():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.UP2.BACKBONE.SWIN_NAME = NAME
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, SwinBackbone)
    assert list(backbone.output_shape()) == ["res2", "res3", "res4", "res5"]
    with pytest.raises(ValueError, match="res6"):
        SwinBackbone(NAME, ["res6"])
