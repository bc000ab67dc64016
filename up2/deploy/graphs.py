"""Image-in, predictions-out modules with a fixed vocabulary: what :func:`up2.deploy.export.export_onnx`
traces into an ONNX graph.

The class names are encoded once, here, by the text encoder and the unified decoder (``<SPE> name``
through the shared network, as at inference) and kept as a buffer: the traced graph holds them as
constants and contains neither the tokenizer nor the text encoder. Everything else is the PyTorch
model's own inference path (the task modules' logits, the proposer's boxes and masks), so the graph
computes what ``model([{"task": ..., "image": ...}])`` computes, up to the steps that depend on the
values of the outputs (score threshold, empty boxes, resizing to the original image), which the
runtime (:mod:`up2.deploy.runtime`) applies.
"""
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from up2.deploy.metadata import INPUT_NAMES, OUTPUT_NAMES
from up2.modeling.tasks.classification import image_tensor_spe

__all__ = ["DetectionGraph", "ClassificationGraph", "build_export_graph", "EXPORT_TASKS"]

EXPORT_TASKS = tuple(INPUT_NAMES)


def _class_targets(model, task: str, class_names: Sequence[str]) -> torch.Tensor:
    """(C, d) decoder outputs of ``class_names`` (set as the model's vocabulary of ``task``), detached."""
    if isinstance(class_names, str) or not class_names:
        raise ValueError(f"export: the {task} vocabulary is empty ({class_names!r}); give a non-empty list of "
                         "class names, e.g. ['circle', 'square']")
    model.set_vocabulary(task, list(class_names))
    with torch.no_grad():
        return model.tasks[task].class_embeddings(model).detach().float().clone()


class _ImageGraph(nn.Module):
    """Normalisation and padding of a (B, 3, H, W) batch as the model's ``preprocess_images`` does it."""

    def __init__(self, model, task: str, class_names: Sequence[str]):
        super().__init__()
        if model.training:
            raise ValueError("export: the model must be in eval mode (call model.eval())")
        self.model = model
        self.task = task
        self.class_names = list(class_names)
        self.register_buffer("class_targets", _class_targets(model, task, class_names))
        self.eval()  # the exporter restores this mode (of the model too) after tracing

    def normalized_images(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            images: (B, 3, H, W) uint8 or float pixels in the model's ``INPUT.FORMAT``.
            image_sizes: (B, 2) int64 (h, w): each image fills the top-left h x w of its H x W slot.

        Returns:
            normalised images (B, 3, H', W') padded with zeros to the model's size divisibility (zero
            outside each image, as ``ImageList`` pads) and their padding mask (B, H', W') bool.
        """
        height, width = images.shape[-2:]
        divisor = self.model.size_divisibility
        x = (images.float() - self.model.pixel_mean) / self.model.pixel_std
        x = F.pad(x, (0, (-width) % divisor, 0, (-height) % divisor))
        rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
        cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
        sizes = image_sizes.to(torch.long)
        padding = (rows >= sizes[:, 0].view(-1, 1, 1)) | (cols >= sizes[:, 1].view(-1, 1, 1))
        return x.masked_fill(padding[:, None], 0.0), padding


class DetectionGraph(_ImageGraph):
    """Detection and instance segmentation with a fixed vocabulary (``DetectionTask.inference`` as tensors).

    Args:
        model: a :class:`~up2.modeling.meta_arch.UniPerceiverV2` in eval mode; its detection vocabulary is
            set to ``class_names``.
        class_names: the C class names the detections range over.

    ``forward(images, image_sizes)``: see :meth:`forward`. K = min(``MODEL.UP2.TEST.DETECTIONS_PER_IMAGE``,
    O * C) detections per image, best first, before the score threshold.
    """

    output_names = OUTPUT_NAMES["detection"]

    def __init__(self, model, class_names: Sequence[str]):
        super().__init__(model, "detection", class_names)
        head = model.tasks["detection"]
        self.detections_per_image, self.score = head.detections_per_image, head.score

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """
        Args:
            images: (B, 3, H, W) uint8 / float pixels in ``INPUT.FORMAT``, each image at the top-left.
            image_sizes: (B, 2) int64 (h, w) of each image inside its slot (the rest is padding).

        Returns:
            tuple ``(boxes (B, K, 4) float xyxy in pixels of the h x w image, scores (B, K) float,
            classes (B, K) int64 indices into the class names, mask_logits (B, K, H', W') float over the
            padded slot)``; H' x W' is H x W rounded up to the size divisibility.
        """
        head, model = self.model.tasks["detection"], self.model
        x, padding = self.normalized_images(images, image_sizes)
        image = model.encode_images(x, padding)
        probs = head.class_logits(model, image, self.class_targets).float().softmax(-1)[..., :-1]  # (B, O, C)
        if self.score == "class_x_objectness":
            probs = probs * image["objectness"].float().sigmoid()[..., None]
        num_tokens, num_classes = probs.shape[1:]
        scores, flat = probs.flatten(1).topk(min(self.detections_per_image, num_tokens * num_classes), dim=1)
        tokens, classes = flat // num_classes, flat % num_classes
        boxes = image["boxes"].float().gather(1, tokens[..., None].expand(-1, -1, 4))  # (B, K, 4) cxcywh
        scale = image_sizes.flip(-1).float().repeat(1, 2)[:, None]                        # (B, 1, 4) = (w, h, w, h)
        center, size = boxes[..., :2], boxes[..., 2:]
        boxes = torch.cat([center - 0.5 * size, center + 0.5 * size], dim=-1) * scale
        masks = image["masks"]
        masks = masks.gather(1, tokens[..., None, None].expand(-1, -1, *masks.shape[-2:])).float()
        mask_logits = F.interpolate(masks, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return boxes, scores, classes, mask_logits


class ClassificationGraph(_ImageGraph):
    """Image classification with a fixed vocabulary (``ClassificationTask.inference`` as tensors).

    Args:
        model: a :class:`~up2.modeling.meta_arch.UniPerceiverV2` in eval mode; its classification
            vocabulary is set to ``class_names``.
        class_names: the C class names.
    """

    output_names = OUTPUT_NAMES["classification"]

    def __init__(self, model, class_names: Sequence[str]):
        super().__init__(model, "classification", class_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: (B, 3, H, W) uint8 / float pixels in ``INPUT.FORMAT`` (whole images, no padding).

        Returns:
            class_scores: (B, C) probabilities over the class names.
        """
        batch, _, height, width = images.shape
        sizes = torch.tensor([height, width], device=images.device).expand(batch, 2)
        x, padding = self.normalized_images(images, sizes)
        spe = image_tensor_spe(self.model, self.task, x, padding)
        return self.model.head(spe, self.class_targets.to(spe.dtype), self.task).float().softmax(-1)


_GRAPHS: Dict[str, type] = {"detection": DetectionGraph, "classification": ClassificationGraph}


def build_export_graph(model, task: str, class_names: Sequence[str]) -> _ImageGraph:
    """The export module of ``task`` (one of :data:`EXPORT_TASKS`) for ``model`` with ``class_names``.

    Raises:
        ValueError: another task, an empty vocabulary (or an empty / repeated class name), a model in
            training mode.
    """
    if task not in _GRAPHS:
        raise ValueError(f"export: task {task!r} cannot be exported; expected one of {list(EXPORT_TASKS)} "
                         "(captioning, retrieval and MLM decode or rank text, which a fixed graph does not hold)")
    return _GRAPHS[task](model, class_names)
