"""Class-agnostic detector: a backbone and up2's region proposer trained alone on detection data.

It checks the proposer end to end (training with Detectron2's ``DatasetMapper``, COCO evaluation with
every category merged, ``MODEL.UP2.TEST.CLASS_AGNOSTIC``) before it serves the generalist model.
"""
import logging
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from up2.modeling.build import build_proposer
from up2.modeling.image_encoder.proposer import DeformableRegionProposer  # noqa: F401  (registers it)
from up2.modeling.image_encoder.proposer.targets import instances_to_targets
from up2.modeling.postprocessing import detections_to_instances
from up2.modeling.preprocessing import batch_images

__all__ = ["ProposalDetector", "instances_to_targets"]

logger = logging.getLogger(__name__)

@META_ARCH_REGISTRY.register()
class ProposalDetector(nn.Module):
    """Backbone + :class:`~up2.modeling.image_encoder.proposer.DeformableRegionProposer`, class-agnostic.

    Args:
        backbone: a Detectron2 backbone with the proposer's input levels.
        proposer: the region proposer.
        pixel_mean, pixel_std: input normalisation.
        size_divisibility: images are padded to a multiple of this.
        detections_per_image: final-layer queries kept per image at inference.
        score_thresh: drop detections below this score.
        mask_threshold: probability threshold of the binary masks.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, proposer: nn.Module, pixel_mean, pixel_std, size_divisibility: int = 32,
                 detections_per_image: int = 100, score_thresh: float = 0.0, mask_threshold: float = 0.5):
        super().__init__()
        self.backbone, self.proposer = backbone, proposer
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.detections_per_image, self.score_thresh = detections_per_image, score_thresh
        self.mask_threshold = mask_threshold

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "proposer": build_proposer(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": max(32, backbone.size_divisibility),
            "detections_per_image": cfg.MODEL.UP2.TEST.DETECTIONS_PER_IMAGE,
            "score_thresh": cfg.MODEL.UP2.TEST.SCORE_THRESH,
            "mask_threshold": cfg.MODEL.UP2.TEST.MASK_THRESHOLD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalised, padded images and their (B, H, W) padding mask (True at padding)."""
        return batch_images(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: ``DatasetMapper`` outputs: ``image`` (C, H, W) in ``INPUT.FORMAT``,
                ``instances`` (training: ``gt_boxes``, ``gt_masks``), ``height`` / ``width`` (output size).

        Returns:
            training: dict of losses; inference: ``[{"instances": Instances}]`` at the original size with
            ``pred_boxes`` (abs xyxy), ``scores`` = sigmoid(objectness), ``pred_classes`` = 0 and
            ``pred_masks`` (bool, original size).
        """
        images, padding_mask = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            instances = [x["instances"].to(self.device) for x in batched_inputs]
            targets = instances_to_targets(instances, images.tensor.shape[-2:], self.device)
            outputs = self.proposer(features, padding_mask, targets)
            losses = dict(outputs["losses"])
            # The class-agnostic detector does not consume the regional tokens; this zero keeps the fusion
            # layers in the graph so DDP without find_unused_parameters sees every parameter.
            losses["loss_objectness"] = losses["loss_objectness"] + 0.0 * outputs["regional_tokens"].sum()
            return losses
        outputs = self.proposer(features, padding_mask)
        return self.inference(outputs["predictions"], batched_inputs, images)

    def inference(self, predictions: Dict[str, torch.Tensor], batched_inputs, images: ImageList):
        """Top-scored final-layer queries -> Instances at the original size (see :meth:`forward`)."""
        scores_all = predictions["pred_logits"][..., 0].sigmoid()
        num = min(self.detections_per_image, scores_all.shape[1])
        padded = images.tensor.shape[-2:]
        results = []
        for i, (inputs, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            scores, idx = scores_all[i].topk(num)
            keep = scores > self.score_thresh
            scores, idx = scores[keep], idx[keep]
            inst = detections_to_instances(
                predictions["pred_boxes"][i, idx], predictions["pred_masks"][i, idx], scores, torch.zeros_like(idx),
                (h, w), padded, (inputs.get("height", h), inputs.get("width", w)), self.mask_threshold)
            results.append({"instances": inst})
        return results
