"""Detection and instance segmentation in the unified formulation (paper §4.3 "Tasks with Localization").

The image sequence ``[<SPE>, image tokens]`` goes through the unified decoder; each regional token's
output is scored against the class-name embeddings (eq. 6) plus a learned "no object" target. The
proposer's Hungarian matches give every matched token its class; unmatched tokens get "no object"
(weighted by ``NO_OBJECT_WEIGHT``, as DETR). Boxes and masks are the proposer's; its losses are added.
At inference the (token, class) pairs with the best scores become detections.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Instances
from torch import nn

from up2.modeling.build import TASK_REGISTRY
from up2.modeling.decoder.unified_decoder import image_segment
from up2.modeling.image_encoder.proposer.targets import instances_to_targets
from up2.modeling.moe import SIDE_INPUT
from up2.modeling.postprocessing import detections_to_instances
from up2.modeling.tasks.base import ClassNamesMixin, TaskHead

__all__ = ["DetectionTask", "DETECTION_SCORES", "detection_class_targets", "no_object_weighted_cross_entropy"]

DETECTION_SCORES = ("class", "class_x_objectness")


def detection_class_targets(matched_token_indices: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                            instances: Sequence[Instances], num_tokens: int, num_classes: int, device,
                            class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The class target of every regional token: its matched ground truth's class, else "no object".

    Args:
        matched_token_indices: B pairs ``(token_idx, gt_idx)`` of (M_b,) long tensors from the proposer:
            token_idx in [0, O), gt_idx into the image's ground truth with a non-empty box (the order of
            :func:`~up2.modeling.image_encoder.proposer.targets.instances_to_targets`).
        instances: B ``Instances`` with ``gt_boxes`` and ``gt_classes``.
        num_tokens: O, regional tokens per image.
        num_classes: C; index C is "no object".
        device: of the result.
        class_names: named in the error.

    Returns:
        (B, O) long, values in [0, C].

    Raises:
        ValueError: a ground-truth class id >= C (the vocabulary does not match the dataset).
    """
    labels = torch.full((len(instances), num_tokens), num_classes, dtype=torch.long, device=device)
    for b, ((token_idx, gt_idx), inst) in enumerate(zip(matched_token_indices, instances)):
        gt_classes = inst.gt_classes[inst.gt_boxes.nonempty(threshold=0.0)]  # as instances_to_targets
        if gt_classes.numel() and int(gt_classes.max()) >= num_classes:
            raise ValueError(f"Detection class id {int(gt_classes.max())} >= {num_classes} class names "
                             f"{class_names}: the vocabulary does not match the dataset")
        labels[b, token_idx] = gt_classes[gt_idx]
    return labels


def no_object_weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                     no_object_weight: float) -> torch.Tensor:
    """Cross-entropy of (B, O, C + 1) logits against (B, O) labels in which "no object" (index C, the last)
    weighs ``no_object_weight`` and every class 1 (as DETR): ``sum_i w_i * -log p_i(y_i) / sum_i w_i``.

    Returns:
        0-dim float32 loss.
    """
    weight = logits.new_ones(logits.shape[-1])
    weight[-1] = no_object_weight
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), weight=weight.float())

