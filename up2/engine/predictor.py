"""Single-image inference with a trained UniPerceiverV2, in the manner of Detectron2's ``DefaultPredictor``.

``UP2Predictor(cfg)`` builds the model of ``cfg``, loads ``cfg.MODEL.WEIGHTS`` and runs one image through
any task at a time::

    predictor = UP2Predictor(cfg)
    image = detectron2.data.detection_utils.read_image("a.jpg", format="BGR")
    predictor(image)["instances"]                                   # detection (default)
    predictor(image, task="detection", vocabulary=["cat", "dog"])   # open vocabulary, this call only
    predictor(image, task="classification")["class_scores"]
    predictor(image, task="captioning")["caption"]
    predictor(image, task="retrieval", texts=["a cat", "a dog"])["ranked_texts"]

Inputs are BGR uint8 arrays of shape (H, W, 3), as ``cv2.imread`` returns them (like ``DefaultPredictor``);
they are converted to ``cfg.INPUT.FORMAT`` and transformed with the test-time augmentations of the task's
dataset mapper (:func:`up2.data.mappers.build_mapper`): resize of the shorter side to
``INPUT.MIN_SIZE_TEST`` for detection, resize + centre ``DATASETS.UP2.IMAGE_SIZE`` square for the others.
"""
import contextlib
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

import up2.modeling  # noqa: F401  (registers UniPerceiverV2 in META_ARCH_REGISTRY)
from up2.checkpoint import AtomicCheckpointer
from up2.config import TASK_TYPES
from up2.data.mappers import build_mapper


__all__ = ["UP2Predictor", "IMAGE_TASKS", "VOCABULARY_TASKS"]

logger = logging.getLogger(__name__)

# Tasks the predictor runs on an image (MLM takes text only).
IMAGE_TASKS = tuple(t for t in TASK_TYPES if t != "mlm")
# Tasks whose target set is a list of class names (open vocabulary).
VOCABULARY_TASKS = ("detection", "classification")


class UP2Predictor:
    """
    Builds the model of ``cfg`` (``detectron2.modeling.build_model``) in eval mode and loads
    ``cfg.MODEL.WEIGHTS`` (nothing is loaded when it is empty: random weights, with a warning).

    Args:
        cfg: a config with up2's keys (:func:`up2.config.add_up2_config`); cloned, not modified.

    Attributes:
        model: the :class:`~up2.modeling.meta_arch.UniPerceiverV2`.
        input_format: ``cfg.INPUT.FORMAT``, the channel order the model receives ("RGB" or "BGR").
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"UP2Predictor: INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")
        self.model = build_model(self.cfg)
        self.model.eval()
        if self.cfg.MODEL.WEIGHTS:
            AtomicCheckpointer(self.model, strict=self.cfg.MODEL.UP2.WEIGHTS_STRICT).load(self.cfg.MODEL.WEIGHTS)
        else:
            logger.warning("UP2Predictor: MODEL.WEIGHTS is empty; the model keeps its random initialisation")
        self._augmentations: Dict[str, T.AugmentationList] = {}

    def augmentations(self, task: str) -> T.AugmentationList:
        """The test-time augmentations of ``task``'s dataset mapper (built once per task)."""
        if task not in self._augmentations:
            self._augmentations[task] = build_mapper(self.cfg, task, is_train=False).augmentations
        return self._augmentations[task]

    def set_vocabulary(self, task: str, class_names: Sequence[str]):
        """Replaces the class names of ``task`` ("detection" or "classification") for every later call."""
        self.model.set_vocabulary(task, list(class_names))

    def vocabulary(self, task: str) -> Optional[List[str]]:
        """Current class names of ``task`` (None when the config's datasets name none)."""
        return self.model.vocabulary(task)

    def preprocess(self, original_image: np.ndarray, task: str) -> Dict:
        """The model input dict of one BGR image: ``{"task", "image": (3, h, w) uint8 in INPUT.FORMAT,
        "height", "width"}`` (height / width: the original size)."""
        if not isinstance(original_image, np.ndarray) or original_image.ndim != 3 or original_image.shape[2] != 3:
            shape = getattr(original_image, "shape", None)
            raise ValueError(f"UP2Predictor: expected a (H, W, 3) BGR numpy image, got {type(original_image).__name__}"
                             f" of shape {shape}")
        if original_image.dtype != np.uint8:
            raise ValueError(f"UP2Predictor: expected a uint8 image, got dtype {original_image.dtype}")
        if self.input_format == "RGB":  # BGR -> RGB, as DefaultPredictor does
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(original_image))
        self.augmentations(task)(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return {"task": task, "image": image, "height": height, "width": width}

    def __call__(self, original_image: np.ndarray, task: str = "detection",
                 vocabulary: Optional[Sequence[str]] = None, texts: Optional[Sequence[str]] = None) -> Dict:
        """
        Args:
            original_image: (H, W, 3) uint8 image in **BGR** order (``cv2.imread`` /
                ``read_image(path, format="BGR")``), converted to ``INPUT.FORMAT`` here.
            task: "detection", "classification", "captioning" or "retrieval".
            vocabulary: class names for "detection" / "classification" used by THIS call only (the
                previous vocabulary is restored afterwards; see :meth:`set_vocabulary` to keep one).
            texts: for "retrieval": texts ranked by their similarity to the image.

        Returns:
            the model's output for the image, at the original size:

            * detection: ``{"instances": Instances}`` (pred_boxes, scores, pred_classes, pred_masks) of
              image size (H, W); ``pred_classes`` index the vocabulary;
            * classification: ``{"class_scores": (C,)}`` probabilities over the vocabulary;
            * captioning: ``{"caption": str}``;
            * retrieval: ``{"image_embedding": (d,)}`` (unit vector) and, with ``texts``,
              ``"text_embeddings"`` (K, d), ``"text_scores"`` (K,) cosine similarities in the order of
              ``texts``, and ``"ranked_texts"``: ``[(text, score), ...]`` best first.
        """
        if task not in IMAGE_TASKS:
            raise ValueError(f"UP2Predictor: unknown task {task!r}; expected one of {list(IMAGE_TASKS)}")
        if vocabulary is not None and task not in VOCABULARY_TASKS:
            raise ValueError(f"UP2Predictor: task {task!r} takes no vocabulary (only {list(VOCABULARY_TASKS)})")
        if texts is not None and task != "retrieval":
            raise ValueError(f"UP2Predictor: texts are ranked by the 'retrieval' task, not {task!r}")
        if texts is not None and (isinstance(texts, str) or len(texts) == 0):
            raise ValueError(f"UP2Predictor: texts must be a non-empty list of strings, got {texts!r}")
        inputs = self.preprocess(original_image, task)
        if texts is not None:
            inputs["captions"] = list(texts)
        with torch.no_grad(), self._vocabulary(task, vocabulary):
            output = self.model([inputs])[0]
        if texts is not None:
            scores = output["text_embeddings"] @ output["image_embedding"]
            output["text_scores"] = scores
            order = torch.argsort(scores, descending=True).tolist()
            output["ranked_texts"] = [(texts[i], float(scores[i])) for i in order]
        return output

    @contextlib.contextmanager
    def _vocabulary(self, task: str, vocabulary: Optional[Sequence[str]]):
        """Sets ``vocabulary`` (if given) for the duration of the block, then restores the previous one."""
        if vocabulary is None:
            yield
            return
        previous = self.model.vocabulary(task)
        self.model.set_vocabulary(task, list(vocabulary))
        try:
            yield
        finally:
            if previous:
                self.model.set_vocabulary(task, previous)
            else:  # the model had no class names before this call
                self.model.tasks[task].class_names = None
