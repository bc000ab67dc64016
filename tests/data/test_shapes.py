"""The `shapes` generator: determinism, real formats, correct masks/boxes/captions, tokenizer."""
import filecmp
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from up2.data.datasets import register_all_shapes
from up2.data.shapes import generate_shapes, load_spec
from up2.data.shapes.scene import compose_scene, mask_to_polygons, render_background

SMALL = {"num_train": 30, "num_val": 10, "vocab_size": 400}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    generate_shapes(str(out), seed=0, **SMALL)
    return out


def tree_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_same_seed_same_bytes_other_seed_differs(shapes_dir, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    generate_shapes(str(again), seed=0, **SMALL)
    generate_shapes(str(other), seed=1, **SMALL)
    files = tree_files(shapes_dir)
    assert files == tree_files(again) and any(f.startswith("tokenizer") for f in files)
    _, mismatch, errors = filecmp.cmpfiles(shapes_dir, again, files, shallow=False)
    assert mismatch == [] and errors == []
    _, mismatch_other, _ = filecmp.cmpfiles(shapes_dir, other, files, shallow=False)
    assert any(f.startswith("images") for f in mismatch_other)
    assert "annotations/captions_train.json" in mismatch_other


def test_cli_help_and_refuses_foreign_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "up2.data.shapes", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--num-train" in result.stdout and "--seed" in result.stdout
    (tmp_path / "precious.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "up2.data.shapes", "--out", str(tmp_path), "--num-train", "2",
                             "--num-val", "1"], capture_output=True, text=True)
    assert result.returncode != 0 and str(tmp_path) in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_load_and_masks_lie_in_boxes(shapes_dir, split):
    coco = COCO(str(shapes_dir / "annotations" / f"instances_{split}.json"))
    assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [c["name"] for c in load_spec()["categories"]]
    for annotation in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(annotation)
        assert mask.any()
        x, y, w, h = annotation["bbox"]
        rows, cols = np.nonzero(mask)
        assert cols.min() >= np.floor(x) and cols.max() + 1 <= np.ceil(x + w) + 1e-6
        assert rows.min() >= np.floor(y) and rows.max() + 1 <= np.ceil(y + h) + 1e-6
        assert all(len(polygon) >= 6 for polygon in annotation["segmentation"])
        # COCO's area is the visible pixel count; the decoded polygon covers nearly the same pixels.
        assert abs(mask.sum() - annotation["area"]) <= 0.2 * annotation["area"] + 4


def test_every_category_appears(shapes_dir):
    coco = COCO(str(shapes_dir / "annotations" / "instances_train.json"))
    assert all(len(coco.getAnnIds(catIds=[c])) > 0 for c in coco.getCatIds())


def test_polygons_reproduce_visible_masks():
    spec = load_spec()
    names, colors = [c["name"] for c in spec["categories"]], spec["colors"]
    rng = np.random.default_rng(5)
    ious = []
    for _ in range(15):
        background, _ = render_background(rng, 96, list(colors.values()))
        request = [(k, names[k], "red", float(rng.uniform(8, 30))) for k in rng.integers(10, size=4)]
        _, instances = compose_scene(rng, 96, request, colors, background)
        for instance in instances:
            polygons = mask_to_polygons(instance.mask)
            decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 96, 96))).astype(bool)
            ious.append((decoded & instance.mask).sum() / (decoded | instance.mask).sum())
            assert instance.mask.sum() > 0
    assert min(ious) >= 0.9, min(ious)


def test_captions_describe_the_instances(shapes_dir):
    spec = load_spec()
    names = {c["id"]: c["name"] for c in spec["categories"]}
    instances = json.loads((shapes_dir / "annotations" / "instances_train.json").read_text())
    captions = json.loads((shapes_dir / "annotations" / "captions_train.json").read_text())
    assert [i["id"] for i in instances["images"]] == [i["id"] for i in captions["images"]]
    present = {}
    for annotation in instances["annotations"]:
        present.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
    per_image = {}
    for annotation in captions["annotations"]:
        per_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    all_colors, all_shapes = set(spec["colors"]), set(names.values())
    for image_id, texts in per_image.items():
        assert len(set(texts)) >= 2 and len(set(texts)) == len(texts)
        for text in texts:
            words = set(re.findall(r"[a-z]+", text))
            mentioned = {s for s in all_shapes if s in words or s + "s" in words or s + "es" in words}
            assert mentioned and mentioned <= present[image_id], (text, present[image_id])
            assert words & all_colors or re.search(r"\b(one|two|three|four|five|six)\b", text)


def test_classification_folders_and_text(shapes_dir):
    names = json.loads((shapes_dir / "classification" / "class_names.json").read_text())
    assert sorted(names.values()) == sorted(c["name"] for c in load_spec()["categories"])
    for split in ("train", "val"):
        root = shapes_dir / "classification" / split
        assert sorted(os.listdir(root)) == sorted(names)
        assert sum(len(os.listdir(root / d)) for d in names) == SMALL[f"num_{split}"]
        lines = (shapes_dir / "text" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 5 * SMALL[f"num_{split}"] and all(line.strip() for line in lines)


def test_tokenizer_loads_and_round_trips(shapes_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / "tokenizer"))
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    captions = json.loads((shapes_dir / "annotations" / "captions_val.json").read_text())["annotations"]
    for text in [c["caption"] for c in captions[:20]] + ["a hexagon has six sides, like a honeycomb cell."]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text
    assert len(tokenizer("a red circle")["input_ids"]) <= 6  # frequent words are single tokens


def test_every_split_loads_through_dataset_catalog(shapes_dir):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_all_shapes(str(shapes_dir), prefix="tshapes")
    for split in ("train", "val"):
        count = SMALL[f"num_{split}"]
        detection = DatasetCatalog.get(f"tshapes_det_{split}")
        assert len(detection) == count and all(os.path.isfile(d["file_name"]) for d in detection)
        assert MetadataCatalog.get(f"tshapes_det_{split}").thing_classes[0] == "circle"
        classification = DatasetCatalog.get(f"tshapes_cls_{split}")
        assert len(classification) == count and {d["label"] for d in classification} == set(range(10))
        captions = DatasetCatalog.get(f"tshapes_caption_{split}")
        assert len(captions) == count and all(len(d["captions"]) >= 2 for d in captions)
        assert len(DatasetCatalog.get(f"tshapes_text_{split}")) == 5 * count