@TASK_REGISTRY.register()
class DetectionTask(ClassNamesMixin, TaskHead):
    """
    Args:
        dim: decoder width (the "no object" embedding lives in the decoder's output space).
        class_names: default target set (the training dataset's ``thing_classes``), may be None.
        class_names_datasets: datasets whose ``thing_classes`` are read at first use when none are set.
        class_weight: weight of the classification loss.
        no_object_weight: weight of the "no object" class in the cross-entropy.
        detections_per_image, score_thresh, mask_threshold: inference.
        score: one of DETECTION_SCORES.
    """

    task_type = "detection"

    @configurable
    def __init__(self, *, dim: int, class_names=None, class_names_datasets=(), class_weight: float = 2.0,
                 no_object_weight: float = 0.1,
                 detections_per_image: int = 100, score_thresh: float = 0.0, mask_threshold: float = 0.5,
                 score: str = "class_x_objectness"):
        super().__init__()
        if score not in DETECTION_SCORES:
            raise ValueError(f"MODEL.UP2.TEST.DETECTION_SCORE: unknown value {score!r}; expected one of "
                             f"{list(DETECTION_SCORES)}")
        self.no_object = nn.Parameter(torch.randn(dim) * 0.02)
        if class_names:
            self.set_class_names(class_names)
        self.class_names_datasets = tuple(class_names_datasets)
        self.class_weight, self.no_object_weight = class_weight, no_object_weight
        self.detections_per_image, self.score_thresh = detections_per_image, score_thresh
        self.mask_threshold, self.score = mask_threshold, score

    @classmethod
    def from_config(cls, cfg, class_names=None, class_names_datasets=()):
        loss, test = cfg.MODEL.UP2.LOSS, cfg.MODEL.UP2.TEST
        return {"dim": cfg.MODEL.UP2.DECODER.HIDDEN_DIM, "class_names": class_names,
                "class_names_datasets": class_names_datasets,
                "class_weight": loss.CLASS_WEIGHT, "no_object_weight": loss.NO_OBJECT_WEIGHT,
                "detections_per_image": test.DETECTIONS_PER_IMAGE, "score_thresh": test.SCORE_THRESH,
                "mask_threshold": test.MASK_THRESHOLD, "score": test.DETECTION_SCORE}

    def class_logits(self, model, image: Dict, class_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, O, C + 1) logits of every regional token against the classes and "no object" (last).

        ``class_targets``: (C, d) class-name embeddings computed beforehand (e.g. constants of an exported
        graph); None computes them from the current class names."""
        segments = [image_segment(image["tokens"], image["padding_mask"], SIDE_INPUT)]
        start = 1  # after <SPE>
        if image["regional_start"] is None:  # "global" image tokens: append the regional ones
            segments.append(image_segment(image["regional_tokens"], None, SIDE_INPUT))
            start += image["tokens"].shape[1]
        else:
            start += image["regional_start"]
        hidden = model.decoder(self.task_type, segments).hidden
        regional = hidden[:, start:start + image["regional_tokens"].shape[1]]
        if class_targets is None:
            class_targets = self.class_embeddings(model)
        targets = torch.cat([class_targets, self.no_object[None].to(regional.dtype)])
        return model.head(regional, targets, self.task_type)

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        instances = [x["instances"].to(model.device) for x in batched_inputs]
        images, padding_mask = model.preprocess_images(batched_inputs)
        proposer_targets = instances_to_targets(instances, images.tensor.shape[-2:], model.device)
        image = model.encode_images(images.tensor, padding_mask, proposer_targets)
        logits = self.class_logits(model, image)  # (B, O, C + 1)
        labels = detection_class_targets(image["matched_token_indices"], instances, logits.shape[1],
                                         logits.shape[-1] - 1, logits.device, self.class_names)
        loss_class = no_object_weighted_cross_entropy(logits, labels, self.no_object_weight)
        losses = dict(image["losses"])
        losses["loss_class"] = self.class_weight * loss_class
        return losses

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        images, padding_mask = model.preprocess_images(batched_inputs)
        image = model.encode_images(images.tensor, padding_mask)
        probs = self.class_logits(model, image).float().softmax(-1)[..., :-1]  # (B, O, C)
        if self.score == "class_x_objectness":
            probs = probs * image["objectness"].float().sigmoid()[..., None]
        num_classes = probs.shape[-1]
        results = []
        for i, (inputs, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            scores, flat = probs[i].flatten().topk(min(self.detections_per_image, probs[i].numel()))
            keep = scores > self.score_thresh
            scores, flat = scores[keep], flat[keep]
            token, cls = flat // num_classes, flat % num_classes
            inst = detections_to_instances(image["boxes"][i, token], image["masks"][i, token], scores, cls, (h, w),
                                           images.tensor.shape[-2:], (inputs.get("height", h), inputs.get("width", w)),
                                           self.mask_threshold)
            results.append({"instances": inst})
        return results
