"""Registers the datasets up2 knows by name, under the Detectron2 dataset root.

The root is ``$DETECTRON2_DATASETS`` (default ``./datasets``), as in Detectron2. The embedded
``shapes`` dataset lives in ``<root>/shapes`` and is created by ``python -m up2.data.shapes``.
The datasets of the paper configs are registered by :func:`register_all_up2_datasets` (their layout
and the scripts that prepare them: ``datasets/README.md``); COCO detection is Detectron2's own
``coco_2017_{train,val}``. Registration never reads the disk: a missing file is reported, with the
script to run, when the dataset is loaded.
"""
import os

from up2.data.datasets.register import (
    register_caption_dataset,
    register_class_folder_dataset,
    register_coco_instances_dataset,
    register_image_text_shards,
    register_text_dataset,
)

__all__ = ["get_datasets_root", "register_all_shapes", "register_all_up2_datasets", "SHAPES_SPLITS",
           "IMAGE_TEXT_SHARD_DATASETS"]

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


# Image-text pair corpora stored as tar shards: registered name -> directory under the root.
IMAGE_TEXT_SHARD_DATASETS = {
    "cc3m_train": "cc3m",
    "cc12m_train": "cc12m",
    "sbu_train": "sbu",
    "vg_caption_train": "vg",
    "yfcc14m_train": "yfcc14m",
}


def _hint(command: str) -> str:
    return f"Create it with: {command} (see datasets/README.md)"


def register_all_up2_datasets(root: str, prefix: str = ""):
    """Registers the real datasets of the paper configs under ``root`` (names prefixed by ``prefix``):

    * ``coco_caption_karpathy_{train,val,test}``: ``coco_karpathy/captions_{split}.json``, images
      under ``coco/`` (captioning and retrieval);
    * ``flickr30k_{train,val,test}``: ``flickr30k/captions_{split}.json``, images under
      ``flickr30k/flickr30k-images`` (retrieval);
    * ``imagenet_{train,val}``: ``imagenet/{split}/<wnid>/*.JPEG`` and ``imagenet/class_names.json``;
    * ``cc3m_train``, ``cc12m_train``, ``sbu_train``, ``vg_caption_train``, ``yfcc14m_train``: tar
      shards in ``<corpus>/shards/`` with ``shards.json`` (:data:`IMAGE_TEXT_SHARD_DATASETS`);
    * ``bookswiki_train``: ``bookswiki/train.txt``, one passage per line (masked language modelling).

    Args:
        root: the dataset root (``$DETECTRON2_DATASETS``).
        prefix: prepended to every name (tests register miniature copies this way).
    """
    join = os.path.join
    scripts = "python datasets/"
    for split in ("train", "val", "test"):
        register_caption_dataset(
            f"{prefix}coco_caption_karpathy_{split}", join(root, "coco_karpathy", f"captions_{split}.json"),
            join(root, "coco"), _hint(f"{scripts}prepare_coco_karpathy.py --karpathy-json "
                                      f"{join(root, 'coco_karpathy', 'dataset_coco.json')} --coco-root "
                                      f"{join(root, 'coco')} --out {join(root, 'coco_karpathy')}"))
        register_caption_dataset(
            f"{prefix}flickr30k_{split}", join(root, "flickr30k", f"captions_{split}.json"),
            join(root, "flickr30k", "flickr30k-images"),
            _hint(f"{scripts}prepare_flickr30k.py --karpathy-json "
                  f"{join(root, 'flickr30k', 'dataset_flickr30k.json')} --out {join(root, 'flickr30k')}"))
    for split in ("train", "val"):
        register_class_folder_dataset(
            f"{prefix}imagenet_{split}", join(root, "imagenet", split), join(root, "imagenet", "class_names.json"),
            _hint(f"{scripts}prepare_imagenet.py --out {join(root, 'imagenet')} --devkit ILSVRC2012_devkit_t12.tar.gz "
                  f"--{split}-images ILSVRC2012_img_{split}.tar"),
            lazy_metadata=True)
    for name, directory in IMAGE_TEXT_SHARD_DATASETS.items():
        register_image_text_shards(
            f"{prefix}{name}", join(root, directory, "shards"),
            prepare_hint=_hint(f"{scripts}prepare_image_text_shards.py --input <pairs.tsv> "
                               f"--out {join(root, directory, 'shards')}"))
    register_text_dataset(
        f"{prefix}bookswiki_train", join(root, "bookswiki", "train.txt"),
        _hint(f"{scripts}prepare_text_corpus.py --input <raw text files or dirs> "
              f"--out {join(root, 'bookswiki', 'train.txt')}"))


register_all_shapes(os.path.join(get_datasets_root(), "shapes"))
register_all_up2_datasets(get_datasets_root())
