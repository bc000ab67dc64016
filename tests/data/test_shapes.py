"""The `shapes` generator: determinism, real formats, masks/boxes against the pixels, captions
against the annotations, class folders, corpus and tokenizer."""
import filecmp
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from up2.data.shapes import generate_shapes, load_spec, render_scene
from up2.data.shapes.__main__ import main as shapes_main
from up2.data.shapes.scene import is_simple_region, mask_to_bbox, mask_to_polygons, render_background

SMALL = {"num_train": 40, "num_val": 10, "vocab_size": 600}
SPEC = load_spec()
NAMES = {c["id"]: c["name"] for c in SPEC["categories"]}
PLURALS = {c["plural"]: c["name"] for c in SPEC["categories"]}
COLORS = {c["name"]: np.array(c["rgb"], dtype=np.float32) for c in SPEC["colors"]}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    info = generate_shapes(str(out), seed=0, workers=2, **SMALL)
    assert info["complete"] and info["seed"] == 0
    return out


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def _decode(annotation, size):
    rle = mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], size, size))
    return mask_utils.decode(rle).astype(bool)


def _load(shapes_dir, kind, split):
    return json.loads((shapes_dir / "annotations" / f"{kind}_{split}.json").read_text())


def test_same_seed_same_bytes_any_workers_other_seed_differs(shapes_dir, tmp_path):
    again = tmp_path / "again"
    generate_shapes(str(again), seed=0, workers=1, **SMALL)
    files = _tree(shapes_dir)
    assert files == _tree(again)
    assert {"tokenizer/tokenizer.json", "shapes_info.json", "text/train.txt",
            "classification/class_names.json"} <= set(files)
    _, mismatch, errors = filecmp.cmpfiles(shapes_dir, again, files, shallow=False)
    assert mismatch == [] and errors == []
    # a previous shapes output may be overwritten; another seed gives other files
    generate_shapes(str(again), seed=1, **SMALL)
    _, mismatch, _ = filecmp.cmpfiles(shapes_dir, again, files, shallow=False)
    for name in ("annotations/instances_train.json", "annotations/captions_val.json", "text/train.txt",
                 "images/train/000000000001.jpg", "classification/val/s0001/000000.jpg"):
        assert name in mismatch


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "up2.data.shapes", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--out", "--seed", "--num-train", "--num-val", "--image-size", "--vocab-size"):
        assert flag in result.stdout


def test_refuses_non_empty_directory_that_is_not_shapes(tmp_path, caplog):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        generate_shapes(str(tmp_path), num_train=2, num_val=1)
    with caplog.at_level(logging.ERROR):
        assert shapes_main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1"]) == 2
    assert "shapes_info.json" in caplog.text and str(tmp_path) in caplog.text
    assert os.listdir(tmp_path) == ["precious.txt"] and (tmp_path / "precious.txt").read_text() == "keep me"


def test_background_styles():
    """Muted (the generator's since spec version 2): every pixel within a low-saturation band around
    two close colours; vivid (version 1): independent colours, much more saturated on average; both
    draw the four kinds; an unknown style is named in the error."""
    palette = [c["rgb"] for c in SPEC["colors"]]
    assert SPEC["background_style"] == "muted"
    saturation, kinds = {"muted": [], "vivid": []}, {"muted": set(), "vivid": set()}
    for style in saturation:
        for index in range(40):
            image, kind = render_background(np.random.default_rng([7, index]), 64, palette, style)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            pixels = image.reshape(-1, 3).astype(np.float32)
            saturation[style].append(float(np.mean(pixels.max(1) - pixels.min(1))))
            kinds[style].add(kind)
            if style == "muted":
                # channels of a pixel differ by at most 2 x 12 (tint) + 2 x 8 (second colour) + noise
                assert np.percentile(pixels.max(1) - pixels.min(1), 99) < 60
                assert np.ptp(pixels.mean(1)) < 40 + 2 + 6 * 10  # contrast <= 40 (+ tint, noise)
    assert kinds["muted"] == kinds["vivid"] == {0, 1, 2, 3}
    assert 2 * np.mean(saturation["muted"]) < np.mean(saturation["vivid"])
    with pytest.raises(ValueError, match="'pastel'"):
        render_background(np.random.default_rng(0), 8, palette, "pastel")


