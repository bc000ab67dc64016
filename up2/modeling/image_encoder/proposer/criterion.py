"""Losses of the class-agnostic region proposer (paper Appendix A, Table 7).

For one set of predictions and its matched indices (see :class:`HungarianMatcher`), with
``num_boxes`` = max(total ground truth over all ranks / world size, 1):

* ``loss_objectness``: sigmoid focal loss (alpha, gamma) of every query, target 1 for matched queries
  and 0 otherwise, summed over queries and images and divided by ``num_boxes``. This is Deformable
  DETR's convention: its ``sigmoid_focal_loss(...).mean(1).sum() / num_boxes`` is multiplied by the
  number of queries Q, i.e. ``sum / num_boxes``;
* ``loss_bbox``: L1 of matched cxcywh boxes, summed, / ``num_boxes``;
* ``loss_giou``: ``1 - GIoU`` of matched boxes, summed, / ``num_boxes``;
* ``loss_mask`` / ``loss_dice``: point BCE (averaged over the points) and dice of matched masks on
  ``num_points`` points chosen by importance sampling on each matched predicted mask (the ground
  truth is sampled at the same points), summed, / ``num_boxes``.

The ``outputs`` dict of :meth:`ProposalCriterion.forward` (shapes as the matcher's)::

    pred_logits (B, Q, 1), pred_boxes (B, Q, 4), pred_masks (B, Q, Hm, Wm)   # final decoder layer
    aux_outputs: [dict(pred_logits, pred_boxes, pred_masks), ...]           # decoder layers 0..L-2
    enc_outputs: dict(pred_logits, pred_boxes[, pred_masks])                 # encoder proposals
    dn_outputs:  dict(pred_logits, pred_boxes[, pred_masks], aux_outputs=[...], dn_meta=dn_meta)

``dn_meta`` comes from :func:`prepare_contrastive_denoising`; the criterion only reads
``dn_meta["matched_indices"]`` (per image ``(dn_query_idx, gt_idx)``: positive DN queries and their
ground truth) and ``dn_meta["num_dn_groups"]``. Every other DN query (negatives, padding) has
objectness target 0 and no box or mask loss; DN losses are divided by ``num_boxes * num_dn_groups``.

Returned keys (weighted): the five base keys for the final layer, ``<key>_{i}`` for aux layer i,
``<key>_enc`` for the encoder output, ``<key>_dn`` / ``<key>_dn_{i}`` for denoising. Mask keys exist
for an output whose dict has ``pred_masks``. Which keys appear depends only on the structure of
``outputs`` (fixed by the configuration), never on the annotations: images or batches without ground
truth give zero losses that still depend on every prediction tensor, so every parameter gets a
gradient and DDP sees the same keys on every rank.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from up2.modeling.image_encoder.proposer.matcher import HungarianMatcher
from up2.modeling.image_encoder.proposer.point_sampling import point_sample, sample_uncertain_points

__all__ = ["ProposalCriterion", "LOSS_NAMES"]

logger = logging.getLogger(__name__)

LOSS_NAMES = ("loss_objectness", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")
Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def _zero_like_sum(*tensors: torch.Tensor) -> torch.Tensor:
    """A fp32 zero that depends on ``tensors`` (gradient 0 instead of no gradient)."""
    return sum(t.float().sum() * 0.0 for t in tensors)


class ProposalCriterion(nn.Module):
    """Set losses of the region proposer with deep supervision and denoising.

    Args:
        matcher: the :class:`HungarianMatcher` of the matching queries.
        weight_dict: weight of each base loss name (``LOSS_NAMES``).
        focal_alpha, focal_gamma: objectness focal loss parameters.
        num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask losses.
        deep_supervision: supervise ``aux_outputs`` (decoder layers) and ``enc_outputs``.
    """

    @configurable
    def __init__(self, *, matcher: HungarianMatcher, weight_dict: Dict[str, float], focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, deep_supervision: bool = True):
        super().__init__()
        missing = sorted(set(LOSS_NAMES) - set(weight_dict))
        if missing:
            raise ValueError(f"ProposalCriterion: weight_dict lacks {missing}; expected keys {list(LOSS_NAMES)}")
        self.matcher = matcher
        self.weight_dict = {k: float(weight_dict[k]) for k in LOSS_NAMES}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.MODEL.UP2.LOSS
        return {
            "matcher": HungarianMatcher(cfg),
            "weight_dict": {"loss_objectness": loss.OBJECTNESS_WEIGHT, "loss_bbox": loss.BBOX_WEIGHT,
                            "loss_giou": loss.GIOU_WEIGHT, "loss_mask": loss.MASK_WEIGHT,
                            "loss_dice": loss.DICE_WEIGHT},
            "focal_alpha": loss.FOCAL_ALPHA, "focal_gamma": loss.FOCAL_GAMMA, "num_points": loss.NUM_POINTS,
            "oversample_ratio": loss.OVERSAMPLE_RATIO, "importance_sample_ratio": loss.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": loss.DEEP_SUPERVISION,
        }

    # ------------------------------------------------------------------------------------------
    # Single losses (unweighted)
    # ------------------------------------------------------------------------------------------
    def loss_objectness(self, pred_logits: torch.Tensor, indices: Indices, num_boxes) -> torch.Tensor:
        """Sigmoid focal loss of (B, Q, 1) logits, target 1 at matched queries; sum / num_boxes."""
        logits = pred_logits.float()
        target = torch.zeros_like(logits)
        for b, (pred_idx, _) in enumerate(indices):
            target[b, pred_idx, 0] = 1.0
        loss = sigmoid_focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        return loss.sum() / num_boxes

    @staticmethod
    def _matched(pred: torch.Tensor, indices: Indices) -> torch.Tensor:
        """Rows of (B, Q, ...) ``pred`` selected by the matched prediction indices: (M, ...)."""
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(indices)])
        pred_idx = torch.cat([p for p, _ in indices])
        return pred[batch_idx, pred_idx]

    def loss_boxes(self, pred_boxes: torch.Tensor, targets, indices: Indices, num_boxes) -> Dict[str, torch.Tensor]:
        """L1 and ``1 - GIoU`` of matched (B, Q, 4) cxcywh boxes; sums / num_boxes."""
        if sum(len(p) for p, _ in indices) == 0:
            zero = _zero_like_sum(pred_boxes)
            return {"loss_bbox": zero, "loss_giou": zero.clone()}
        src = self._matched(pred_boxes, indices).float()
        tgt = torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, indices)]).to(src)
        loss_giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"),
                                             reduction="none")
        return {"loss_bbox": (src - tgt).abs().sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def loss_masks(self, pred_masks: torch.Tensor, targets, indices: Indices, num_boxes,
                   point_coords: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Point BCE and dice of matched (B, Q, Hm, Wm) mask logits; sums / num_boxes.

        Args:
            point_coords: (M, P, 2) points for the M matched pairs (in ``indices`` order); None:
                importance sampling on the matched predicted masks.
        """
        num_matched = sum(len(p) for p, _ in indices)
        if num_matched == 0:
            zero = _zero_like_sum(pred_masks)
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src = self._matched(pred_masks, indices).float().unsqueeze(1)  # (M, 1, Hm, Wm)
        if point_coords is None:
            point_coords = sample_uncertain_points(src, self.num_points, self.oversample_ratio,
                                                   self.importance_sample_ratio, generator)
        point_coords = point_coords.to(src)
        pred_points = point_sample(src, point_coords)[:, 0]  # (M, P)
        gt_points, start = [], 0
        for target, (pred_idx, gt_idx) in zip(targets, indices):
            if len(pred_idx):
                masks = target["masks"][gt_idx].to(src).unsqueeze(1)  # (m_b, 1, H, W)
                coords = point_coords[start:start + len(pred_idx)]
                gt_points.append(point_sample(masks, coords)[:, 0])
                start += len(pred_idx)
        gt_points = torch.cat(gt_points)
        bce = nn.functional.binary_cross_entropy_with_logits(pred_points, gt_points, reduction="none").mean(1)
        prob = pred_points.sigmoid()
        dice = 1 - (2 * (prob * gt_points).sum(1) + 1) / (prob.sum(1) + gt_points.sum(1) + 1)
        return {"loss_mask": bce.sum() / num_boxes, "loss_dice": dice.sum() / num_boxes}

    def compute_losses(self, outputs: Dict, targets, indices: Indices, num_boxes) -> Dict[str, torch.Tensor]:
        """Unweighted base losses of one prediction set (mask losses when it has ``pred_masks``), in fp32."""
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            losses = {"loss_objectness": self.loss_objectness(outputs["pred_logits"], indices, num_boxes)}
            losses.update(self.loss_boxes(outputs["pred_boxes"], targets, indices, num_boxes))
            if "pred_masks" in outputs:
                if not all("masks" in t for t in targets):
                    raise ValueError("ProposalCriterion: the predictions have 'pred_masks' but a target has no "
                                     "'masks' (G_b, H, W); give every target its masks or drop 'pred_masks'")
                losses.update(self.loss_masks(outputs["pred_masks"], targets, indices, num_boxes))
        return losses

    # ------------------------------------------------------------------------------------------
    def get_num_boxes(self, targets, device) -> torch.Tensor:
        """max(total ground truth over all ranks / world size, 1) as a fp32 scalar tensor (no host sync)."""
        num_boxes = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_boxes)
        return (num_boxes / world_size).clamp(min=1.0)

    def _weighted(self, losses: Dict[str, torch.Tensor], suffix: str) -> Dict[str, torch.Tensor]:
        return {f"{k}{suffix}": v * self.weight_dict[k] for k, v in losses.items()}

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, torch.Tensor]], return_indices: bool = False):
        """Weighted losses of all prediction sets (see the module docstring for ``outputs``).

        Args:
            outputs: predictions dict (final layer + ``aux_outputs``, ``enc_outputs``, ``dn_outputs``).
            targets: B dicts with ``boxes`` (G_b, 4) cxcywh normalised and ``masks`` (G_b, H, W).
            return_indices: also return the final layer's matched indices.

        Returns:
            dict of weighted scalar losses; with ``return_indices``, ``(losses, indices)`` where
            ``indices`` is the final layer's list of B ``(pred_idx, gt_idx)`` (used by the detection task
            to give matched proposals their class).
        """
        device = outputs["pred_logits"].device
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        num_boxes = self.get_num_boxes(targets, device)
        # Every matched prediction set is matched with one host synchronisation in total.
        sets = [("", outputs)]
        if self.deep_supervision:
            sets += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
            if "enc_outputs" in outputs:
                sets.append(("_enc", outputs["enc_outputs"]))
        all_indices = self.matcher.match_sets([o for _, o in sets], targets)
        losses = {}
        for (suffix, preds), set_indices in zip(sets, all_indices):
            losses.update(self._weighted(self.compute_losses(preds, targets, set_indices, num_boxes), suffix))
        indices = all_indices[0]
        if outputs.get("dn_outputs") is not None:
            losses.update(self._denoising_losses(outputs["dn_outputs"], targets, num_boxes))
        return (losses, indices) if return_indices else losses

    def _denoising_losses(self, dn_outputs: Dict, targets, num_boxes) -> Dict[str, torch.Tensor]:
        meta = dn_outputs["dn_meta"]
        indices = [(p.to(num_boxes.device), g.to(num_boxes.device)) for p, g in meta["matched_indices"]]
        if len(indices) != len(targets):
            raise ValueError(f"dn_meta['matched_indices'] has {len(indices)} entries for {len(targets)} images")
        dn_num_boxes = num_boxes * meta["num_dn_groups"]
        losses = self._weighted(self.compute_losses(dn_outputs, targets, indices, dn_num_boxes), "_dn")
        if self.deep_supervision:
            for i, aux in enumerate(dn_outputs.get("aux_outputs", [])):
                losses.update(self._weighted(self.compute_losses(aux, targets, indices, dn_num_boxes), f"_dn_{i}"))
        return losses
