"""Inference with an exported up2 graph: onnxruntime, numpy and Pillow only (no PyTorch).

``OnnxPredictor(path)`` reads the graph's metadata (:mod:`up2.deploy.metadata`) and takes images the way
:class:`up2.engine.UP2Predictor` does (BGR uint8 (H, W, 3) arrays), with the same test-time resize
(Detectron2's ``ResizeShortestEdge`` arithmetic and Pillow filter; classification's centre crop)::

    predictor = OnnxPredictor("detector.onnx")
    result = predictor(image_bgr)   # {"boxes", "scores", "classes", "masks"} at the image's size
    predictor.class_names           # what "classes" index

The graph's input has a fixed size (H, W) (``predictor.image_size``); the batch is dynamic. A resized
detection image is placed at the top-left of its H x W slot (the graph masks the rest, as a padded batch
does in PyTorch); an image whose resized size does not fit is scaled down to fit, with a warning.
Detections then go through the steps that depend on their values, as ``detections_to_instances`` does:
score threshold, boxes scaled to the original size and clipped, empty boxes dropped, masks cropped to the
image, resized bilinearly (as ``F.interpolate(align_corners=False)``) and thresholded.
"""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from up2.deploy.metadata import INPUT_NAMES, OUTPUT_NAMES, ExportMetadata

__all__ = ["OnnxPredictor", "resized_shape", "resize_bilinear", "preprocess_image"]

logger = logging.getLogger(__name__)


def resized_shape(height: int, width: int, short_edge_length: int, max_size: int) -> Tuple[int, int]:
    """(h, w) after ``ResizeShortestEdge(short_edge_length, max_size)`` (Detectron2's arithmetic)."""
    scale = short_edge_length / min(height, width)
    new_h, new_w = (short_edge_length, scale * width) if height < width else (scale * height, short_edge_length)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def _resize_uint8(image: np.ndarray, height: int, width: int, interp: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), interp))


def preprocess_image(image: np.ndarray, steps: Sequence[Dict]) -> np.ndarray:
    """Applies the metadata's preprocessing steps to an (H, W, 3) uint8 image."""
    for step in steps:
        height, width = image.shape[:2]
        if step["op"] == "resize_shortest_edge":
            new_h, new_w = resized_shape(height, width, step["short_edge_length"], step["max_size"])
            image = _resize_uint8(image, new_h, new_w, step["interp"])
        else:  # center_crop (validated by ExportMetadata)
            crop_h, crop_w = min(step["size"], height), min(step["size"], width)
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            image = image[top:top + crop_h, left:left + crop_w]
    return image


