"""demo/demo.py on real photos (scikit-image's or matplotlib's sample images) with a tiny random
UniPerceiverV2 saved as a checkpoint: one PNG of the input's size per image and task, drawn over the photo;
missing and corrupt inputs are named and skipped; an empty or repeated class name and an empty text are
usage errors before any model loads."""
import importlib.util
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import up2.modeling  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo", "demo.py")


def sample_photos():
    """Two real photos shipped by scikit-image, else by matplotlib; [] when neither is installed."""
    try:
        import skimage

        folder, names = os.path.join(os.path.dirname(skimage.__file__), "data"), ["astronaut.png", "chelsea.png"]
    except ImportError:
        import matplotlib

        folder = os.path.join(matplotlib.get_data_path(), "sample_data")
        names = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"]
    paths = [os.path.join(folder, n) for n in names]
    return [p for p in paths if os.path.isfile(p)]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("up2_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_text_dirs, up2_cfg_factory):
    """(config YAML, checkpoint, folder with the photos copied in)."""
    photos = sample_photos()
    if not photos:
        pytest.skip("neither scikit-image nor matplotlib sample photos are installed")
    root = tmp_path_factory.mktemp("demo")
    cfg = up2_cfg_factory(*tiny_text_dirs)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.DATASETS.UP2.IMAGE_SIZE = 128, 256, 128
    (root / "tiny.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, root / "model.pth")
    (root / "photos").mkdir()
    for path in photos:
        shutil.copy(path, root / "photos")
    return str(root / "tiny.yaml"), str(root / "model.pth"), str(root / "photos")


@pytest.fixture
def demo_log():
    """Records of the demo's logger (its own handler: independent of other loggers' propagation)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("up2.demo")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def args(setup, inputs, output, task, *extra, opts=()):
    config, weights, _ = setup
    return ["--config-file", config, "--input", *inputs, "--output", str(output), "--task", task, *extra,
            "--opts", "MODEL.WEIGHTS", weights, *opts]


TASK_ARGS = {
    "detection": ["--vocabulary", "person,flag,tie", "--confidence-threshold", "0"],
    "classification": ["--vocabulary", "person,cat,box,flag,tie,car"],
    "captioning": [],
    "retrieval": ["--texts", "a red circle above a blue square", "a green triangle"],
}


@pytest.mark.parametrize("task", list(TASK_ARGS))
def test_every_task_draws_on_each_photo(demo, setup, tmp_path, demo_log, task):
    photos = setup[2]
    # detection: 3 detections per image keep the Visualizer quick
    opts = ["MODEL.UP2.TEST.DETECTIONS_PER_IMAGE", "3"] if task == "detection" else []
    rc = demo.main(args(setup, [os.path.join(photos, "*")], tmp_path, task, *TASK_ARGS[task], opts=opts))
    assert rc == 0
    for name in sorted(os.listdir(photos)):
        out = tmp_path / (os.path.splitext(name)[0] + ".png")
        assert out.is_file(), f"no visualisation for {name}"
        original = np.asarray(Image.open(os.path.join(photos, name)).convert("RGB"), dtype=np.int16)
        drawn = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
        assert drawn.shape == original.shape
        changed = (np.abs(drawn - original).max(-1) > 40).mean()  # pixels covered by drawings
        assert 0.001 < changed, f"{task}: {out} looks like the input"
        if task != "detection":  # (random weights predict masks over most of the image)
            assert (np.abs(drawn - original).max(-1) <= 3).mean() > 0.5, f"{task}: {out} hides the photo"
    results = [r.getMessage() for r in demo_log if " -> " in r.getMessage()]
    assert len(results) == len(os.listdir(photos))
    if task == "retrieval":
        assert all("1. a " in m and "2. a " in m for m in results)
    if task == "classification":
        assert all(m.count("%") == 5 for m in results)  # top-5 probabilities


def bad_inputs(setup, tmp_path):
    """[missing, photo 0, corrupt, photo 1]."""
    photos = [os.path.join(setup[2], n) for n in sorted(os.listdir(setup[2]))]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(photos[0], "rb").read()[:300])  # truncated JPEG / PNG
    return [str(tmp_path / "missing.jpg"), photos[0], str(corrupt), photos[1]]


def stems(paths):
    return sorted(os.path.splitext(os.path.basename(p))[0] + ".png" for p in paths)


def test_missing_and_corrupt_inputs_are_named_and_skipped(demo, setup, tmp_path, demo_log, capsys):
    missing, photo0, corrupt, photo1 = inputs = bad_inputs(setup, tmp_path)
    assert demo.main(args(setup, inputs, tmp_path / "out", "classification", "--vocabulary", "a,b")) == 0
    errors = [r.getMessage() for r in demo_log if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and missing in errors[0] and corrupt in errors[1], errors
    assert sorted(os.listdir(tmp_path / "out")) == stems([photo0, photo1])
    assert "wrote 2 of 4" in capsys.readouterr().out


@pytest.mark.slow
def test_command_line(setup, tmp_path):
    """``python demo/demo.py`` end to end: logging to the console, exit status."""
    missing, photo0, corrupt, photo1 = inputs = bad_inputs(setup, tmp_path)
    result = subprocess.run([sys.executable, DEMO, *args(setup, inputs, tmp_path / "out", "captioning")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line]
    assert any(missing in line for line in errors) and any(corrupt in line for line in errors), errors
    assert sorted(os.listdir(tmp_path / "out")) == stems([photo0, photo1])
    assert "wrote 2 of 4" in result.stdout
    result = subprocess.run([sys.executable, DEMO, *args(setup, [missing], tmp_path / "none", "captioning")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1 and missing in result.stdout + result.stderr


def test_exit_code_when_every_input_fails(demo, setup, tmp_path, demo_log):
    rc = demo.main(args(setup, [str(tmp_path / "nope.jpg"), str(tmp_path / "none_*.png")], tmp_path / "o",
                        "captioning"))
    assert rc == 1
    errors = [r.getMessage() for r in demo_log if r.levelno >= logging.ERROR]
    assert any("nope.jpg" in m for m in errors) and any("none_*.png" in m for m in errors)


@pytest.mark.parametrize("vocabulary, message", [("", "--vocabulary is empty"), (" , ", "--vocabulary is empty"),
                                                 ("cat,,dog", "empty class name at position(s) [2]")])
def test_empty_vocabulary_rejected(demo, setup, tmp_path, capsys, vocabulary, message):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(args(setup, [setup[2]], tmp_path, "detection", "--vocabulary", vocabulary))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--task", "detection", "--vocabulary", "cat,dog,cat"], "names ['cat'] more than once"),
    (["--task", "classification", "--vocabulary", "cat, dog,dog ,cat"], "names ['cat', 'dog'] more than once"),
    (["--task", "retrieval", "--texts", "a dog", ""], "--texts has an empty text at position(s) [2]"),
    (["--task", "retrieval", "--texts", "  ", "a dog", "\t"], "--texts has an empty text at position(s) [1, 3]"),
])
def test_bad_text_arguments_are_usage_errors_before_any_model_loads(demo, tmp_path, capsys, monkeypatch, extra,
                                                                     message):
    monkeypatch.setattr(demo, "UP2Predictor", lambda cfg: pytest.fail("the model was loaded before the check"))
    monkeypatch.setattr(demo, "setup_cfg", lambda args: pytest.fail("the config was read before the check"))
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--config-file", str(tmp_path / "unread.yaml"), "--input", str(tmp_path / "unread.jpg"),
                   "--output", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
