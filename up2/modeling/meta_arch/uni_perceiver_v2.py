"""Uni-Perceiver v2: one set of weights for detection, instance segmentation, classification, retrieval,
captioning and masked language modelling (paper §4).

Image encoder f_image (backbone + region proposer + global pooling) and text encoder f_text feed the
shared unified decoder g; every task scores inputs against a target set with the similarity head,
P(x, y) ∝ exp(cos(g(f(x)), g(f(y))) / τ). The task formulations live in ``TASK_REGISTRY``; each batch
holds inputs of ONE task (unmixed sampling), named by the ``"task"`` key of every input dict.
"""
import logging
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from up2.config import get_task_entries
from up2.modeling.build import build_task, build_text_encoder, build_unified_decoder
from up2.modeling.image_encoder import ImageEncoder
from up2.modeling.preprocessing import batch_images
from up2.modeling.similarity import SimilarityHead
from up2.modeling.tasks.targets import TargetEncoder
from up2.task_specs import TASK_SPEC_REGISTRY

__all__ = ["UniPerceiverV2"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class UniPerceiverV2(nn.Module):
    """
    Args:
        image_encoder: :class:`~up2.modeling.ImageEncoder`.
        text_encoder: a ``TEXT_ENCODER_REGISTRY`` module (tokenize / encode_ids / projection).
        decoder: the unified decoder (``DECODER_REGISTRY``).
        head: :class:`~up2.modeling.similarity.SimilarityHead` with one temperature per task type.
        tasks: task type -> task module (``TASK_REGISTRY``), every registered task type
            (:mod:`up2.task_specs`) in registration order.
        targets: :class:`~up2.modeling.tasks.targets.TargetEncoder` (class names, vocabulary).
        image_token_dim: width of the image encoder's tokens (projected to the decoder width).
        pixel_mean, pixel_std: input normalisation; size_divisibility: padding of batched images.
    """

    @configurable
    def __init__(self, *, image_encoder: ImageEncoder, text_encoder: nn.Module, decoder: nn.Module,
                 head: SimilarityHead, tasks: Mapping[str, nn.Module], targets: TargetEncoder, image_token_dim: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int = 32,
                 mixed_loss_weights: Optional[Mapping[str, float]] = None):
        super().__init__()
        self.image_encoder, self.text_encoder, self.decoder, self.head = image_encoder, text_encoder, decoder, head
        self.tasks = nn.ModuleDict(dict(tasks))
        # tasks whose target set is a list of class names (open vocabulary)
        self.class_name_tasks = tuple(task for task in self.tasks if task in TASK_SPEC_REGISTRY.class_name_task_types())
        self.targets = targets
        self.image_projection = nn.Sequential(nn.Linear(image_token_dim, decoder.dim), nn.LayerNorm(decoder.dim))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        # "mixed" sampling (paper Table 4): task type -> loss weight; None = one task per batch
        self.mixed_loss_weights = dict(mixed_loss_weights) if mixed_loss_weights is not None else None

    @classmethod
    def from_config(cls, cfg):
        image_encoder = ImageEncoder(cfg)
        tasks = {}
        for spec in TASK_SPEC_REGISTRY.specs():
            kwargs = {}
            if spec.has_class_names:
                datasets = _class_name_datasets(cfg, spec.task_type)
                kwargs["class_names"] = _default_class_names(datasets)
                kwargs["class_names_datasets"] = datasets
            tasks[spec.task_type] = build_task(cfg, spec.task_type, **kwargs)
        return {
            "image_encoder": image_encoder,
            "text_encoder": build_text_encoder(cfg),
            "decoder": build_unified_decoder(cfg),
            "head": SimilarityHead(cfg, groups=tuple(tasks)),
            "tasks": tasks,
            "targets": TargetEncoder(cfg.MODEL.UP2.HEAD.VOCAB_CHUNK_SIZE, cfg.MODEL.UP2.HEAD.VOCAB_CHECKPOINT,
                                     class_targets_grad=cfg.MODEL.UP2.HEAD.CLASS_TARGETS_GRAD,
                                     target_vocabulary=cfg.MODEL.UP2.HEAD.TARGET_VOCABULARY),
            "image_token_dim": cfg.MODEL.UP2.PROPOSER.HIDDEN_DIM,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": max(32, image_encoder.backbone.size_divisibility),
            "mixed_loss_weights": _mixed_loss_weights(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ shared encoders (used by tasks)
    def preprocess_images(self, batched_inputs: List[Dict]):
        """Normalised, padded images (ImageList) and their (B, H, W) padding mask (True at padding)."""
        return batch_images(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def encode_images(self, images: torch.Tensor, padding_mask: torch.Tensor, targets=None) -> Dict:
        """Image encoder outputs with the tokens projected to the decoder width.

        Returns:
            the :class:`ImageEncoder` outputs plus ``tokens`` (B, n, D) and ``padding_mask`` (B, n) (the
            decoder's image tokens), ``regional_tokens`` (B, O, D) projected, and ``regional_start``: index
            of the first regional token inside ``tokens`` (None when they are not part of it).
        """
        outputs = self.image_encoder(images, padding_mask, targets)
        num_regional = outputs["regional_tokens"].shape[1]
        outputs["tokens"] = self.image_projection(outputs["image_tokens"])
        outputs["padding_mask"] = outputs["image_padding_mask"]
        if self.image_encoder.image_tokens == "global":
            outputs["regional_start"] = None
            outputs["regional_tokens"] = self.image_projection(outputs["regional_tokens"])
        else:
            outputs["regional_start"] = outputs["tokens"].shape[1] - num_regional
            outputs["regional_tokens"] = outputs["tokens"][:, outputs["regional_start"]:]
        return outputs

    # ------------------------------------------------------------------ vocabulary
    def set_vocabulary(self, task: str, class_names: Sequence[str]):
        """Replaces the class names (target set) of ``task`` (a task with class names: "detection",
        "classification") without retraining: predictions then range over ``class_names``.

        Raises:
            ValueError: another task, an empty list, an empty or duplicate name.
        """
        if task not in self.class_name_tasks:
            raise ValueError(f"set_vocabulary: task {task!r} has no class vocabulary; expected one of "
                             f"{list(self.class_name_tasks)}")
        self.tasks[task].set_class_names(class_names)

    def vocabulary(self, task: str) -> Optional[List[str]]:
        """Current class names of ``task`` (None if unset)."""
        return self.tasks[task].class_names

    def train(self, mode: bool = True):
        self.targets.clear_cache()
        return super().train(mode)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: dicts of ONE task, each with ``"task"`` (a task type) and the keys of that
                task's mapper: ``image`` (C, H, W) (+ ``instances`` for detection training, ``label``
                for classification, ``caption`` / ``captions`` for captioning and retrieval), or ``text``
                for MLM; ``height`` / ``width`` give the output size of detections.

        Returns:
            training: dict of scalar losses (the same keys on every rank for a given task).
            inference: one dict per input: detection ``{"instances"}`` (pred_boxes, scores, pred_classes,
            pred_masks at the original size); classification ``{"class_scores": (C,)}``; captioning
            ``{"caption": str}``; retrieval ``{"image_embedding", "text_embeddings" / "text_embedding"}``;
            MLM ``{"mlm_predictions", "mlm_targets", "mlm_target_log_probs"}``.
        """
        if self.training and self.mixed_loss_weights is not None:
            return self._mixed_losses(batched_inputs)
        return self.forward_task(self._batch_task(batched_inputs), batched_inputs)

    def _mixed_losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """Mixed sampling: the batch holds several tasks (the same composition on every rank); each task's
        losses, weighted by its loss weight, are returned as ``{task}/{loss name}``."""
        groups: Dict[str, List[Dict]] = {}
        for x in batched_inputs:
            groups.setdefault(x.get("task"), []).append(x)
        losses = {}
        for task, inputs in groups.items():
            self._batch_task(inputs)  # names a missing / unknown task
            weight = self.mixed_loss_weights.get(task, 1.0)
            for name, value in self.forward_task(task, inputs).items():
                losses[f"{task}/{name}"] = weight * value
        return losses

    def forward_task(self, task: str, batched_inputs: List[Dict]):
        """Runs one task's formulation (losses in training, outputs in inference)."""
        self.decoder.pop_aux_losses()
        outputs = self.tasks[task](self, batched_inputs)
        aux = self.decoder.pop_aux_losses()
        if self.training and aux is not None:
            outputs["loss_moe_balance"] = aux
        return outputs

    def _batch_task(self, batched_inputs: List[Dict]) -> str:
        if not batched_inputs:
            raise ValueError("UniPerceiverV2: empty batch")
        tasks = [x.get("task") for x in batched_inputs]
        missing = [i for i, t in enumerate(tasks) if t is None]
        if missing:
            raise ValueError(f"UniPerceiverV2: input(s) {missing} of the batch have no 'task' key; expected one of "
                             f"{list(self.tasks)}")
        unknown = sorted({t for t in tasks if t not in self.tasks})
        if unknown:
            raise ValueError(f"UniPerceiverV2: unknown task(s) {unknown}; expected one of {list(self.tasks)}")
        if len(set(tasks)) > 1:
            raise ValueError(f"UniPerceiverV2: a batch must hold one task (unmixed sampling), got "
                             f"{sorted(set(tasks))}; mixed batches need SOLVER.UP2.SAMPLING 'mixed'")
        return tasks[0]


def _mixed_loss_weights(cfg) -> Optional[Dict[str, float]]:
    """Task type -> loss weight of DATASETS.UP2.TASKS when SOLVER.UP2.SAMPLING is "mixed", else None."""
    if cfg.SOLVER.UP2.SAMPLING != "mixed":
        return None
    weights = {}
    for entry in get_task_entries(cfg, require_train=False):
        if weights.setdefault(entry.type, entry.loss_weight) != entry.loss_weight:
            raise ValueError(f"Mixed sampling weights losses per task type; the '{entry.type}' entries of "
                             "DATASETS.UP2.TASKS have different LOSS_WEIGHT values")
    return weights


def _class_name_datasets(cfg, task_type: str) -> List[str]:
    """Training then test datasets of ``task_type`` in DATASETS.UP2.TASKS (or, for a single-task detection
    run, DATASETS.TRAIN / TEST): where the default class names come from."""
    names = []
    for entry in get_task_entries(cfg, require_train=False):
        if entry.type == task_type:
            names.extend(entry.train_datasets + entry.test_datasets)
    if not names and task_type == "detection":
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    return names


def _default_class_names(datasets: Sequence[str]) -> Optional[List[str]]:
    """``thing_classes`` of the first dataset whose metadata has them now (None: resolved at first use)."""
    for name in datasets:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None
