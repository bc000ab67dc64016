"""The embedded multi-task dataset `shapes`, generated deterministically in the real formats.

    python -m up2.data.shapes --out datasets/shapes --seed 0 [--num-train 1000 --num-val 200]

Layout (same seed -> byte-identical files)::

    OUT/images/{train,val}/<id:012d>.jpg              scenes (detection, captioning, retrieval)
    OUT/annotations/instances_{train,val}.json        COCO instances: boxes + polygons of visible parts
    OUT/annotations/captions_{train,val}.json         COCO captions: 2-5 captions per image
    OUT/classification/{train,val}/<class_dir>/*.jpg  ImageNet-style folders, one dominant shape
    OUT/classification/class_names.json               class_dir -> readable name
    OUT/text/{train,val}.txt                          MLM corpus, one passage per line
    OUT/tokenizer/                                    byte-level BPE, Hugging Face tokenizer directory
    OUT/shapes_info.json                              seed, counts, categories, version
"""
import io
import json
import logging
import os
import shutil
from typing import Dict, List

import numpy as np
from PIL import Image

from up2.data.shapes.captions import describe_scene
from up2.data.shapes.scene import compose_scene, mask_to_polygons, render_background

__all__ = ["generate_shapes", "load_spec", "SPLITS"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
SPEC_PATH = os.path.join(os.path.dirname(__file__), "spec.json")
JPEG_QUALITY = 95


def load_spec() -> dict:
    """The category list, colours and facts of `shapes` (``spec.json``)."""
    with open(SPEC_PATH) as f:
        return json.load(f)


def _save_jpeg(path: str, image: np.ndarray):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def _write_json(path: str, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def _scene_split(out: str, split: str, split_id: int, count: int, seed: int, size: int, spec: dict):
    names = [c["name"] for c in spec["categories"]]
    colors = spec["colors"]
    color_names = sorted(colors)
    palette = [colors[c] for c in color_names]
    images, annotations, captions, passages = [], [], [], []
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng([seed, split_id, 0, index])
        image_id = split_id * 10_000_000 + index + 1
        requested = [(int(k), names[int(k)], color_names[int(c)], float(rng.uniform(0.07, 0.3) * size))
                     for k, c in zip(rng.integers(len(names), size=rng.integers(1, 7)),
                                     rng.integers(len(color_names), size=6))]
        background, background_word = render_background(rng, size, palette)
        image, instances = compose_scene(rng, size, requested, colors, background)
        if not instances:  # every placement failed: draw one shape alone
            image, instances = compose_scene(rng, size, requested[:1], colors, background, max_tries=200)
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(os.path.join(out, "images", split, file_name), image)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for instance in instances:
            polygons = mask_to_polygons(instance.mask)
            if polygons is None:
                continue
            xs = np.concatenate([np.asarray(p[0::2]) for p in polygons])
            ys = np.concatenate([np.asarray(p[1::2]) for p in polygons])
            x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
            annotations.append({"id": len(annotations) + 1 + split_id * 100_000_000, "image_id": image_id,
                                "category_id": spec["categories"][instance.category]["id"],
                                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                "area": int(instance.mask.sum()), "iscrowd": 0, "segmentation": polygons})
        texts = describe_scene(rng, instances, names, size, background_word,
                               num_captions=int(rng.integers(3, 6)))
        for text in texts:
            captions.append({"id": len(captions) + 1 + split_id * 100_000_000, "image_id": image_id, "caption": text})
        passages.append(". ".join(texts) + ".")
    categories = [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in spec["categories"]]
    _write_json(os.path.join(out, "annotations", f"instances_{split}.json"),
                {"images": images, "annotations": annotations, "categories": categories,
                 "info": {"description": f"shapes {split}", "seed": seed}})
    _write_json(os.path.join(out, "annotations", f"captions_{split}.json"),
                {"images": images, "annotations": captions, "info": {"description": f"shapes {split}", "seed": seed}})
    return passages, [c["caption"] for c in captions]


def _classification_split(out: str, split: str, split_id: int, count: int, seed: int, size: int, spec: dict):
    names = [c["name"] for c in spec["categories"]]
    colors = spec["colors"]
    color_names = sorted(colors)
    palette = [colors[c] for c in color_names]
    for index in range(count):
        label = index % len(names)
        rng = np.random.default_rng([seed, split_id, 1, index])
        main = (label, names[label], color_names[int(rng.integers(len(color_names)))], float(rng.uniform(0.25, 0.4) * size))
        distractors = [(int(k), names[int(k)], color_names[int(rng.integers(len(color_names)))],
                        float(rng.uniform(0.06, 0.1) * size))
                       for k in rng.choice([i for i in range(len(names)) if i != label], size=rng.integers(0, 3))]
        background, _ = render_background(rng, size, palette)
        image, _ = compose_scene(rng, size, [main] + distractors, colors, background, max_tries=200)
        class_dir = os.path.join(out, "classification", split, f"s{label + 1:04d}")
        os.makedirs(class_dir, exist_ok=True)
        _save_jpeg(os.path.join(class_dir, f"{index:06d}.jpg"), image)


def _corpus(rng: np.random.Generator, scene_passages: List[str], facts: List[str], lines: int) -> List[str]:
    corpus = []
    for i in range(lines):
        kind = rng.integers(3)
        if kind == 0 or not scene_passages:
            corpus.append(" ".join(rng.choice(facts, size=int(rng.integers(1, 4)), replace=False)))
        elif kind == 1:
            corpus.append(scene_passages[int(rng.integers(len(scene_passages)))])
        else:
            corpus.append(f"{scene_passages[int(rng.integers(len(scene_passages)))]} {facts[int(rng.integers(len(facts)))]}")
    return corpus


def generate_shapes(out_dir: str, seed: int = 0, num_train: int = 1000, num_val: int = 200, image_size: int = 128,
                    vocab_size: int = 2000) -> Dict:
    """Generates `shapes` into ``out_dir`` (see the module doc for the layout).

    Raises:
        FileExistsError: ``out_dir`` is a non-empty directory that is not a `shapes` output.
    """
    from up2.data.shapes.tokenizer import train_tokenizer

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, "shapes_info.json")):
            raise FileExistsError(f"{out_dir} is not empty and holds no shapes_info.json: refusing to write into it; "
                                  "give an empty or new directory")
        for name in ("images", "annotations", "classification", "text", "tokenizer"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for sub in ("annotations", "text", "classification"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    spec = load_spec()
    counts = {"train": num_train, "val": num_val}
    corpus_text, tokenizer_text = {}, []
    for split_id, split in enumerate(SPLITS):
        passages, captions = _scene_split(out_dir, split, split_id, counts[split], seed, image_size, spec)
        _classification_split(out_dir, split, split_id, counts[split], seed, image_size, spec)
        lines = _corpus(np.random.default_rng([seed, split_id, 2]), passages, spec["facts"], 5 * counts[split])
        with open(os.path.join(out_dir, "text", f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        corpus_text[split] = lines
        if split == "train":
            tokenizer_text = captions + lines
    class_names = {f"s{i + 1:04d}": c["name"] for i, c in enumerate(spec["categories"])}
    _write_json(os.path.join(out_dir, "classification", "class_names.json"), class_names)
    train_tokenizer(tokenizer_text + list(class_names.values()), os.path.join(out_dir, "tokenizer"), vocab_size)
    info = {"generator_version": spec["version"], "seed": seed, "image_size": image_size, "num_train": num_train,
            "num_val": num_val, "categories": [c["name"] for c in spec["categories"]], "vocab_size": vocab_size}
    _write_json(os.path.join(out_dir, "shapes_info.json"), info)
    return info
