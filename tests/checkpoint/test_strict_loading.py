"""Strict ``MODEL.WEIGHTS`` loading (up2.checkpoint.strict_loading): a torchvision state dict, an up2
checkpoint of another width and a truncated file are refused naming the file and the keys; converter
outputs load as the partial checkpoints they declare; ``WEIGHTS_STRICT False`` is Detectron2's loading."""
import logging
import re

import pytest
import torch
from detectron2.modeling import build_model

import up2.modeling  # noqa: F401
from up2.checkpoint import AtomicCheckpointer
from up2.checkpoint.conversion import convert_state_dict, save_converted
from up2.checkpoint.strict_loading import (INITIALISED_PREFIXES_KEY, IncompatibleCheckpointError,
                                           UnreadableCheckpointError, save_partial_checkpoint)

torchvision = pytest.importorskip("torchvision")


def _tiny_up2(cfg, seed=0, **changes):
    """The tiny UniPerceiverV2 with a FrozenBN ResNet-18 built as torchvision's (stride in the 3x3 conv)."""
    cfg = cfg.clone()
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.RESNETS.STRIDE_IN_1X1 = "FrozenBN", False
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            node = getattr(node, parent)
        setattr(node, leaf, value)
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.fixture(scope="module")
def tiny_model_cfg(tiny_text_dirs, up2_cfg_factory):
    return up2_cfg_factory(*tiny_text_dirs)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_cfg):
    return _tiny_up2(tiny_model_cfg)


def _parameters(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_torchvision_state_dict_is_refused_naming_the_file_and_keys(tiny_model, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    num_model_tensors = len([k for k in tiny_model.state_dict() if not k.endswith("num_batches_tracked")])
    with pytest.raises(IncompatibleCheckpointError) as error:
        AtomicCheckpointer(tiny_model).load(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} does not fit the model")
    assert f"{num_model_tensors} model tensor(s) missing from it: image_encoder." in message
    assert re.search(r"\d+ tensor\(s\) in it that the model does not have: conv1\.weight, bn1\.weight", message)
    assert "python -m up2.checkpoint.convert" in message and "MODEL.UP2.WEIGHTS_STRICT False" in message


def test_checkpoint_of_another_width_is_refused_and_loads_leniently_on_request(tiny_model_cfg, tiny_model, tmp_path,
                                                                                caplog):
    wider = _tiny_up2(tiny_model_cfg, seed=1, **{"MODEL.UP2.DECODER.FFN_DIM": 96})
    AtomicCheckpointer(wider, save_dir=str(tmp_path)).save("wider")
    path = tmp_path / "wider.pth"
    reshaped = [k for k, v in wider.state_dict().items() if v.shape != tiny_model.state_dict()[k].shape]
    assert reshaped and all("decoder" in k for k in reshaped)
    before = _parameters(tiny_model)
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(str(path))) as error:
        AtomicCheckpointer(tiny_model).load(str(path))
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())  # refused: nothing loaded
    message = str(error.value)
    saved, own = tuple(wider.state_dict()[reshaped[0]].shape), tuple(tiny_model.state_dict()[reshaped[0]].shape)
    assert f"{len(reshaped)} tensor(s) with another shape: {reshaped[0]} (checkpoint {saved} vs model {own})" in message
    assert "missing" not in message and "does not have" not in message

    with caplog.at_level(logging.WARNING):
        AtomicCheckpointer(tiny_model, strict=False).load(str(path))  # Detectron2's behaviour: what fits loads
    after = tiny_model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in reshaped)
    loaded = [k for k in after if k not in reshaped and not torch.equal(after[k], before[k])]
    assert loaded and all(torch.equal(after[k], wider.state_dict()[k]) for k in loaded)
    assert "Skip loading parameter" in caplog.text


