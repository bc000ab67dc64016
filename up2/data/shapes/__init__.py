"""`shapes`: a small synthetic multi-task dataset, generated deterministically in the formats of the
real datasets, so that the same registration code and loaders serve both.

    python -m up2.data.shapes --out datasets/shapes --seed 0 [--num-train 1000 --num-val 200]

Layout (the same seed gives byte-identical files; another seed, other files)::

    OUT/images/{train,val}/<image id:012d>.jpg          scenes, for detection, captioning, retrieval
    OUT/annotations/instances_{train,val}.json          COCO instances: visible boxes + polygons
    OUT/annotations/captions_{train,val}.json           COCO captions: 3-5 captions per image
    OUT/classification/{train,val}/<class_dir>/<n>.jpg  ImageNet-style class folders (s0001 ...)
    OUT/classification/class_names.json                 {"s0001": "circle", ...}
    OUT/text/{train,val}.txt                            MLM corpus, one passage per line, UTF-8
    OUT/tokenizer/                                      byte-level BPE (AutoTokenizer.from_pretrained)
    OUT/shapes_info.json                                seed, sizes, counts, categories, version

Image ids are ``split_id * 1_000_000 + index + 1`` (train split_id 0, val 1). Instance annotations
carry the COCO keys (``id``, ``image_id``, ``category_id``, ``bbox`` = box of the visible pixels,
``area`` = visible pixel count, ``iscrowd`` 0, ``segmentation`` = polygons of the visible region)
and an extra ``color`` (colour name). Categories, colours and the facts of the text corpus are in
``spec.json`` next to this file.
"""
import json
import logging
import os
from typing import Dict, Optional

from up2.data.shapes.scene import render_classification_image, render_scene
from up2.data.shapes.writer import (
    INFO_FILE,
    prepare_output_dir,
    write_classification_split,
    write_corpus,
    write_json,
    write_scene_split,
)

__all__ = ["generate_shapes", "load_spec", "render_scene", "render_classification_image", "SPLITS", "SPEC_PATH"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
SPEC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spec.json")
MAX_IMAGES_PER_SPLIT = 999_999  # image ids are split_id * 1_000_000 + index + 1


def load_spec(path: str = SPEC_PATH) -> dict:
    """The categories (with plurals and facts), colours, backgrounds and corpus facts of `shapes`."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    for key in ("version", "categories", "colors", "color_mixing", "backgrounds", "general_facts"):
        if key not in spec:
            raise ValueError(f"{path} has no '{key}'; expected the shapes spec format")
    return spec


def _check_arguments(seed: int, num_train: int, num_val: int, image_size: int, vocab_size: int):
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not 1 <= value <= MAX_IMAGES_PER_SPLIT:
            raise ValueError(f"{name} must be in [1, {MAX_IMAGES_PER_SPLIT}], got {value}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte tokens + 5 specials + merges), got {vocab_size}")


def generate_shapes(out_dir: str, seed: int = 0, num_train: int = 1000, num_val: int = 200, image_size: int = 128,
                    vocab_size: int = 2000, workers: Optional[int] = None) -> Dict:
    """Generates `shapes` into ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: a new or empty directory, or a previous `shapes` output (replaced).
        seed: non-negative; the same seed gives byte-identical files.
        num_train, num_val: scene images per split; the classification splits have as many
            images, spread evenly over the classes; the text corpus has 5 passages per scene image.
        image_size: side of the square images, in pixels.
        vocab_size: maximum vocabulary size of the BPE tokenizer.
        workers: processes that render images (default: up to 2); does not change the output.

    Returns:
        the content of ``shapes_info.json``.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty directory that is not a `shapes` output.
        ValueError: an argument is out of range.
    """
    from up2.data.shapes.tokenizer import train_tokenizer

    _check_arguments(seed, num_train, num_val, image_size, vocab_size)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    spec = load_spec()
    prepare_output_dir(out_dir)
    counts, tokenizer_texts = {}, []
    for split_id, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        captions, counts[split] = write_scene_split(out_dir, split, split_id, count, seed, image_size, spec, workers)
        counts[split].update(write_classification_split(out_dir, split, split_id, count, seed, image_size, spec,
                                                        workers))
        passages = write_corpus(out_dir, split, split_id, 5 * count, seed, captions, spec)
        counts[split]["text_lines"] = len(passages)
        if split == "train":
            tokenizer_texts = [text for texts in captions for text in texts] + passages
    tokenizer_texts += [c["name"] for c in spec["categories"]]
    learned = train_tokenizer(tokenizer_texts, os.path.join(out_dir, "tokenizer"), vocab_size)
    logger.info("shapes: tokenizer with %d tokens in %s", learned, os.path.join(out_dir, "tokenizer"))
    info = {
        "complete": True,
        "generator": "up2.data.shapes",
        "generator_version": spec["version"],
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
        "counts": counts,
        "categories": [{"id": c["id"], "name": c["name"]} for c in spec["categories"]],
        "colors": [c["name"] for c in spec["colors"]],
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": learned,
    }
    write_json(os.path.join(out_dir, INFO_FILE), info)
    return info
