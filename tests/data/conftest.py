"""Fixtures of the data tests: small datasets with real faults written by the tests (a truncated JPEG, a
zero-byte PNG and a missing file in a COCO instances JSON, a COCO captions JSON and a class-folder tree),
exposed as the ``faulty_data`` namespace; skip trackers of finished tests are released after each test
(``gather_skipped_samples`` looks at every live tracker of the process)."""
import gc
import io
import json
import os
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from up2.data.datasets import register_caption_dataset, register_class_folder_dataset, register_coco_instances_dataset

# Position (sorted file order) of each fault among the images of a dataset.
TRUNCATED, ZERO_BYTE, MISSING = 3, 5, 7
HEIGHT, WIDTH = 24, 32


def unique(name):
    return f"test_{name}_{uuid.uuid4().hex[:8]}"


def jpeg_bytes(value: int) -> bytes:
    rng = np.random.default_rng(value)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_images(directory, count: int, faults: bool = True, missing: bool = True, first_value: int = 0):
    """``img_00.jpg`` ... (random pixels seeded by ``first_value + i``); with ``faults``: TRUNCATED is half
    a JPEG, ZERO_BYTE an empty ``.png`` and, when ``missing``, MISSING is not written. Returns the file
    names in order."""
    os.makedirs(directory, exist_ok=True)
    names = []
    for i in range(count):
        data = jpeg_bytes(first_value + i)
        name = f"img_{i:02d}.png" if faults and i == ZERO_BYTE else f"img_{i:02d}.jpg"
        names.append(name)
        if faults and i == ZERO_BYTE:
            data = b""
        elif faults and i == TRUNCATED:
            data = data[:len(data) // 2]
        elif faults and missing and i == MISSING:
            continue
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return names


def bad_names(names):
    return {names[TRUNCATED], names[ZERO_BYTE], names[MISSING]}


def register_faulty_json_datasets(root, count: int = 20):
    """A COCO instances JSON (one box per image) and a captions JSON over the same faulty images.
    Returns ``(instances name, captions name, image dir, file names)``."""
    images_dir = os.path.join(root, "images")
    names = write_images(images_dir, count)
    images = [{"id": i + 1, "file_name": n, "height": HEIGHT, "width": WIDTH} for i, n in enumerate(names)]
    boxes = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [4.0, 4.0, 12.0, 10.0], "area": 120.0,
              "iscrowd": 0} for i in range(count)]
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    instances_file, captions_file = os.path.join(root, "instances.json"), os.path.join(root, "captions.json")
    with open(instances_file, "w") as f:
        json.dump({"images": images, "annotations": boxes, "categories": categories}, f)
    captions = [{"id": i + 1, "image_id": i + 1, "caption": f"picture number {i}"} for i in range(count)]
    with open(captions_file, "w") as f:
        json.dump({"images": images, "annotations": captions}, f)
    instances_name, captions_name = unique("faulty_det"), unique("faulty_cap")
    register_coco_instances_dataset(instances_name, instances_file, images_dir)
    register_caption_dataset(captions_name, captions_file, images_dir)
    return instances_name, captions_name, images_dir, names


def register_faulty_folder_dataset(root, count_per_class: int = 10):
    """Two class directories; the first holds the faults, its MISSING file written (a folder dataset
    lists existing files: delete it after loading to make it go missing). Returns ``(name, paths)``,
    ``paths`` every image path in dataset order."""
    paths = []
    for label, class_dir in enumerate(("n001", "n002")):
        directory = os.path.join(root, "classes", class_dir)
        names = write_images(directory, count_per_class, faults=label == 0, missing=False, first_value=100 * label)
        paths.extend(os.path.join(directory, n) for n in sorted(names))
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump({"n001": "circle", "n002": "square"}, f)
    name = unique("faulty_cls")
    register_class_folder_dataset(name, os.path.join(root, "classes"), os.path.join(root, "classes.json"))
    return name, paths


@pytest.fixture
def faulty_data():
    """The helpers and constants of this module."""
    return SimpleNamespace(TRUNCATED=TRUNCATED, ZERO_BYTE=ZERO_BYTE, MISSING=MISSING, unique=unique,
                           jpeg_bytes=jpeg_bytes, write_images=write_images, bad_names=bad_names,
                           register_faulty_json_datasets=register_faulty_json_datasets,
                           register_faulty_folder_dataset=register_faulty_folder_dataset)


@pytest.fixture(autouse=True)
def release_skip_trackers():
    yield
    gc.collect()