def test_mask_helpers_known_answers():
    rect = np.zeros((8, 9), dtype=bool)
    rect[2:5, 3:7] = True
    assert mask_to_bbox(rect) == [3.0, 2.0, 4.0, 3.0]
    (polygon,) = mask_to_polygons(rect)
    points = np.array(polygon).reshape(-1, 2)
    # the 0.5 iso-line follows the pixel edges and cuts each corner pixel in half: an octagon
    assert len(points) == 8
    assert points[:, 0].min() == 3 and points[:, 0].max() == 7 and points[:, 1].min() == 2 and points[:, 1].max() == 5
    assert np.array_equal(_decode({"segmentation": [polygon]}, 9)[:8, :9], rect)
    assert is_simple_region(rect)
    ring = rect.copy()
    ring[3, 4:6] = False
    assert not is_simple_region(ring)  # a hole
    two = rect.copy()
    two[:, 7:] = False
    two[6, 8] = True
    assert not is_simple_region(two)  # two pieces
    diagonal = np.zeros((5, 5), dtype=bool)
    diagonal[1, 1] = diagonal[2, 2] = True
    assert not is_simple_region(diagonal)  # pixels touching at a corner only


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_instances_load_and_masks_lie_in_boxes(shapes_dir, split):
    coco = COCO(str(shapes_dir / "annotations" / f"instances_{split}.json"))
    assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == [c["name"] for c in SPEC["categories"]]
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len({a["id"] for a in annotations}) == len(annotations)
    for image in coco.loadImgs(coco.getImgIds()):
        assert (shapes_dir / "images" / split / image["file_name"]).is_file()
        assert image["height"] == image["width"] == 128 and image["file_name"] == f"{image['id']:012d}.jpg"
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        assert annotation["iscrowd"] == 0 and w > 0 and h > 0
        for polygon in annotation["segmentation"]:
            points = np.array(polygon).reshape(-1, 2)
            assert len(polygon) >= 6 and len(polygon) % 2 == 0
            assert (points[:, 0] >= x).all() and (points[:, 0] <= x + w).all()
            assert (points[:, 1] >= y).all() and (points[:, 1] <= y + h).all()
        mask = coco.annToMask(annotation).astype(bool)
        rows, cols = np.nonzero(mask)
        assert cols.min() >= x and cols.max() + 1 <= x + w and rows.min() >= y and rows.max() + 1 <= y + h
        assert abs(int(mask.sum()) - annotation["area"]) <= 0.1 * annotation["area"]


@pytest.mark.parametrize("split_id,split", [(0, "train"), (1, "val")])
def test_annotations_match_re_rendered_masks_and_image_pixels(shapes_dir, split_id, split):
    data = _load(shapes_dir, "instances", split)
    by_image = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for index, image in enumerate(data["images"][:12]):
        sample = render_scene(0, split_id, index, 128, SPEC)
        annotations = by_image[image["id"]]
        assert len(annotations) == len(sample.instances) >= 1
        pixels = np.asarray(Image.open(shapes_dir / "images" / split / image["file_name"]).convert("RGB"), np.float32)
        assert np.abs(pixels - sample.image).mean() < 5  # the stored JPEG is the rendered image
        for annotation, instance in zip(annotations, sample.instances):
            assert NAMES[annotation["category_id"]] == SPEC["categories"][instance.category]["name"]
            assert annotation["color"] == instance.color and annotation["area"] == instance.mask.sum()
            decoded = _decode(annotation, 128)
            iou = (decoded & instance.mask).sum() / (decoded | instance.mask).sum()
            assert iou >= 0.9, iou
            assert is_simple_region(instance.mask) and instance.mask.sum() >= 0.5 * instance.full_mask.sum()
            # independent of the renderer: the mask's inner pixels in the JPEG have the named colour
            inner = decoded.copy()
            inner[1:-1, 1:-1] = decoded[1:-1, 1:-1] & decoded[:-2, 1:-1] & decoded[2:, 1:-1] & \
                decoded[1:-1, :-2] & decoded[1:-1, 2:]
            if inner.sum() >= 10:
                distance = np.linalg.norm(pixels[inner] - COLORS[annotation["color"]], axis=1)
                assert np.median(distance) < 40, (image["file_name"], annotation["color"], np.median(distance))


def test_every_category_appears_in_every_split(shapes_dir):
    for split in ("train", "val"):
        present = {a["category_id"] for a in _load(shapes_dir, "instances", split)["annotations"]}
        assert present == set(NAMES)


def _check_caption(text, pairs, centroids):
    """Checks one caption against the image's (colour, shape) instances and their centroids."""
    assert text == text.lower() and text.strip() == text
    assert not re.search(r"\ba [aeiou]|\ban [^aeiou ]", text), text
    words = re.findall(r"[a-z-]+", text)
    shapes = {PLURALS.get(w, w) for w in words} & set(NAMES.values())
    assert shapes and shapes <= {s for _, s in pairs}, text
    for i, word in enumerate(words[:-1]):
        if word in COLORS:
            following = PLURALS.get(words[i + 1], words[i + 1])
            if following in NAMES.values():
                assert (word, following) in pairs, text
            else:
                assert following in ("shape", "shapes", "background") or following in COLORS, text
    for number, first, second in re.findall(r"\b(one|two|three|four|five|six) ([a-z]+)(?: ([a-z]+))?", text):
        count = NUMBERS[number]
        first_name, second_name = PLURALS.get(first, first), PLURALS.get(second, second)
        if first == "shapes":
            assert count == sum(pairs.values()), text
        elif first in COLORS and second_name in NAMES.values():
            assert count == pairs[(first, second_name)], text
        elif first in COLORS and second in ("shape", "shapes"):
            assert count == sum(n for (c, _), n in pairs.items() if c == first), text
        elif first_name in NAMES.values():
            assert count == sum(n for (_, s), n in pairs.items() if s == first_name), text
    pattern = r"(\w+) (\w+) (?:is )?(above|below|to the left of|to the right of)" \
              r"(?: and (to the left of|to the right of))? (?:a|an|the) (?:(?:small|large) )?(\w+) (\w+)"
    for color_a, shape_a, rel, rel2, color_b, shape_b in re.findall(pattern, text):
        (ax, ay), (bx, by) = centroids[(color_a, shape_a)], centroids[(color_b, shape_b)]
        for r in filter(None, (rel, rel2)):
            delta = {"above": by - ay, "below": ay - by, "to the left of": bx - ax, "to the right of": ax - bx}[r]
            assert delta > 0.1 * 128, text


