"""Per-task mappers: output keys, shapes and dtypes, train vs test, reproducible augmentation,
the paper's detection augmentation order, and unreadable images named in the error."""
import json
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from PIL import Image

from up2.config import add_up2_config
from up2.data.datasets import register_caption_dataset, register_coco_instances_dataset
from up2.data.mappers import (CaptioningMapper, ClassificationMapper, DetectionMapper, ImageReadError, MLMMapper,
                              RetrievalMapper, build_mapper)


def make_cfg(size=32):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.DATASETS.UP2.IMAGE_SIZE = size
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def write_image(path, h=40, w=60, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # PNG: lossless, so tests can compare pixels
    return pixels


def test_classification_train_output_and_reproducible_crop(tmp_path):
    write_image(str(tmp_path / "a.png"))
    mapper = ClassificationMapper(make_cfg(), is_train=True)
    record = {"file_name": str(tmp_path / "a.png"), "image_id": 5, "label": 3}
    outs = []
    for seed in (0, 0, 1):
        np.random.seed(seed)
        outs.append(mapper(dict(record)))
    out = outs[0]
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.uint8
    assert (out["label"], out["image_id"], out["height"], out["width"], out["task"]) == (3, 5, 40, 60,
                                                                                       "classification")
    assert torch.equal(outs[0]["image"], outs[1]["image"])  # same numpy seed, same crop and flip
    assert not torch.equal(outs[0]["image"], outs[2]["image"])


@pytest.mark.parametrize("mapper_cls,flip_key,flip,expect_flips", [
    (ClassificationMapper, "CLASSIFICATION_RANDOM_FLIP", None, {True, False}),  # default: flips
    (ClassificationMapper, "CLASSIFICATION_RANDOM_FLIP", False, {False}),
    (CaptioningMapper, "IMAGE_TEXT_RANDOM_FLIP", None, {False}),  # default: captions say left/right
    (RetrievalMapper, "IMAGE_TEXT_RANDOM_FLIP", True, {True, False}),
])
def test_flip_is_the_only_randomness_of_a_full_crop(tmp_path, mapper_cls, flip_key, flip, expect_flips):
    pixels = write_image(str(tmp_path / "sq.png"), h=32, w=32)
    cfg = make_cfg()
    cfg.DATASETS.UP2.CLASSIFICATION_CROP_SCALE = [1.0, 1.0]  # whole square image, no resize
    cfg.DATASETS.UP2.IMAGE_TEXT_CROP_SCALE = [1.0, 1.0]
    if flip is not None:
        cfg.DATASETS.UP2[flip_key] = flip
    mapper = mapper_cls(cfg, is_train=True)
    record = {"file_name": str(tmp_path / "sq.png"), "image_id": 0, "label": 0, "captions": ["a b"]}
    plain = torch.as_tensor(pixels.transpose(2, 0, 1).copy())
    mirrored = torch.flip(plain, dims=[2])
    seen = set()
    for seed in range(20):
        np.random.seed(seed)
        image = mapper(dict(record))["image"]
        flipped = torch.equal(image, mirrored)
        assert flipped or torch.equal(image, plain)
        np.random.seed(seed)
        assert torch.equal(image, mapper(dict(record))["image"])
        seen.add(flipped)
    assert seen == expect_flips


def test_classification_test_resizes_shorter_side_then_centre_crops(tmp_path):
    pixels = write_image(str(tmp_path / "a.png"), h=40, w=60)
    out = ClassificationMapper(make_cfg(), is_train=False)({"file_name": str(tmp_path / "a.png"), "image_id": 1,
                                                             "label": 0})
    # Shorter side 32 / 0.875 = 36.57 -> 37; longer 60 * 37 / 40 = 55.5 -> 56; centre 32 x 32.
    resized = np.asarray(Image.fromarray(pixels).resize((56, 37), Image.BICUBIC))
    expected = resized[2:34, 12:44].transpose(2, 0, 1)
    assert torch.equal(out["image"], torch.as_tensor(np.ascontiguousarray(expected)))


def test_bgr_format_reverses_channels(tmp_path):
    pixels = write_image(str(tmp_path / "a.png"), h=32, w=32)
    cfg = make_cfg()
    cfg.INPUT.FORMAT = "BGR"
    cfg.DATASETS.UP2.IMAGE_SIZE = 28  # 28 / 0.875 = 32: the test resize keeps the image
    out = ClassificationMapper(cfg, is_train=False)({"file_name": str(tmp_path / "a.png"), "image_id": 1,
                                                      "label": 0})
    assert torch.equal(out["image"], torch.as_tensor(pixels[2:30, 2:30, ::-1].transpose(2, 0, 1).copy()))


@pytest.mark.parametrize("mapper_cls,task", [(CaptioningMapper, "captioning"), (RetrievalMapper, "retrieval")])
def test_image_text_mappers(tmp_path, mapper_cls, task):
    write_image(str(tmp_path / "a.png"))
    record = {"file_name": str(tmp_path / "a.png"), "image_id": 9, "height": 40, "width": 60,
              "captions": ["a red square", "two circles", "a star"], "caption_ids": [4, 5, 6]}
    train = mapper_cls(make_cfg(), is_train=True)
    drawn = set()
    for seed in range(30):
        np.random.seed(seed)
        out = train(dict(record))
        assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.uint8
        assert out["task"] == task and out["image_id"] == 9 and "captions" not in out
        assert record["caption_ids"][record["captions"].index(out["caption"])] == out["caption_id"]
        drawn.add(out["caption"])
    assert drawn == set(record["captions"])
    out = mapper_cls(make_cfg(), is_train=False)(dict(record))
    assert out["captions"] == record["captions"] and out["caption_ids"] == [4, 5, 6]
    assert out["image"].shape == (3, 32, 32) and "caption" not in out


def test_caption_mapper_on_registered_dataset(tmp_path):
    write_image(str(tmp_path / "img" / "a.png"))
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
            "annotations": [{"id": 3, "image_id": 1, "caption": "one"}, {"id": 2, "image_id": 1, "caption": "two"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    name = f"test_mapcap_{uuid.uuid4().hex[:8]}"
    register_caption_dataset(name, str(tmp_path / "captions.json"), str(tmp_path / "img"))
    (record,) = DatasetCatalog.get(name)
    out = build_mapper(make_cfg(), "captioning", is_train=False)(record)
    assert out["captions"] == ["two", "one"] and out["caption_ids"] == [2, 3]


def test_mlm_mapper_passes_text():
    out = MLMMapper(make_cfg(), is_train=True)({"text": "a red square .", "text_id": 4})
    assert out == {"text": "a red square .", "text_id": 4, "task": "mlm"}


def _coco(tmp_path, h=40, w=60):
    write_image(str(tmp_path / "img" / "a.png"), h=h, w=w)
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "square"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600,
                         "iscrowd": 0, "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]]}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    name = f"test_mapdet_{uuid.uuid4().hex[:8]}"
    register_coco_instances_dataset(name, str(tmp_path / "instances.json"), str(tmp_path / "img"))
    return DatasetCatalog.get(name)[0]


def _det_cfg():
    cfg = make_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MIN_SIZE_TRAIN = (32, 48)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "range"
    cfg.INPUT.MAX_SIZE_TRAIN = 80
    cfg.INPUT.MIN_SIZE_TEST = 36
    cfg.INPUT.MAX_SIZE_TEST = 80
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (24, 28)
    return cfg


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_detection_mapper_resizes_then_crops(tmp_path, mask_format):
    if mask_format == "polygon":
        pytest.importorskip("shapely", reason="Detectron2 crops polygons with shapely")
    record = _coco(tmp_path)
    cfg = _det_cfg()
    cfg.INPUT.MASK_FORMAT = mask_format
    mapper = DetectionMapper(cfg, is_train=True)
    seen_objects = 0
    for seed in range(5):
        np.random.seed(seed)
        out = mapper(record)
        # Resized shorter side >= 32 > crop: every output is exactly the crop size (a crop before the
        # resize, Detectron2's order, would give a shorter side >= 32).
        assert out["image"].shape == (3, 24, 28) and out["image"].dtype == torch.uint8
        assert out["task"] == "detection" and out["image_id"] == 7
        instances = out["instances"]
        assert instances.image_size == (24, 28)
        if len(instances):
            assert (instances.gt_boxes.tensor[:, 2] <= 28).all() and (instances.gt_boxes.tensor[:, 3] <= 24).all()
            if mask_format == "bitmask":
                assert instances.gt_masks.tensor.shape[1:] == (24, 28)
        seen_objects = seen_objects + len(instances)
    assert seen_objects > 0  # the square survives some crops
    np.random.seed(0)
    again = mapper(record)
    np.random.seed(0)
    assert torch.equal(again["image"], mapper(record)["image"])


def test_detection_mapper_test_mode(tmp_path):
    record = _coco(tmp_path)
    out = DetectionMapper(_det_cfg(), is_train=False)(record)
    assert out["image"].shape == (3, 36, 54) and out["task"] == "detection"
    assert "instances" not in out and (out["height"], out["width"]) == (40, 60)


@pytest.mark.parametrize("task", ["classification", "captioning", "detection"])
def test_unreadable_image_is_named(tmp_path, task):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    record = {"file_name": str(bad), "image_id": 1, "label": 0, "height": 4, "width": 4,
              "captions": ["x"], "caption_ids": [1], "annotations": []}
    cfg = _det_cfg()
    cfg.INPUT.MASK_FORMAT = "bitmask"
    with pytest.raises(ImageReadError, match="broken.jpg"):
        build_mapper(cfg, task, is_train=True)(record)


def test_polygon_crop_without_shapely_fails_early(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "shapely.geometry", None)  # import raises ImportError
    cfg = _det_cfg()
    cfg.INPUT.MASK_FORMAT = "polygon"
    with pytest.raises(ImportError, match="shapely"):
        DetectionMapper(cfg, is_train=True)


def test_unknown_task_and_bad_crop_scale():
    with pytest.raises(ValueError, match="vqa"):
        build_mapper(make_cfg(), "vqa", is_train=True)
    cfg = make_cfg()
    cfg.DATASETS.UP2.IMAGE_TEXT_CROP_SCALE = [0.5, 1.5]
    with pytest.raises(ValueError, match="IMAGE_TEXT_CROP_SCALE"):
        CaptioningMapper(cfg, is_train=True)
