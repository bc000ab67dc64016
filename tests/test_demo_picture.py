"""tools/demo_picture.py with a tiny random UniPerceiverV2 saved as a checkpoint, on a tiny generated
``shapes`` dataset: one PNG, a 1 x 3 grid of tiles (image x2 + text band), not blank; missing weights and
datasets are named."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import up2.modeling  # noqa: F401
from up2.data.datasets import register_all_shapes
from up2.data.shapes import generate_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "dpshapes"
IMAGE_SIZE = 128  # of the generated images


@pytest.fixture(scope="module")
def demo_picture():
    spec = importlib.util.spec_from_file_location("up2_demo_picture", os.path.join(ROOT, "tools", "demo_picture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_text_dirs, up2_cfg_factory):
    """(config YAML, checkpoint) of a tiny random model whose classification vocabulary is the shapes one."""
    root = tmp_path_factory.mktemp("demo_picture")
    generate_shapes(str(root / "shapes"), seed=0, num_train=4, num_val=3, image_size=IMAGE_SIZE, vocab_size=300,
                    workers=1)
    register_all_shapes(str(root / "shapes"), prefix=PREFIX)
    cfg = up2_cfg_factory(*tiny_text_dirs)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.DATASETS.UP2.IMAGE_SIZE = 128, 256, 128
    cfg.MODEL.UP2.TEST.DETECTIONS_PER_IMAGE = 5
    cfg.DATASETS.UP2.TASKS = [
        {"NAME": "detection", "TYPE": "detection", "TRAIN_DATASETS": [f"{PREFIX}_det_train"]},
        {"NAME": "classification", "TYPE": "classification", "TRAIN_DATASETS": [f"{PREFIX}_cls_train"]},
        {"NAME": "captioning", "TYPE": "captioning", "TRAIN_DATASETS": [f"{PREFIX}_caption_train"]},
    ]
    (root / "tiny.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, root / "model.pth")
    return str(root / "tiny.yaml"), str(root / "model.pth")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads make the model calls ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_picture_is_a_grid_of_drawn_tiles(demo_picture, setup, tmp_path, one_thread):
    config, weights = setup
    out = tmp_path / "sub" / "demo_predictions.png"
    written = demo_picture.main(["--config-file", config, "--weights", weights, "--dataset", f"{PREFIX}_det_val",
                                 "--num-images", "3", "--score-threshold", "0", "--output", str(out)])
    assert written == str(out) and out.is_file()
    picture = np.asarray(Image.open(out).convert("RGB"))
    m = demo_picture
    cell_w, cell_h = IMAGE_SIZE * m.SCALE, IMAGE_SIZE * m.SCALE + m.BAND_HEIGHT
    assert picture.shape == (cell_h + 2 * m.GAP, 3 * cell_w + 4 * m.GAP, 3)  # 1 row x 3 columns
    for column in range(3):
        x = m.GAP + column * (cell_w + m.GAP)
        tile = picture[m.GAP:m.GAP + cell_h, x:x + cell_w].astype(np.int16)
        image, band = tile[:-m.BAND_HEIGHT], tile[-m.BAND_HEIGHT:]
        assert image.std() > 10, f"tile {column}: blank image"
        assert (band.max(-1) < 100).mean() > 0.01, f"tile {column}: no text under the image"
        assert (band.min(-1) > 240).mean() > 0.5, f"tile {column}: the band is not white"


def test_missing_weights_and_dataset_are_named(demo_picture, setup, tmp_path):
    config, weights = setup
    base = ["--config-file", config, "--output", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit, match="missing.pth"):
        demo_picture.main(base + ["--weights", str(tmp_path / "missing.pth"), "--dataset", f"{PREFIX}_det_val"])
    with pytest.raises(SystemExit, match="nope_det_val"):
        demo_picture.main(base + ["--weights", weights, "--dataset", "nope_det_val"])
    assert not (tmp_path / "x.png").exists()
