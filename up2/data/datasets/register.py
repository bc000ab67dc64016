"""Registration of datasets in Detectron2's DatasetCatalog / MetadataCatalog, one function per format.

The same functions register the embedded ``shapes`` dataset and the real datasets (COCO, ImageNet,
COCO Captions, Flickr30k, text corpora), so every loader is exercised by the tests. Registration is
lazy, as in Detectron2: files are read when ``DatasetCatalog.get(name)`` is called, and a missing
file raises :class:`DatasetNotFoundError` naming the path and the command that creates it.

Dataset dicts, by format:

* COCO instances: Detectron2's standard dicts (``file_name``, ``height``, ``width``, ``image_id``,
  ``annotations``); metadata ``evaluator_type="coco"``, ``thing_classes``.
* class folders (ImageNet layout ``root/<class_dir>/<image>``): ``{"file_name", "image_id",
  "label"}`` with ``label`` in ``[0, C)`` following the sorted class directories; metadata ``thing_classes``
  (readable names from the class-name JSON, Detectron2's key for class names), ``class_dirs``.
* COCO captions json: one dict per image ``{"file_name", "image_id", "height", "width",
  "captions": [str], "caption_ids": [int]}``.
* text corpus (one passage per line): ``{"text", "text_id"}``.
* image-text tar shards: ``DatasetCatalog.get`` returns an :class:`up2.data.shards.ImageTextShards`
  (sized by its ``shards.json`` or img2dataset's stats files, streamed by the task loaders); its samples are
  ``{"image_bytes", "source", "image_id", "captions"}``; metadata ``dataset_format="image_text_shards"``.
"""
import json
import logging
import os
from collections import defaultdict
from typing import Callable, Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from up2.data.catalog import STREAMING_FORMAT, DatasetNotFoundError
from up2.data.shards import ImageTextShards

__all__ = [
    "DatasetNotFoundError",
    "register_coco_instances_dataset",
    "register_class_folder_dataset",
    "register_caption_dataset",
    "register_text_dataset",
    "register_image_text_shards",
    "IMAGE_EXTENSIONS",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def _require(path: str, dataset_name: str, prepare_hint: str):
    if not os.path.exists(path):
        raise DatasetNotFoundError(
            f"Dataset '{dataset_name}': {path} does not exist. {prepare_hint} "
            "(datasets are looked up under $DETECTRON2_DATASETS, default ./datasets)"
        )


def _register(name: str, loader: Callable[[], List[dict]], **metadata):
    if name in DatasetCatalog.list():
        raise ValueError(f"Dataset '{name}' is already registered; pick another name")
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_coco_instances_dataset(name: str, json_file: str, image_root: str, prepare_hint: str = ""):
    """Registers a COCO-format instances json (boxes + polygon masks) for detection.

    Args:
        name: dataset name, e.g. ``"coco_2017_train"``.
        json_file: path of ``instances_*.json``.
        image_root: directory of the images named by the json's ``file_name``.
        prepare_hint: what to run when the files are missing (shown in the error).
    """

    def load():
        _require(json_file, name, prepare_hint)
        _require(image_root, name, prepare_hint)
        return load_coco_json(json_file, image_root, name)

    # thing_classes etc. are set by load_coco_json on first load; read them now when possible so
    # that the model can be built before the data is loaded.
    metadata = {}
    if os.path.isfile(json_file):
        with open(json_file) as f:
            categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
        metadata["thing_classes"] = [c["name"] for c in categories]
        metadata["thing_dataset_id_to_contiguous_id"] = {c["id"]: i for i, c in enumerate(categories)}
    _register(name, load, json_file=json_file, image_root=image_root, evaluator_type="coco",
              prepare_hint=prepare_hint, **metadata)


def _read_class_names(class_names_file: str, class_dirs: List[str]) -> List[str]:
    with open(class_names_file) as f:
        readable: Dict[str, str] = json.load(f)
    missing = [d for d in class_dirs if d not in readable]
    if missing:
        raise ValueError(f"{class_names_file} has no name for class directories {missing[:10]}")
    return [readable[d] for d in class_dirs]


def register_class_folder_dataset(name: str, root: str, class_names_file: str, prepare_hint: str = "",
                                  *, lazy_metadata: bool = False):
    """Registers an ImageNet-style folder tree ``root/<class_dir>/<image>`` for classification.

    Args:
        name: dataset name, e.g. ``"imagenet_train"``.
        root: directory holding one sub-directory per class.
        class_names_file: JSON mapping each class directory to a readable class name.
        prepare_hint: what to run when the files are missing (shown in the error).
        lazy_metadata: do not look at the disk when registering; ``thing_classes`` and
            ``class_dirs`` are then set when the dataset is first loaded. By default they are read
            at registration when the files exist.
    """

    def class_dirs() -> List[str]:
        _require(root, name, prepare_hint)
        return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))

    def load():
        _require(class_names_file, name, prepare_hint)
        dirs = class_dirs()
        _read_class_names(class_names_file, dirs)
        dicts = []
        for label, class_dir in enumerate(dirs):
            for file in sorted(os.listdir(os.path.join(root, class_dir))):
                if file.endswith(IMAGE_EXTENSIONS):
                    dicts.append({"file_name": os.path.join(root, class_dir, file),
                                  "image_id": len(dicts), "label": label})
        if not dicts:
            raise DatasetNotFoundError(f"Dataset '{name}': no images found under {root}. {prepare_hint}")
        if lazy_metadata:
            MetadataCatalog.get(name).set(class_dirs=dirs, thing_classes=_read_class_names(class_names_file, dirs))
        return dicts

    metadata = {}
    if not lazy_metadata and os.path.isdir(root) and os.path.isfile(class_names_file):
        dirs = class_dirs()
        metadata = {"class_dirs": dirs, "thing_classes": _read_class_names(class_names_file, dirs)}
    _register(name, load, image_root=root, class_names_file=class_names_file,
              evaluator_type="classification", prepare_hint=prepare_hint, **metadata)


