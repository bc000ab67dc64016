"""Seen / novel split of the `shapes` instance annotations.

Training keeps only the annotations of the seen categories (novel objects stay in the images, unlabeled:
they are background for detection, but classification and captioning still name them). The novel
validation split keeps only the novel categories, so COCO AP measures novel-class detection alone; the
seen validation split keeps only the seen ones (how well the trained classes are detected, for comparison).
"""
import json
import logging
import os
from typing import Dict, Sequence

from up2.data.datasets.register import register_coco_instances_dataset

__all__ = ["NOVEL_CLASSES_DEFAULT", "write_open_vocab_split", "register_open_vocab_split"]

logger = logging.getLogger(__name__)

NOVEL_CLASSES_DEFAULT = ("hexagon", "heart", "arrow")


def _filter(instances: dict, keep_names: Sequence[str]) -> dict:
    categories = [c for c in instances["categories"] if c["name"] in keep_names]
    missing = sorted(set(keep_names) - {c["name"] for c in categories})
    if missing:
        raise ValueError(f"Categories {missing} are not in the annotations "
                         f"(known: {[c['name'] for c in instances['categories']]})")
    ids = {c["id"] for c in categories}
    annotations = [a for a in instances["annotations"] if a["category_id"] in ids]
    return {**instances, "categories": categories, "annotations": annotations}


def write_open_vocab_split(shapes_root: str, out_dir: str, novel: Sequence[str] = NOVEL_CLASSES_DEFAULT) -> Dict:
    """Writes ``instances_train_seen.json``, ``instances_val_novel.json`` and ``instances_val_seen.json``
    into ``out_dir``.

    Returns:
        dict with the ``seen`` and ``novel`` class names and the three json paths (keys ``train_seen``,
        ``val_novel``, ``val_seen``).
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(shapes_root, "annotations", "instances_train.json")) as f:
        train = json.load(f)
    with open(os.path.join(shapes_root, "annotations", "instances_val.json")) as f:
        val = json.load(f)
    names = [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    seen = [n for n in names if n not in novel]
    if not seen or len(seen) == len(names):
        raise ValueError(f"The novel classes {list(novel)} must be a proper subset of {names}")
    paths = {"train_seen": os.path.join(out_dir, "instances_train_seen.json"),
             "val_novel": os.path.join(out_dir, "instances_val_novel.json"),
             "val_seen": os.path.join(out_dir, "instances_val_seen.json")}
    for key, data, keep in (("train_seen", train, seen), ("val_novel", val, list(novel)), ("val_seen", val, seen)):
        filtered = _filter(data, keep)
        with open(paths[key], "w") as f:
            json.dump(filtered, f)
        logger.info("%s: %d annotations of %s", paths[key], len(filtered["annotations"]), keep)
    return {"seen": seen, "novel": list(novel), **paths}


def register_open_vocab_split(shapes_root: str, split: Dict, prefix: str = "shapes"):
    """Registers ``{prefix}_det_train_seen``, ``{prefix}_det_val_novel`` and ``{prefix}_det_val_seen`` from
    :func:`write_open_vocab_split`."""
    for key, images in (("train_seen", "train"), ("val_novel", "val"), ("val_seen", "val")):
        register_coco_instances_dataset(f"{prefix}_det_{key}", split[key], os.path.join(shapes_root, "images", images))
