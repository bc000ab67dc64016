"""ONNX export of the tiny model (detection and classification) through ``tools/deploy/export_onnx.py``,
run with onnxruntime (``up2.deploy.runtime``) and compared with the PyTorch model on `shapes` images.

Tolerances (fp32, CPU): scores and class probabilities within 1e-5; every detection has a PyTorch one
with the same class and its box within 1e-3 pixels, at the same rank or among those whose scores tie
within 1e-5 (the random tiny model ties often, and ties may come in either order); masks equal on at least
99.9 % of the pixels (a mask logit near the threshold may fall on either side).
"""
import importlib.util
import os
import socket

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from up2.data.datasets import register_all_shapes  # noqa: E402
from up2.data.mappers import CenterCrop, read_image  # noqa: E402
from up2.data.shapes import generate_shapes  # noqa: E402
from up2.deploy.graphs import build_export_graph  # noqa: E402
from up2.deploy.export import export_onnx  # noqa: E402
from up2.deploy.runtime import OnnxPredictor, preprocess_image, resize_bilinear  # noqa: E402
from up2.engine import UP2Predictor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "onnxshapes"
IMAGE_SIZE = 128
SCORE_TOL, BOX_TOL = 1e-5, 1e-3


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"up2_{name}", os.path.join(ROOT, "tools", "deploy", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_text_dirs, up2_cfg_factory):
    """(config YAML, checkpoint, cfg, val image paths) of the tiny random model on a 3-image `shapes`."""
    root = tmp_path_factory.mktemp("onnx_export")
    generate_shapes(str(root / "shapes"), seed=0, num_train=4, num_val=3, image_size=IMAGE_SIZE, vocab_size=300,
                    workers=1)
    register_all_shapes(str(root / "shapes"), prefix=PREFIX)
    cfg = up2_cfg_factory(*tiny_text_dirs)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.DATASETS.UP2.IMAGE_SIZE = IMAGE_SIZE, 256, 96
    cfg.MODEL.UP2.PROPOSER.FUSION_FEATURE_LEVELS = ["res4", "res5"]  # as the demo config: exported too
    cfg.DATASETS.UP2.TASKS = [
        {"NAME": "detection", "TYPE": "detection", "TRAIN_DATASETS": [f"{PREFIX}_det_train"],
         "TEST_DATASETS": [f"{PREFIX}_det_val"]},
        {"NAME": "classification", "TYPE": "classification", "TRAIN_DATASETS": [f"{PREFIX}_cls_train"]},
    ]
    (root / "tiny.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, root / "model.pth")
    cfg.MODEL.WEIGHTS = str(root / "model.pth")
    images = sorted(str(p) for p in (root / "shapes" / "images" / "val").iterdir())
    return str(root / "tiny.yaml"), str(root / "model.pth"), cfg, images


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    """task -> .onnx path, both exported by the CLI with every network connection refused."""
    config, weights, _, _ = setup
    out = tmp_path_factory.mktemp("onnx_models")
    tool = load_tool("export_onnx")
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"network access during export: {address}")

    paths = {}
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        for task in ("detection", "classification"):
            paths[task] = str(out / f"{task}.onnx")
            assert tool.main(["--config-file", config, "--task", task, "--output", paths[task],
                              "MODEL.WEIGHTS", weights]) == 0
    paths["network_attempts"] = attempts
    return paths


@pytest.fixture(scope="module")
def torch_predictor(setup):
    return UP2Predictor(setup[2])


def match_detections(got, expected):
    """Index into ``expected`` of each of ``got``'s detections: the same class and box among the detections
    whose score is within SCORE_TOL (tied scores may come in either order); -1 where none is."""
    matches, used = [], set()
    for score, cls, box in zip(got["scores"], got["classes"], got["boxes"]):
        candidates = [j for j in np.flatnonzero(np.abs(expected["scores"] - score) <= SCORE_TOL)
                      if j not in used and expected["classes"][j] == cls
                      and np.abs(expected["boxes"][j] - box).max() <= BOX_TOL]
        matches.append(candidates[0] if candidates else -1)
        used.update(candidates[:1])
    return np.array(matches)


