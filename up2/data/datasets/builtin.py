"""Registers the datasets up2 knows by name, under the Detectron2 dataset root.

The root is ``$DETECTRON2_DATASETS`` (default ``./datasets``), as in Detectron2. The embedded
``shapes`` dataset lives in ``<root>/shapes`` and is created by ``python -m up2.data.shapes``.
"""
import os

from up2.data.datasets.register import (
    register_caption_dataset,
    register_class_folder_dataset,
    register_coco_instances_dataset,
    register_text_dataset,
)

__all__ = ["get_datasets_root", "register_all_shapes", "SHAPES_SPLITS"]

SHAPES_SPLITS = ("train", "val")


def get_datasets_root() -> str:
    """Returns the dataset root: ``$DETECTRON2_DATASETS`` or ``datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_all_shapes(root: str, prefix: str = "shapes"):
    """Registers every split of a ``shapes`` directory: ``{prefix}_det_{split}``,
    ``{prefix}_cls_{split}``, ``{prefix}_caption_{split}``, ``{prefix}_text_{split}``.

    Args:
        root: the directory written by ``python -m up2.data.shapes --out ROOT``.
        prefix: dataset name prefix.
    """
    hint = f"Create it with: python -m up2.data.shapes --out {root} --seed 0"
    for split in SHAPES_SPLITS:
        images = os.path.join(root, "images", split)
        register_coco_instances_dataset(
            f"{prefix}_det_{split}", os.path.join(root, "annotations", f"instances_{split}.json"), images, hint)
        register_class_folder_dataset(
            f"{prefix}_cls_{split}", os.path.join(root, "classification", split),
            os.path.join(root, "classification", "class_names.json"), hint)
        register_caption_dataset(
            f"{prefix}_caption_{split}", os.path.join(root, "annotations", f"captions_{split}.json"), images, hint)
        register_text_dataset(f"{prefix}_text_{split}", os.path.join(root, "text", f"{split}.txt"), hint)


register_all_shapes(os.path.join(get_datasets_root(), "shapes"))
