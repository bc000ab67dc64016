"""Writes `shapes` splits in the real formats: JPEG images, COCO instances and captions json,
ImageNet-style class folders and a plain-text corpus.

Every image is generated from its own seed ``(seed, task, split, index)``, so the output does not
depend on the number of worker processes; results are collected in index order.
"""
import json
import logging
import multiprocessing
import os
import shutil
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from up2.data.shapes.captions import Thing, corpus_line, describe_scene
from up2.data.shapes.scene import (
    Instance,
    mask_to_bbox,
    mask_to_polygons,
    render_classification_image,
    render_scene,
)

__all__ = ["prepare_output_dir", "write_json", "write_scene_split", "write_classification_split",
           "write_corpus", "image_id", "OWNED_ENTRIES", "INFO_FILE"]

logger = logging.getLogger(__name__)

INFO_FILE = "shapes_info.json"
OWNED_ENTRIES = ("images", "annotations", "classification", "text", "tokenizer", INFO_FILE)
JPEG_QUALITY = 95
OCCLUSION_TO_MENTION = 0.1  # a shape "partly covers" another when it hides this fraction of it
SPLIT_ID_STRIDE = 1_000_000  # image ids: split_id * stride + index + 1
ANNOTATION_ID_STRIDE = 100_000_000


def image_id(split_id: int, index: int) -> int:
    """COCO image id of scene ``index`` of split ``split_id`` (ids never collide across splits)."""
    return split_id * SPLIT_ID_STRIDE + index + 1


def write_json(path: str, data) -> None:
    """Writes JSON with sorted keys and a fixed indent (byte-stable)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def _save_jpeg(path: str, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: exact colour edges


def prepare_output_dir(out_dir: str) -> None:
    """Makes ``out_dir`` ready: creates it, or clears the entries a previous `shapes` run wrote.

    Raises:
        NotADirectoryError: ``out_dir`` is a file.
        FileExistsError: ``out_dir`` is a non-empty directory without ``shapes_info.json``.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out {out_dir} is a file; expected a new, empty or previous shapes directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, INFO_FILE)):
            raise FileExistsError(
                f"--out {out_dir} is not empty and has no {INFO_FILE}, so it is not a previous shapes output: "
                "refusing to write into it. Give a new or empty directory.")
        logger.info("%s is a previous shapes output: replacing %s", out_dir, ", ".join(OWNED_ENTRIES))
        for name in OWNED_ENTRIES:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    # an interrupted run leaves this marker, so the directory can be regenerated in place
    write_json(os.path.join(out_dir, INFO_FILE), {"complete": False, "generator": "up2.data.shapes"})