@pytest.mark.slow
def test_detection_matches_pytorch(setup, exported, torch_predictor):
    assert exported["network_attempts"] == []
    predictor = OnnxPredictor(exported["detection"], num_threads=1)
    assert predictor.class_names == MetadataCatalog.get(f"{PREFIX}_det_val").thing_classes
    for path in setup[3]:
        image = read_image(path, "BGR")
        got = predictor(image)
        with torch.no_grad():
            expected = torch_predictor(image, "detection")["instances"]
        expected = {"scores": expected.scores.numpy(), "classes": expected.pred_classes.numpy(),
                    "boxes": expected.pred_boxes.tensor.numpy(), "masks": expected.pred_masks.numpy()}
        assert len(got["scores"]) == len(expected["scores"]) > 0
        np.testing.assert_allclose(got["scores"], expected["scores"], atol=SCORE_TOL)
        matches = match_detections(got, expected)
        assert (matches >= 0).all(), f"{path}: detections {np.flatnonzero(matches < 0)} have no PyTorch counterpart"
        assert got["masks"].shape == expected["masks"].shape == (len(matches), IMAGE_SIZE, IMAGE_SIZE)
        assert (got["masks"] == expected["masks"][matches]).mean() > 0.999


@pytest.mark.slow
def test_classification_matches_pytorch(setup, exported, torch_predictor):
    predictor = OnnxPredictor(exported["classification"], num_threads=1)
    assert predictor.image_size == (96, 96)
    for path in setup[3]:
        image = read_image(path, "BGR")
        got = predictor(image)["class_scores"]
        with torch.no_grad():
            expected = torch_predictor(image, "classification")["class_scores"].numpy()
        np.testing.assert_allclose(got, expected, atol=SCORE_TOL)
        assert got.argmax() == expected.argmax()
        assert list(np.argsort(-got)[:5]) == list(np.argsort(-expected)[:5])


@pytest.mark.slow
def test_batch_is_dynamic(setup, exported):
    """Traced with one image; three in one call give what three calls give."""
    images = [read_image(path, "BGR") for path in setup[3]]
    for task in ("detection", "classification"):
        predictor = OnnxPredictor(exported[task], num_threads=1)
        batched = predictor.predict(images)
        for image, result in zip(images, batched):
            single = predictor(image)
            for key, value in single.items():
                if value.dtype == bool:
                    assert (result[key] == value).mean() > 0.999
                else:
                    np.testing.assert_allclose(result[key], value, atol=BOX_TOL)


@pytest.mark.slow
def test_graph_metadata_and_checker(exported):
    for task, outputs in (("detection", ["boxes", "scores", "classes", "mask_logits"]),
                          ("classification", ["class_scores"])):
        model = onnx.load(exported[task])
        onnx.checker.check_model(model, full_check=True)
        props = {p.key: p.value for p in model.metadata_props}
        assert props["task"] == task
        assert props["input_format"] == "BGR"  # the tiny config's INPUT.FORMAT
        assert [o.name for o in model.graph.output] == outputs
        batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
        ops = {node.op_type for node in model.graph.node}
        assert "GridSample" in ops and not any(op.startswith("ATen") or op == "Loop" for op in ops)
    det = OnnxPredictor(exported["detection"]).metadata
    assert det.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert det.preprocessing == [{"op": "resize_shortest_edge", "short_edge_length": IMAGE_SIZE, "max_size": 256,
                                  "interp": Image.BILINEAR}]
    assert [step["op"] for step in OnnxPredictor(exported["classification"]).metadata.preprocessing] == [
        "resize_shortest_edge", "center_crop"]


@pytest.mark.slow
def test_run_onnx_draws_the_demo_picture(setup, exported, tmp_path, monkeypatch):
    config, weights, _, images = setup
    demo = load_tool("demo_module").load_demo()
    run_onnx = load_tool("run_onnx")
    import detectron2.utils.visualizer as visualizer

    palette = visualizer.random_color.__globals__["_COLORS"]
    for task in ("detection", "classification"):
        # the Visualizer picks a random colour per instance: the same sequence for both pictures
        colors = iter(range(10 ** 6))
        monkeypatch.setattr(visualizer, "random_color",
                            lambda rgb=False, maximum=255: palette[next(colors) % len(palette)] * maximum)
        assert run_onnx.main(["--model", exported[task], "--input", images[0], "--output",
                              str(tmp_path / f"onnx_{task}"), "--confidence-threshold", "0"]) == 0
        colors = iter(range(10 ** 6))
        assert demo.main(["--config-file", config, "--input", images[0], "--output", str(tmp_path / f"torch_{task}"),
                          "--task", task, "--confidence-threshold", "0", "--opts", "MODEL.WEIGHTS", weights]) == 0
        name = os.path.splitext(os.path.basename(images[0]))[0] + ".png"
        onnx_picture = np.asarray(Image.open(tmp_path / f"onnx_{task}" / name)).astype(int)
        torch_picture = np.asarray(Image.open(tmp_path / f"torch_{task}" / name)).astype(int)
        assert onnx_picture.shape == torch_picture.shape
        assert (np.abs(onnx_picture - torch_picture) > 8).mean() < 0.005, task