def test_truncated_and_foreign_files_are_named(tiny_model, tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": tiny_model.state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UnreadableCheckpointError, match=re.escape(str(truncated)) + ".*truncated"):
        AtomicCheckpointer(tiny_model).load(str(truncated))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UnreadableCheckpointError, match=re.escape(str(text)) + ".*torch.save"):
        AtomicCheckpointer(tiny_model, strict=False).load(str(text))  # unreadable is an error in either mode
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(UnreadableCheckpointError, match=re.escape(str(listed)) + " holds no state dict"):
        AtomicCheckpointer(tiny_model).load(str(listed))
    bad_declaration = tmp_path / "declared.pth"
    torch.save({"model": tiny_model.state_dict(), INITIALISED_PREFIXES_KEY: "image_encoder."}, bad_declaration)
    with pytest.raises(UnreadableCheckpointError, match=f"{INITIALISED_PREFIXES_KEY}' must be a list"):
        AtomicCheckpointer(tiny_model).load(str(bad_declaration))


def test_own_checkpoint_loads_bitwise(tiny_model_cfg, tiny_model, tmp_path):
    AtomicCheckpointer(tiny_model, save_dir=str(tmp_path)).save("own")
    other = _tiny_up2(tiny_model_cfg)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    AtomicCheckpointer(other).load(str(tmp_path / "own.pth"))
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_converter_output_initialises_the_backbone_only(tiny_model_cfg, tmp_path):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None).state_dict()
    converted, _ = convert_state_dict("torchvision_resnet", source)
    path = tmp_path / "r18_up2.pth"
    save_converted(str(path), converted, "torchvision_resnet")
    assert torch.load(path, weights_only=True)[INITIALISED_PREFIXES_KEY] == ["image_encoder.backbone."]

    model = _tiny_up2(tiny_model_cfg)
    before = _parameters(model)
    AtomicCheckpointer(model).load(str(path))
    state = model.state_dict()
    assert torch.equal(state["image_encoder.backbone.res4.1.conv2.weight"], source["layer3.1.conv2.weight"])
    assert all(torch.equal(state[k], v) for k, v in converted.items())
    untouched = [k for k in state if not k.startswith("image_encoder.backbone.")]
    assert untouched and all(torch.equal(state[k], before[k]) for k in untouched)

    # converted for another model (ProposalDetector's "backbone." prefix): nothing fits, an error
    wrong = tmp_path / "wrong_prefix.pth"
    save_converted(str(wrong), convert_state_dict("torchvision_resnet", source, prefix="backbone.")[0],
                   "torchvision_resnet", prefix="backbone.")
    with pytest.raises(IncompatibleCheckpointError, match=r"declares that it initialises the tensors under "
                                                          r"\['backbone\.'\][\s\S]*does not have: backbone\.stem"):
        AtomicCheckpointer(model).load(str(wrong))


def test_declared_part_must_be_complete(tiny_model, tmp_path):
    backbone = {k: v for k, v in tiny_model.state_dict().items() if k.startswith("image_encoder.backbone.")}
    dropped = sorted(backbone)[0]
    del backbone[dropped]
    path = tmp_path / "partial.pth"
    save_partial_checkpoint(str(path), backbone, ["image_encoder.backbone."], author="test")
    with pytest.raises(IncompatibleCheckpointError, match=rf"1 model tensor\(s\) missing from it: {re.escape(dropped)}"):
        AtomicCheckpointer(tiny_model).load(str(path))


def test_pruned_timm_layers_are_not_unexpected(tmp_path):
    timm = pytest.importorskip("timm")
    from up2.modeling.image_encoder.backbone import TimmBackbone

    backbone = TimmBackbone("tf_efficientnet_lite0", ["res2", "res3", "res4"])
    assert any(k.startswith("model.conv_head.") for k in backbone.pruned_checkpoint_keys)
    whole = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).state_dict()
    path = tmp_path / "lite0.pth"
    save_partial_checkpoint(str(path), {f"model.{k}": v for k, v in whole.items()}, ["model."], author="test")
    AtomicCheckpointer(backbone).load(str(path))  # the pruned blocks and head are no error
    assert torch.equal(backbone.model.conv_stem.weight, whole["conv_stem.weight"])

    extra = {f"model.{k}": v for k, v in whole.items()}
    extra["model.blocks.9.0.conv_pw.weight"] = torch.zeros(1)
    save_partial_checkpoint(str(path), extra, ["model."], author="test")
    with pytest.raises(IncompatibleCheckpointError, match=r"1 tensor\(s\) in it that the model does not have: "
                                                          r"model\.blocks\.9\.0\.conv_pw\.weight"):
        AtomicCheckpointer(backbone).load(str(path))