def _map(function: Callable, tasks: Sequence, workers: int) -> List:
    """``[function(t) for t in tasks]``, in order, on ``workers`` processes when worth it."""
    if workers <= 1 or len(tasks) < 32:
        return [function(task) for task in tasks]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        return pool.map(function, tasks, chunksize=max(1, len(tasks) // (8 * workers)))


def _things(instances: Sequence[Instance], spec: dict) -> List[Thing]:
    """What captions may say about the instances (see :class:`Thing`)."""
    categories = spec["categories"]
    things = []
    for i, instance in enumerate(instances):
        drawn = int(instance.full_mask.sum())
        covered_by = tuple(j for j in range(i + 1, len(instances))
                           if (instance.full_mask & instances[j].full_mask).sum() >= OCCLUSION_TO_MENTION * drawn)
        x, y = instance.centroid
        category = categories[instance.category]
        things.append(Thing(category["name"], category["plural"], instance.color, x, y, drawn, covered_by))
    return things


def _scene_task(task: Tuple) -> Tuple[Dict, List[Dict], List[str]]:
    """Renders and saves one scene; returns its COCO image entry, annotations (no ids) and captions."""
    out_dir, split, split_id, index, seed, size, spec = task
    sample = render_scene(seed, split_id, index, size, spec)
    entry = {"id": image_id(split_id, index), "file_name": f"{image_id(split_id, index):012d}.jpg",
             "height": size, "width": size}
    _save_jpeg(os.path.join(out_dir, "images", split, entry["file_name"]), sample.image)
    annotations = []
    for instance in sample.instances:
        annotations.append({"image_id": entry["id"], "category_id": spec["categories"][instance.category]["id"],
                            "bbox": mask_to_bbox(instance.mask), "area": float(instance.area), "iscrowd": 0,
                            "segmentation": mask_to_polygons(instance.mask), "color": instance.color})
    rng = np.random.default_rng([seed, 3, split_id, index])
    captions = describe_scene(rng, _things(sample.instances, spec), spec["backgrounds"][sample.background], size,
                              num_captions=int(rng.integers(3, 6)))
    return entry, annotations, captions


def write_scene_split(out_dir: str, split: str, split_id: int, count: int, seed: int, size: int, spec: dict,
                      workers: int) -> Tuple[List[List[str]], Dict[str, int]]:
    """Writes ``images/<split>/``, ``annotations/instances_<split>.json`` and
    ``annotations/captions_<split>.json``.

    Returns:
        the captions of each image, and counts of what was written.
    """
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    results = _map(_scene_task, [(out_dir, split, split_id, i, seed, size, spec) for i in range(count)], workers)
    images, annotations, captions = [], [], []
    for entry, instance_annotations, texts in results:
        images.append(entry)
        for annotation in instance_annotations:
            annotations.append({"id": split_id * ANNOTATION_ID_STRIDE + len(annotations) + 1, **annotation})
        for text in texts:
            captions.append({"id": split_id * ANNOTATION_ID_STRIDE + len(captions) + 1, "image_id": entry["id"],
                             "caption": text})
    categories = [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in spec["categories"]]
    info = {"description": f"shapes {split} (up2.data.shapes)", "version": str(spec["version"]), "seed": seed}
    write_json(os.path.join(out_dir, "annotations", f"instances_{split}.json"),
               {"info": info, "images": images, "annotations": annotations, "categories": categories})
    write_json(os.path.join(out_dir, "annotations", f"captions_{split}.json"),
               {"info": info, "images": images, "annotations": captions})
    logger.info("shapes %s: %d images, %d instances, %d captions", split, len(images), len(annotations), len(captions))
    return [texts for _, _, texts in results], {"images": len(images), "instances": len(annotations),
                                                "captions": len(captions)}


def class_dir(label: int) -> str:
    """WordNet-id-like directory name of class ``label`` (0-based): ``s0001`` ..."""
    return f"s{label + 1:04d}"


def _classification_task(task: Tuple) -> None:
    out_dir, split, split_id, index, seed, size, spec = task
    label = index % len(spec["categories"])
    sample = render_classification_image(seed, split_id, index, label, size, spec)
    _save_jpeg(os.path.join(out_dir, "classification", split, class_dir(label), f"{index:06d}.jpg"), sample.image)


def write_classification_split(out_dir: str, split: str, split_id: int, count: int, seed: int, size: int,
                               spec: dict, workers: int) -> Dict[str, int]:
    """Writes ``classification/<split>/<class_dir>/<index>.jpg`` (image ``index`` has class
    ``index % num_classes``) and ``classification/class_names.json``."""
    names = {class_dir(k): c["name"] for k, c in enumerate(spec["categories"])}
    for directory in names:
        os.makedirs(os.path.join(out_dir, "classification", split, directory), exist_ok=True)
    write_json(os.path.join(out_dir, "classification", "class_names.json"), names)
    _map(_classification_task, [(out_dir, split, split_id, i, seed, size, spec) for i in range(count)], workers)
    logger.info("shapes %s: %d classification images in %d classes", split, count, len(names))
    return {"classification_images": count}


def write_corpus(out_dir: str, split: str, split_id: int, lines: int, seed: int, captions: Sequence[Sequence[str]],
                 spec: dict) -> List[str]:
    """Writes ``text/<split>.txt``: ``lines`` passages, one per line. Returns them."""
    os.makedirs(os.path.join(out_dir, "text"), exist_ok=True)
    passages = [corpus_line(np.random.default_rng([seed, 2, split_id, i]), captions, spec) for i in range(lines)]
    with open(os.path.join(out_dir, "text", f"{split}.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(passages) + "\n")
    logger.info("shapes %s: %d text passages", split, len(passages))
    return passages