@pytest.mark.slow
def test_evaluate_onnx_gives_the_pytorch_ap(setup, exported, tmp_path, capsys):
    config, weights, _, _ = setup
    evaluate = load_tool("evaluate_onnx")
    assert evaluate.main(["--config-file", config, "--model", exported["detection"], "--output-dir", str(tmp_path),
                          "--num-threads", "1", "--opts", "MODEL.WEIGHTS", weights]) == 0
    import json

    results = json.loads((tmp_path / "onnx_vs_pytorch.json").read_text())
    for task in ("bbox", "segm"):
        assert abs(results["pytorch"][task]["AP"] - results["onnxruntime"][task]["AP"]) <= 0.2
    assert f"{PREFIX}_det_val bbox: AP PyTorch" in capsys.readouterr().out


def test_unsupported_task_and_empty_vocabulary_are_refused(tiny_up2_cfg, tmp_path, capsys):
    cfg = tiny_up2_cfg
    model = build_model(cfg).eval()
    with pytest.raises(ValueError, match="task 'captioning' cannot be exported; expected one of"):
        build_export_graph(model, "captioning", ["circle"])
    for empty in ([], ()):
        with pytest.raises(ValueError, match="vocabulary is empty"):
            export_onnx(model, "detection", empty, str(tmp_path / "x.onnx"), image_size=(IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match="empty"):
        build_export_graph(model, "classification", ["circle", " "])
    with pytest.raises(ValueError, match="eval mode"):
        build_export_graph(build_model(cfg).train(), "classification", ["circle"])
    tool = load_tool("export_onnx")
    # refused while the arguments are read, before the config or the weights are opened
    base = ["--config-file", str(tmp_path / "unread.yaml"), "--output", str(tmp_path / "x.onnx"),
            "MODEL.WEIGHTS", str(tmp_path / "unread.pth")]
    with pytest.raises(SystemExit):
        tool.main(base + ["--task", "captioning"])
    assert "invalid choice: 'captioning'" in capsys.readouterr().err
    for vocabulary in ("", " , "):
        with pytest.raises(SystemExit):
            tool.main(base + ["--vocabulary", vocabulary])
        assert "--vocabulary is empty" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_runtime_resize_is_detectron2s():
    """The runtime's torch-free resize and crop give Detectron2's / up2's test-time images exactly."""
    rng = np.random.default_rng(0)
    steps = [{"op": "resize_shortest_edge", "short_edge_length": 110, "max_size": 10 ** 9, "interp": Image.BICUBIC},
             {"op": "center_crop", "size": 96}]
    augmentations = T.AugmentationList([T.ResizeShortestEdge(110, 10 ** 9, "choice", interp=Image.BICUBIC),
                                        CenterCrop(96)])
    detection = [{"op": "resize_shortest_edge", "short_edge_length": 128, "max_size": 200, "interp": Image.BILINEAR}]
    for height, width in ((128, 128), (75, 201), (300, 97), (64, 500)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        aug_input = T.AugInput(image.copy())
        augmentations(aug_input)
        np.testing.assert_array_equal(preprocess_image(image, steps), aug_input.image)
        aug_input = T.AugInput(image.copy())
        T.AugmentationList([T.ResizeShortestEdge(128, 200, "choice")])(aug_input)
        np.testing.assert_array_equal(preprocess_image(image, detection), aug_input.image)


def test_mask_resize_is_torch_bilinear():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((3, 32, 40)).astype(np.float32)
    for size in ((128, 160), (33, 41), (20, 17), (32, 40)):
        expected = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear",
                                                   align_corners=False)[0].numpy()
        np.testing.assert_allclose(resize_bilinear(maps, *size), expected, atol=1e-5)
