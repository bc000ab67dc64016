"""Dataset registration: each format loads through DatasetCatalog; missing files give clear errors."""
import json
import os
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from up2.data.datasets import (
    DatasetNotFoundError,
    register_all_shapes,
    register_caption_dataset,
    register_class_folder_dataset,
    register_coco_instances_dataset,
    register_text_dataset,
)


def unique(name):
    return f"test_{name}_{uuid.uuid4().hex[:8]}"


def write_image(path, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_coco_instances(tmp_path):
    write_image(str(tmp_path / "img" / "a.jpg"))
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 16, "width": 20}],
        "categories": [{"id": 3, "name": "star"}, {"id": 1, "name": "circle"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 5, 6], "area": 30,
                         "iscrowd": 0, "segmentation": [[1, 2, 6, 2, 6, 8, 1, 8]]}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    name = unique("det")
    register_coco_instances_dataset(name, str(tmp_path / "instances.json"), str(tmp_path / "img"))
    assert MetadataCatalog.get(name).thing_classes == ["circle", "star"]  # known before loading
    (record,) = DatasetCatalog.get(name)
    assert record["file_name"] == str(tmp_path / "img" / "a.jpg") and record["image_id"] == 7
    (annotation,) = record["annotations"]
    assert annotation["category_id"] == 1  # contiguous id of "star"
    assert annotation["bbox"] == [1, 2, 5, 6]
    assert MetadataCatalog.get(name).evaluator_type == "coco"


def test_class_folders(tmp_path):
    for class_dir, count in [("s0002", 2), ("s0001", 1)]:
        for i in range(count):
            write_image(str(tmp_path / "train" / class_dir / f"{i}.jpg"))
    (tmp_path / "train" / "s0001" / "notes.txt").write_text("not an image")
    (tmp_path / "names.json").write_text(json.dumps({"s0001": "circle", "s0002": "red square"}))
    name = unique("cls")
    register_class_folder_dataset(name, str(tmp_path / "train"), str(tmp_path / "names.json"))
    records = DatasetCatalog.get(name)
    assert [(os.path.basename(os.path.dirname(r["file_name"])), r["label"]) for r in records] == [
        ("s0001", 0), ("s0002", 1), ("s0002", 1)]
    assert len({r["image_id"] for r in records}) == 3
    assert MetadataCatalog.get(name).thing_classes == ["circle", "red square"]


def test_class_folder_names_must_cover_every_directory(tmp_path):
    write_image(str(tmp_path / "val" / "s0009" / "0.jpg"))
    (tmp_path / "names.json").write_text(json.dumps({"s0001": "circle"}))
    with pytest.raises(ValueError, match="s0009"):
        register_class_folder_dataset(unique("cls"), str(tmp_path / "val"), str(tmp_path / "names.json"))


def test_captions_grouped_per_image(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 5},
                   {"id": 2, "file_name": "b.jpg", "height": 4, "width": 5},
                   {"id": 3, "file_name": "c.jpg", "height": 4, "width": 5}],
        "annotations": [{"id": 11, "image_id": 2, "caption": "b two"}, {"id": 10, "image_id": 1, "caption": "a one "},
                        {"id": 12, "image_id": 2, "caption": "b one"}, {"id": 13, "image_id": 3, "caption": "  "}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    (tmp_path / "img").mkdir()
    name = unique("cap")
    register_caption_dataset(name, str(tmp_path / "captions.json"), str(tmp_path / "img"))
    records = DatasetCatalog.get(name)
    assert [(r["image_id"], r["captions"], r["caption_ids"]) for r in records] == [
        (1, ["a one"], [10]), (2, ["b two", "b one"], [11, 12])]  # image 3 has only an empty caption
    assert records[0]["file_name"] == str(tmp_path / "img" / "a.jpg")


def test_text_corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text("first line\n\n  second line  \n", encoding="utf-8")
    name = unique("text")
    register_text_dataset(name, str(tmp_path / "corpus.txt"))
    assert DatasetCatalog.get(name) == [{"text": "first line", "text_id": 0}, {"text": "second line", "text_id": 1}]


def test_missing_shapes_directory_names_path_and_command(tmp_path):
    root = tmp_path / "nowhere" / "shapes"
    prefix = unique("shapes")
    register_all_shapes(str(root), prefix=prefix)
    for kind in ("det", "cls", "caption", "text"):
        with pytest.raises(DatasetNotFoundError) as error:
            DatasetCatalog.get(f"{prefix}_{kind}_val")
        message = str(error.value)
        assert str(root) in message
        assert f"python -m up2.data.shapes --out {root}" in message


def test_builtin_shapes_splits_are_registered():
    names = set(DatasetCatalog.list())
    for kind in ("det", "cls", "caption", "text"):
        for split in ("train", "val"):
            assert f"shapes_{kind}_{split}" in names
