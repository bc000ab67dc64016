"""Weight conversion from torchvision and timm: converted ResNet / Swin weights give the same features as the
source models; checkpoint files and bad inputs. MaskDINO checkpoints: ``test_convert_maskdino.py``."""
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import ShapeSpec, build_resnet_backbone

import up2.modeling  # noqa: F401
from up2.checkpoint.conversion import compare_with_model, convert_state_dict, save_converted
from up2.checkpoint.convert import main
from up2.checkpoint.state_dict_files import load_checkpoint_file
from up2.modeling.image_encoder.backbone import SwinBackbone

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")
SWIN = "swin_tiny_patch4_window7_224"
STAGES = ["res2", "res3", "res4", "res5"]


# ------------------------------------------------------------------------------------- ResNet
def _random_torchvision_resnet(depth: int):
    torch.manual_seed(depth)
    model = getattr(torchvision.models, f"resnet{depth}")().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model


def _torchvision_stages(model, images):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    outputs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("depth,norm", [(50, "FrozenBN"), (18, "BN")])
def test_torchvision_resnet_matches_detectron2_resnet(tmp_path, depth, norm):
    reference = _random_torchvision_resnet(depth)
    path = tmp_path / "resnet.pth"
    torch.save(reference.state_dict(), path)
    converted, unmatched = convert_state_dict("torchvision_resnet", load_checkpoint_file(str(path)), prefix="")
    assert set(unmatched) == {"fc.weight", "fc.bias"} | {k for k in reference.state_dict()
                                                         if k.endswith("num_batches_tracked")}
    assert torch.equal(converted["stem.conv1.norm.running_var"], reference.bn1.running_var)
    assert torch.equal(converted["res3.0.shortcut.norm.running_mean"], reference.layer2[0].downsample[1].running_mean)
    assert torch.equal(converted["res5.1.conv2.weight"], reference.layer4[1].conv2.weight)

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM, cfg.MODEL.RESNETS.STRIDE_IN_1X1 = depth, norm, False
    cfg.MODEL.RESNETS.OUT_FEATURES = STAGES
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    result = backbone.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    assert compare_with_model(converted, backbone) == {"missing": [], "unexpected": [], "shape_mismatch": []}

    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = backbone(images)
        expected = _torchvision_stages(reference, images)
    for name, ref in zip(STAGES, expected):
        torch.testing.assert_close(features[name], ref, rtol=1e-5, atol=1e-5)


def test_resnet_default_prefix_and_custom_prefix():
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.downsample.0.weight": torch.zeros(256, 64, 1, 1)}
    converted, _ = convert_state_dict("torchvision_resnet", state)
    assert sorted(converted) == ["image_encoder.backbone.res2.0.shortcut.weight",
                                 "image_encoder.backbone.stem.conv1.weight"]
    converted, _ = convert_state_dict("torchvision_resnet", {"model": state}, prefix="backbone.")
    assert "backbone.stem.conv1.weight" in converted


# --------------------------------------------------------------------------------------- Swin
def _timm_stages(model, images):
    x = model.patch_embed(images)
    outputs = []
    for layer in model.layers:
        x = layer(x)
        outputs.append(x.permute(0, 3, 1, 2))
    return outputs


@pytest.fixture(scope="module")
def swin_backbone():
    return SwinBackbone(SWIN, STAGES).eval()


def test_timm_swin_converted_features_match_timm(timm_swin, swin_backbone):
    converted, unmatched = convert_state_dict("timm_swin", timm_swin.state_dict(), prefix="swin.")
    assert unmatched == ["head.fc.weight", "head.fc.bias"]
    swin_backbone.load_state_dict(converted, strict=True)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = swin_backbone(images)
        expected = _timm_stages(timm_swin, images)
    for name, ref in zip(STAGES, expected):
        torch.testing.assert_close(features[name], ref, rtol=1e-5, atol=1e-5)
    default, _ = convert_state_dict("timm_swin", timm_swin.state_dict())
    assert sorted(default) == sorted("image_encoder.backbone." + k for k in converted)


def test_official_layout_converts_through_the_cli(tmp_path, timm_swin, official_swin_checkpoint, swin_backbone):
    source, output = tmp_path / "swin_official.pth", tmp_path / "converted.pth"
    torch.save(official_swin_checkpoint, source)
    assert main(["--source", "official_swin", "--input", str(source), "--output", str(output), "--prefix", "swin.",
                 "--report"]) == 0
    saved = torch.load(output, weights_only=True)
    assert set(saved) == {"model", "__author__", "matching_heuristics", "initialised_prefixes"}
    assert saved["initialised_prefixes"] == ["swin."]
    swin_backbone.load_state_dict(saved["model"], strict=True)
    for key, value in timm_swin.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(saved["model"]["swin." + key], value), key
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_timm_layers_underscore_naming(timm_swin):
    renamed = {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in timm_swin.state_dict().items()}
    converted, _ = convert_state_dict("timm_swin", renamed, prefix="")
    assert torch.equal(converted["layers.1.downsample.reduction.weight"],
                       timm_swin.state_dict()["layers.1.downsample.reduction.weight"])
    assert "layers.0.downsample.reduction.weight" not in converted


# ------------------------------------------------------------------------------------- errors
def test_bad_inputs_get_clear_errors(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(text)) + ".*not a PyTorch checkpoint"):
        load_checkpoint_file(str(text))
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match=re.escape(str(listed)) + ".*expected a state dict"):
        load_checkpoint_file(str(listed))
    mixed = tmp_path / "mixed.pth"
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, mixed)
    with pytest.raises(ValueError, match="'epoch' is a int"):
        load_checkpoint_file(str(mixed))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint_file(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown source 'resnet'.*torchvision_resnet"):
        convert_state_dict("resnet", {"conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="none of the 1 keys"):
        convert_state_dict("timm_swin", {"conv1.weight": torch.zeros(1)})


def test_non_tensor_pickles_need_trust(tmp_path):
    path = tmp_path / "with_object.pth"
    torch.save({"model": {"conv1.weight": torch.ones(2)}, "config": re.compile("x")}, path)
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_checkpoint_file(str(path))
    assert torch.equal(load_checkpoint_file(str(path), trust_pickle=True)["conv1.weight"], torch.ones(2))
    out = tmp_path / "out.pth"
    save_converted(str(out), {"a": torch.ones(1)}, "timm_swin")
    assert torch.load(out, weights_only=True)["model"]["a"].item() == 1.0