@pytest.mark.parametrize("split", ["train", "val"])
def test_captions_are_true_of_the_annotations(shapes_dir, split):
    instances, captions = _load(shapes_dir, "instances", split), _load(shapes_dir, "captions", split)
    assert instances["images"] == captions["images"]
    pairs, centroids = {}, {}
    for annotation in instances["annotations"]:
        key = (annotation["color"], NAMES[annotation["category_id"]])
        pairs.setdefault(annotation["image_id"], Counter())[key] += 1
        rows, cols = np.nonzero(_decode(annotation, 128))
        centroids.setdefault(annotation["image_id"], {})[key] = (cols.mean() + 0.5, rows.mean() + 0.5)
    per_image = {}
    for annotation in captions["annotations"]:
        per_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    assert set(per_image) == {i["id"] for i in captions["images"]}
    for image_id, texts in per_image.items():
        assert 3 <= len(texts) <= 5 and len(set(texts)) == len(texts)
        for text in texts:
            _check_caption(text, pairs[image_id], centroids[image_id])


def test_classification_folders(shapes_dir):
    names = json.loads((shapes_dir / "classification" / "class_names.json").read_text())
    assert names == {f"s{c['id']:04d}": c["name"] for c in SPEC["categories"]}
    for split in ("train", "val"):
        root = shapes_dir / "classification" / split
        assert sorted(os.listdir(root)) == sorted(names)
        counts = [len(os.listdir(root / d)) for d in sorted(names)]
        total = SMALL[f"num_{split}"]
        assert sum(counts) == total and max(counts) - min(counts) <= 1
        image = Image.open(next((root / "s0001").iterdir()))
        assert image.size == (128, 128) and image.mode == "RGB"


def test_text_corpus(shapes_dir):
    for split in ("train", "val"):
        raw = (shapes_dir / "text" / f"{split}.txt").read_bytes()
        lines = raw.decode("utf-8").splitlines()
        assert len(lines) == 5 * SMALL[f"num_{split}"] and all(line.strip() == line and line for line in lines)
        assert len(set(lines)) > len(lines) // 3
        assert 1 <= max(len(re.findall(r"[.?]", line)) for line in lines) <= 6
        assert not [line for line in lines if re.search(r"\ba [aeiou]|\ban [^aeiou ]", line)]  # a/an


def test_tokenizer_loads_offline_and_round_trips(shapes_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / "tokenizer"), local_files_only=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token) == \
        ("<s>", "</s>", "<pad>", "<mask>")
    captions = [c["caption"] for c in _load(shapes_dir, "captions", "val")["annotations"]]
    lines = (shapes_dir / "text" / "val.txt").read_text(encoding="utf-8").splitlines()
    for text in captions[:30] + lines[:30] + ["Unseen words, ünïcode & digits 42!"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2 and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # frequent words are single tokens; inside a sentence they carry the leading-space marker
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red circle")["input_ids"]) == \
        ["<s>", "a", "Ġred", "Ġcircle", "</s>"]
    info = json.loads((shapes_dir / "shapes_info.json").read_text())
    assert len(tokenizer) == info["tokenizer_vocab_size"] <= SMALL["vocab_size"]


def test_registered_splits_load_through_dataset_catalog(shapes_dir):
    from detectron2.data import DatasetCatalog

    from up2.data.datasets import register_all_shapes

    register_all_shapes(str(shapes_dir), prefix="test_shapes_gen")
    for split in ("train", "val"):
        count = SMALL[f"num_{split}"]
        detection = DatasetCatalog.get(f"test_shapes_gen_det_{split}")
        assert len(detection) == count and all(os.path.isfile(d["file_name"]) for d in detection)
        assert all(len(d["annotations"]) >= 1 for d in detection)
        classification = DatasetCatalog.get(f"test_shapes_gen_cls_{split}")
        assert len(classification) == count and {d["label"] for d in classification} == set(range(10))
        captions = DatasetCatalog.get(f"test_shapes_gen_caption_{split}")
        assert len(captions) == count and all(len(d["captions"]) >= 2 for d in captions)
        assert len(DatasetCatalog.get(f"test_shapes_gen_text_{split}")) == 5 * count