def register_caption_dataset(name: str, json_file: str, image_root: str, prepare_hint: str = ""):
    """Registers a COCO-captions-format json (captioning and retrieval), one dict per image.

    Args:
        name: dataset name, e.g. ``"coco_caption_karpathy_test"``.
        json_file: path of ``captions_*.json`` (``images`` + ``annotations`` with ``caption``).
        image_root: directory of the images.
        prepare_hint: what to run when the files are missing (shown in the error).
    """

    def load():
        _require(json_file, name, prepare_hint)
        _require(image_root, name, prepare_hint)
        with open(json_file) as f:
            data = json.load(f)
        captions = defaultdict(list)
        for annotation in data["annotations"]:
            caption = annotation["caption"].strip()
            if caption:
                captions[annotation["image_id"]].append((annotation["id"], caption))
        dicts, without_caption = [], 0
        for image in data["images"]:
            entries = sorted(captions.get(image["id"], []))
            if not entries:
                without_caption += 1
                continue
            dicts.append({
                "file_name": os.path.join(image_root, image["file_name"]),
                "image_id": image["id"],
                "height": image.get("height"),
                "width": image.get("width"),
                "captions": [c for _, c in entries],
                "caption_ids": [i for i, _ in entries],
            })
        if without_caption:
            logger.warning("Dataset '%s': skipped %d images without caption in %s", name, without_caption, json_file)
        logger.info("Loaded %d images with %d captions from %s", len(dicts),
                    sum(len(d["captions"]) for d in dicts), json_file)
        return dicts

    _register(name, load, json_file=json_file, image_root=image_root, evaluator_type="caption",
              prepare_hint=prepare_hint)


def register_text_dataset(name: str, text_file: str, prepare_hint: str = ""):
    """Registers a plain-text corpus (one passage per line, UTF-8) for masked language modelling.

    Args:
        name: dataset name, e.g. ``"bookswiki_train"``.
        text_file: path of the ``.txt`` file.
        prepare_hint: what to run when the file is missing (shown in the error).
    """

    def load():
        _require(text_file, name, prepare_hint)
        with open(text_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        return [{"text": line, "text_id": i} for i, line in enumerate(line for line in lines if line)]

    _register(name, load, text_file=text_file, evaluator_type="mlm", prepare_hint=prepare_hint)


def register_image_text_shards(name: str, shard_glob_or_dir: str, index_file: str = None, prepare_hint: str = "",
                               shuffle_buffer: int = 256):
    """Registers image-text pairs stored as tar shards (see :mod:`up2.data.shards`) for captioning and
    retrieval training. Nothing is read until the dataset is loaded; the task loaders then stream the
    shards per rank and DataLoader worker (:mod:`up2.data.streams`).

    Args:
        name: dataset name, e.g. ``"cc3m_train"``.
        shard_glob_or_dir: a directory with ``shards.json`` and the shards it lists, the output directory
            of ``img2dataset --output_format webdataset`` as it is (sizes from its ``*_stats.json``), or
            a glob of ``.tar`` files (e.g. ``".../cc3m/shards/00000*.tar"``) whose sizes are read from the
            ``shards.json`` or the stats files beside them (:mod:`up2.data.shard_layouts`).
        index_file: the ``shards.json`` to use; default the one in the shard directory, if any.
        prepare_hint: what to run when the files are missing (shown in the error).
        shuffle_buffer: samples each worker holds to shuffle the stream in training (memory: about
            this many encoded images per worker and shard dataset).
    """

    def load():
        return ImageTextShards.from_path(name, shard_glob_or_dir, index_file, shuffle_buffer, prepare_hint)

    _register(name, load, shards=shard_glob_or_dir, index_file=index_file, evaluator_type="caption",
              dataset_format=STREAMING_FORMAT, prepare_hint=prepare_hint)