def _bilinear_axis(in_size: int, out_size: int):
    """Source indices (i0, i1) and weight of i1 along one axis, as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes them (source coordinates clamped at 0)."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * np.float32(scale) - 0.5, 0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low).astype(np.float32)


def resize_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, h, w) float maps -> (K, height, width), ``F.interpolate(mode="bilinear", align_corners=False)``."""
    if maps.shape[-2:] == (height, width):
        return maps
    y0, y1, wy = _bilinear_axis(maps.shape[-2], height)
    x0, x1, wx = _bilinear_axis(maps.shape[-1], width)
    rows = maps[:, y0] * (1 - wy)[:, None] + maps[:, y1] * wy[:, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


class OnnxPredictor:
    """
    Args:
        path: an ``.onnx`` file written by :func:`up2.deploy.export.export_onnx`.
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default).
        providers: onnxruntime execution providers.

    Attributes:
        metadata: :class:`~up2.deploy.metadata.ExportMetadata` of the graph.
        task, class_names, image_size: from the metadata.
    """

    def __init__(self, path: str, num_threads: Optional[int] = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = onnxruntime.InferenceSession(path, options, providers=list(providers))
        self.metadata = ExportMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, path)
        self.task, self.class_names = self.metadata.task, self.metadata.class_names
        self.image_size = self.metadata.image_size
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES[self.task]:
            raise ValueError(f"{path}: graph inputs {list(names)}; a {self.task} export has "
                             f"{list(INPUT_NAMES[self.task])}")
        self._warned_scaling = False

    # ------------------------------------------------------------------ inputs
    def prepare(self, image_bgr: np.ndarray) -> np.ndarray:
        """(H, W, 3) BGR uint8 -> (h, w, 3) uint8 in the graph's channel order, resized as at test time."""
        if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"OnnxPredictor: expected a (H, W, 3) BGR numpy image, got {type(image_bgr).__name__} "
                             f"of shape {getattr(image_bgr, 'shape', None)}")
        if image_bgr.dtype != np.uint8:
            raise ValueError(f"OnnxPredictor: expected a uint8 image, got dtype {image_bgr.dtype}")
        image = image_bgr[:, :, ::-1] if self.metadata.input_format == "RGB" else image_bgr
        image = preprocess_image(np.ascontiguousarray(image), self.metadata.preprocessing)
        slot_h, slot_w = self.image_size
        height, width = image.shape[:2]
        if height > slot_h or width > slot_w:
            scale = min(slot_h / height, slot_w / width)
            new_h, new_w = min(slot_h, int(height * scale + 0.5)), min(slot_w, int(width * scale + 0.5))
            if not self._warned_scaling:
                logger.warning("OnnxPredictor: a %dx%d input is larger than the graph's %dx%d: scaled to %dx%d (export "
                               "with --image-size for this aspect ratio to keep the model's resolution)",
                               height, width, slot_h, slot_w, new_h, new_w)
                self._warned_scaling = True
            image = _resize_uint8(image, new_h, new_w, Image.BILINEAR)
        return image

    def batch(self, images: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        """Graph inputs of prepared (h, w, 3) images: ``images`` (B, 3, H, W) uint8 (each at the top-left,
        zeros elsewhere) and, for detection, ``image_sizes`` (B, 2) int64."""
        slot_h, slot_w = self.image_size
        batch = np.zeros((len(images), 3, slot_h, slot_w), dtype=np.uint8)
        sizes = np.zeros((len(images), 2), dtype=np.int64)
        for i, image in enumerate(images):
            height, width = image.shape[:2]
            if self.task == "classification" and (height, width) != (slot_h, slot_w):
                raise ValueError(f"OnnxPredictor: a classification input must be {slot_h}x{slot_w}, got "
                                 f"{height}x{width}")
            batch[i, :, :height, :width] = image.transpose(2, 0, 1)
            sizes[i] = (height, width)
        return {"images": batch, "image_sizes": sizes} if self.task == "detection" else {"images": batch}

    # ------------------------------------------------------------------ inference
    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The graph's raw outputs (see :class:`~up2.deploy.graphs.DetectionGraph` / ``ClassificationGraph``)."""
        return dict(zip(OUTPUT_NAMES[self.task], self.session.run(list(OUTPUT_NAMES[self.task]), feeds)))

    def predict(self, images_bgr: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        """One result per BGR image (one graph call for all of them).

        Returns:
            detection: ``{"boxes": (K, 4) float32 xyxy at the image's size, "scores": (K,), "classes": (K,)
            int64 into class_names, "masks": (K, H, W) bool}``; classification: ``{"class_scores": (C,)}``.
        """
        if not len(images_bgr):
            return []
        prepared = [self.prepare(image) for image in images_bgr]
        outputs = self.run(self.batch(prepared))
        if self.task == "classification":
            return [{"class_scores": scores} for scores in outputs["class_scores"]]
        return [self._detections(outputs, i, image.shape[:2], original.shape[:2])
                for i, (image, original) in enumerate(zip(prepared, images_bgr))]

    def __call__(self, image_bgr: np.ndarray) -> Dict[str, np.ndarray]:
        return self.predict([image_bgr])[0]

    def _detections(self, outputs: Dict[str, np.ndarray], index: int, size: Tuple[int, int],
                    original_size: Tuple[int, int]) -> Dict[str, np.ndarray]:
        """Detections of image ``index`` of size ``size`` (graph input) at ``original_size``."""
        scores = outputs["scores"][index]
        keep = scores > self.metadata.score_threshold
        boxes, scores = outputs["boxes"][index][keep], scores[keep]
        classes, mask_logits = outputs["classes"][index][keep], outputs["mask_logits"][index][keep]
        (height, width), (out_h, out_w) = size, original_size
        boxes = boxes * np.array([out_w / width, out_h / height] * 2, dtype=np.float32)
        boxes = np.clip(boxes, 0, np.array([out_w, out_h] * 2, dtype=np.float32))
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        mask_logits = resize_bilinear(mask_logits[nonempty][:, :height, :width], out_h, out_w)
        threshold = self.metadata.mask_threshold
        # sigmoid(x) > t  <=>  x > logit(t)
        logit = math.inf if threshold >= 1 else (-math.inf if threshold <= 0 else math.log(threshold / (1 - threshold)))
        return {"boxes": boxes[nonempty], "scores": scores[nonempty], "classes": classes[nonempty],
                "masks": mask_logits > logit}
