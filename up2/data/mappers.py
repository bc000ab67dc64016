"""Dataset mappers, one per task: a dataset dict (see :mod:`up2.data.datasets.register`) becomes the
model's input dict, Detectron2 style (``@configurable``, ``from_config(cfg, is_train)``).

Every output carries ``"task"`` (a registered task type, :mod:`up2.task_specs`). Images are Detectron2's
``(3, H, W)`` uint8 tensors in ``INPUT.FORMAT``; normalisation happens in the model.

Augmentation (paper Appendix B) uses Detectron2's ``detectron2.data.transforms`` on numpy images,
so randomness comes from numpy's global RNG, which Detectron2 reseeds in every DataLoader worker
(``worker_init_reset_seed``); ``np.random.seed(s)`` makes a mapper's output reproducible.

* classification, captioning, retrieval: training takes a random resized crop (area fraction in
  ``DATASETS.UP2.CLASSIFICATION_CROP_SCALE`` / ``IMAGE_TEXT_CROP_SCALE``, aspect ratio in [3/4, 4/3])
  resized to ``IMAGE_SIZE`` x ``IMAGE_SIZE``, then a horizontal flip with probability 0.5 where
  ``CLASSIFICATION_RANDOM_FLIP`` / ``IMAGE_TEXT_RANDOM_FLIP`` allow it (off for image-text by default:
  a flip contradicts captions that say "left of" / "right of"); test
  resizes the shorter side to ``IMAGE_SIZE / crop_ratio`` (0.875 for classification, 1 for image-text)
  and takes the centre square.
* detection: shorter side drawn from ``INPUT.MIN_SIZE_TRAIN`` (``MIN_SIZE_TRAIN_SAMPLING``) with the
  longer side at most ``MAX_SIZE_TRAIN``, THEN a crop of ``INPUT.CROP.SIZE`` when ``INPUT.CROP.ENABLED``
  (the paper resizes to [200, 1800] then crops 1600 x 1600; Detectron2's own mapper crops first),
  then ``INPUT.RANDOM_FLIP``.
* mlm: text is passed through; tokenisation and masking happen in the model.
"""
import io
import logging
import math
from typing import List, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry
from PIL import Image

from up2.task_specs import TASK_SPEC_REGISTRY

__all__ = ["RandomResizedCrop", "CenterCrop", "ClassificationMapper", "CaptioningMapper", "RetrievalMapper",
           "MLMMapper", "DetectionMapper", "build_detection_augmentation", "build_mapper", "ImageReadError",
           "MAPPER_REGISTRY"]

logger = logging.getLogger(__name__)

MAPPER_REGISTRY = Registry("UP2_MAPPER")
MAPPER_REGISTRY.__doc__ = """Dataset mappers, built as ``Mapper(cfg, is_train)``; a task type names its mapper in
its :class:`~up2.task_specs.TaskSpec`."""


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image; the message names the file.

    ``reason`` is ``"missing_image"`` for a file that does not exist, else ``"unreadable_image"`` (the
    reasons counted by :mod:`up2.data.bad_samples`).
    """

    def __init__(self, message: str, reason: str = "unreadable_image"):
        super().__init__(message)
        self.reason = reason


def _image_read_error(name, error: Exception) -> ImageReadError:
    reason = "missing_image" if isinstance(error, FileNotFoundError) else "unreadable_image"
    return ImageReadError(f"Cannot read image {name}: {type(error).__name__}: {error}", reason)


def read_image(file_name: str, image_format: str) -> np.ndarray:
    """``detectron2.data.detection_utils.read_image`` raising :class:`ImageReadError` naming the file."""
    try:
        return utils.read_image(file_name, format=image_format)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for corrupt files
        raise _image_read_error(file_name, e) from e


def _decode_image_bytes(data: bytes, image_format: str, name: str) -> np.ndarray:
    """Decodes an encoded image held in memory as ``read_image`` does a file (EXIF orientation applied,
    ``image_format`` channels), raising :class:`ImageReadError` naming ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as pil_image:
            return utils.convert_PIL_to_numpy(utils._apply_exif_orientation(pil_image), image_format)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _image_read_error(name, e) from e


