"""What the loaders and the dataset modules ask of Detectron2's ``DatasetCatalog``: the error for a missing
dataset file, whether a registered dataset is streamed from tar shards, and the dataset dicts of a task.

It depends on no other module of :mod:`up2.data`, so that registration (:mod:`up2.data.datasets`), the
shard reader (:mod:`up2.data.shards`), the streaming loaders (:mod:`up2.data.streams`) and the task loaders
(:mod:`up2.data.build`) can all use it.
"""
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

__all__ = ["DatasetNotFoundError", "STREAMING_FORMAT", "is_streaming_dataset", "load_task_dataset_dicts"]

# Value of the metadata key "dataset_format" of datasets registered by register_image_text_shards.
STREAMING_FORMAT = "image_text_shards"


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset's file or directory does not exist."""


def is_streaming_dataset(name: str) -> bool:
    """Whether the registered dataset ``name`` is a tar-shard dataset (decided from its metadata,
    without loading it)."""
    return name in DatasetCatalog.list() and MetadataCatalog.get(name).get("dataset_format", None) == STREAMING_FORMAT


def load_task_dataset_dicts(cfg, task_type: str, dataset_names: Sequence[str]):
    """Loads each training dataset of a task.

    Returns:
        (list[dict], list[int]): the concatenated dataset dicts and the size of each dataset.
        Detection datasets drop images without annotations when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``.
    """
    dicts, sizes = [], []
    for name in dataset_names:
        if is_streaming_dataset(name):
            raise ValueError(f"Dataset '{name}' is stored as tar shards and has no list of dicts; "
                             "build_task_train_loader streams it")
        if task_type == "detection":
            items = get_detection_dataset_dicts([name], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        else:
            items = DatasetCatalog.get(name)
        if not items:
            raise ValueError(f"Training dataset '{name}' of the {task_type} task has no items")
        dicts.extend(items)
        sizes.append(len(items))
    return dicts, sizes