class RandomResizedCrop(T.Augmentation):
    """Crop a random region (area fraction in ``scale``, aspect ratio log-uniform in ``ratio``) and
    resize it to ``size`` x ``size`` (torchvision's RandomResizedCrop, with numpy's global RNG)."""

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), interp=Image.BICUBIC):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * np.random.uniform(*self.scale)
            aspect = math.exp(np.random.uniform(*log_ratio))
            cw = int(round(math.sqrt(target_area * aspect)))
            ch = int(round(math.sqrt(target_area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                y0, x0 = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)
                break
        else:  # fall back to the largest centre crop with an aspect ratio inside `ratio`
            aspect = min(max(w / h, self.ratio[0]), self.ratio[1])
            cw, ch = (w, int(round(w / aspect))) if w / h <= aspect else (int(round(h * aspect)), h)
            cw, ch = min(cw, w), min(ch, h)
            y0, x0 = (h - ch) // 2, (w - cw) // 2
        return T.TransformList([T.CropTransform(x0, y0, cw, ch),
                                T.ResizeTransform(ch, cw, self.size, self.size, self.interp)])


class CenterCrop(T.Augmentation):
    """Crop the centre ``size`` x ``size`` square (or the whole side when it is shorter)."""

    def __init__(self, size: int):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        ch, cw = min(self.size, h), min(self.size, w)
        return T.CropTransform((w - cw) // 2, (h - ch) // 2, cw, ch)


def _square_image_augmentations(image_size: int, is_train: bool, crop_scale, test_crop_ratio: float,
                                flip: bool = True):
    if is_train:
        augmentations = [RandomResizedCrop(image_size, scale=tuple(crop_scale))]
        return augmentations + [T.RandomFlip(horizontal=True)] if flip else augmentations
    short = int(round(image_size / test_crop_ratio))
    return [T.ResizeShortestEdge(short, max_size=10 ** 9, sample_style="choice", interp=Image.BICUBIC),
            CenterCrop(image_size)]


class _SquareImageMapper:
    """Reads ``dataset_dict["file_name"]`` (or decodes ``dataset_dict["image_bytes"]``) and applies square
    augmentations (see module doc)."""

    task = ""

    @configurable
    def __init__(self, *, is_train: bool, augmentations: List[T.Augmentation], image_format: str):
        """
        Args:
            is_train: training (random crop/flip, one caption) or test (centre crop, all captions).
            augmentations: Detectron2 augmentations producing the square image.
            image_format: ``INPUT.FORMAT`` ("RGB" or "BGR").
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logger.info("%s (%s) augmentations: %s", type(self).__name__, "train" if is_train else "test",
                    augmentations)

    _crop_scale_key = "CLASSIFICATION_CROP_SCALE"
    _flip_key = "CLASSIFICATION_RANDOM_FLIP"
    _test_crop_ratio = 0.875

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        size = cfg.DATASETS.UP2.IMAGE_SIZE
        scale = cfg.DATASETS.UP2.get(cls._crop_scale_key)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"DATASETS.UP2.{cls._crop_scale_key} must be [min, max] with 0 < min <= max <= 1, "
                             f"got {list(scale)}")
        return {"is_train": is_train, "image_format": cfg.INPUT.FORMAT,
                "augmentations": _square_image_augmentations(size, is_train, scale, cls._test_crop_ratio,
                                                             bool(cfg.DATASETS.UP2.get(cls._flip_key)))}

    def _load_image(self, dataset_dict: dict) -> dict:
        # An encoded image held in memory ("image_bytes", named by "source": tar shards, see
        # up2.data.shards) is decoded instead of reading "file_name"; the output keeps whichever of
        # "file_name" / "source" the input has.
        if "image_bytes" in dataset_dict:
            image = _decode_image_bytes(dataset_dict["image_bytes"], self.image_format,
                                        dataset_dict.get("source", "<in-memory image>"))
        else:
            image = read_image(dataset_dict["file_name"], self.image_format)
        height, width = image.shape[:2]
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        out = {"image": image, "image_id": dataset_dict["image_id"], "height": height, "width": width,
               "task": self.task}
        for key in ("file_name", "source"):
            if key in dataset_dict:
                out[key] = dataset_dict[key]
        return out


@MAPPER_REGISTRY.register()
class ClassificationMapper(_SquareImageMapper):
    """``{"file_name", "image_id", "label"}`` -> ``{"image": (3, S, S) uint8, "label", "image_id",
    "height", "width" (original size), "file_name", "task": "classification"}``."""

    task = "classification"

    def __call__(self, dataset_dict: dict) -> dict:
        out = self._load_image(dataset_dict)
        out["label"] = int(dataset_dict["label"])
        return out


@MAPPER_REGISTRY.register()
class CaptioningMapper(_SquareImageMapper):
    """``{"file_name", "image_id", "captions", "caption_ids", ...}`` -> ``{"image": (3, S, S) uint8,
    "image_id", "height", "width", "file_name", "task"}`` plus, in training, one caption drawn
    uniformly (``"caption"``, ``"caption_id"``), at test time all of them (``"captions"``,
    ``"caption_ids"``)."""

    task = "captioning"
    _crop_scale_key = "IMAGE_TEXT_CROP_SCALE"
    _flip_key = "IMAGE_TEXT_RANDOM_FLIP"
    _test_crop_ratio = 1.0

    def __call__(self, dataset_dict: dict) -> dict:
        captions = dataset_dict["captions"]
        if not captions:
            raise ValueError(f"Image {dataset_dict['file_name']} (id {dataset_dict['image_id']}) has no caption")
        caption_ids = dataset_dict.get("caption_ids") or list(range(len(captions)))
        out = self._load_image(dataset_dict)
        if self.is_train:
            i = np.random.randint(len(captions))
            out["caption"], out["caption_id"] = captions[i], caption_ids[i]
        else:
            out["captions"], out["caption_ids"] = list(captions), list(caption_ids)
        return out


@MAPPER_REGISTRY.register()
class RetrievalMapper(CaptioningMapper):
    """As :class:`CaptioningMapper` (one caption per image in training, all at test), task "retrieval"."""

    task = "retrieval"


@MAPPER_REGISTRY.register()
class MLMMapper:
    """``{"text", "text_id"}`` -> ``{"text", "text_id", "task": "mlm"}`` (masking is the model's)."""

    @configurable
    def __init__(self, *, is_train: bool):
        self.is_train = is_train

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"is_train": is_train}

    def __call__(self, dataset_dict: dict) -> dict:
        return {"text": dataset_dict["text"], "text_id": dataset_dict["text_id"], "task": "mlm"}


def build_detection_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """Detection augmentations of the paper (Appendix B) from ``INPUT.*``: resize, crop, flip."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augs


@MAPPER_REGISTRY.register()
class DetectionMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` with :func:`build_detection_augmentation` (crop after resize),
    adding ``"task": "detection"`` and naming the file of an unreadable image. With cropping and
    ``INPUT.MASK_FORMAT: "bitmask"``, polygons are rasterised first (no shapely needed); cropping
    ``"polygon"`` masks needs shapely, checked when the mapper is built."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = build_detection_augmentation(cfg, is_train)
        ret["rasterize_polygons"] = bool(is_train and cfg.INPUT.CROP.ENABLED and cfg.MODEL.MASK_ON
                                         and cfg.INPUT.MASK_FORMAT == "bitmask")
        if is_train and cfg.INPUT.CROP.ENABLED and cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "polygon":
            try:  # Detectron2 (fvcore) crops polygons with shapely
                import shapely.geometry  # noqa: F401
            except ImportError as e:
                raise ImportError("Cropping polygon masks (INPUT.CROP.ENABLED with INPUT.MASK_FORMAT "
                                  "'polygon') needs shapely: `pip install shapely`, or set "
                                  "INPUT.MASK_FORMAT 'bitmask'") from e
        return ret

    @configurable
    def __init__(self, is_train: bool = True, *, rasterize_polygons: bool = False, **kwargs):
        """
        Args:
            rasterize_polygons: turn polygon annotations into RLE before the transforms (bitmask
                masks with cropping: Detectron2 would otherwise crop polygons with shapely).
            is_train, kwargs: see ``DatasetMapper``.
        """
        super().__init__(is_train, **kwargs)
        self.rasterize_polygons = rasterize_polygons

    def _rasterized(self, dataset_dict: dict) -> dict:
        from pycocotools import mask as mask_util

        height, width = dataset_dict["height"], dataset_dict["width"]
        annotations = []
        for ann in dataset_dict.get("annotations", []):
            if isinstance(ann.get("segmentation"), list):
                rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], height, width))
                ann = {**ann, "segmentation": rle}
            annotations.append(ann)
        return {**dataset_dict, "annotations": annotations}

    def __call__(self, dataset_dict: dict) -> dict:
        if self.is_train and self.rasterize_polygons and "annotations" in dataset_dict:
            dataset_dict = self._rasterized(dataset_dict)
        try:
            out = super().__call__(dataset_dict)
        except ImageReadError:
            raise
        except (OSError, SyntaxError) as e:
            raise _image_read_error(dataset_dict.get("file_name"), e) from e
        out["task"] = "detection"
        return out


def build_mapper(cfg, task_type: str, is_train: bool):
    """The mapper that the :class:`~up2.task_specs.TaskSpec` of ``task_type`` names, built from ``cfg``."""
    if task_type not in TASK_SPEC_REGISTRY:
        raise ValueError(f"No mapper for task type {task_type!r}; valid types are "
                         f"{list(TASK_SPEC_REGISTRY.task_types())}")
    return MAPPER_REGISTRY.get(TASK_SPEC_REGISTRY.get(task_type).mapper)(cfg, is_train)
