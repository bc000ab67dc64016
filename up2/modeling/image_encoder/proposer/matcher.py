"""Hungarian matching of class-agnostic proposals (objectness, box, mask) to ground truth.

The costs of the whole batch are computed at once, as a (B, Q, G_max) tensor (ground truth padded to
the largest count G_max of the batch; padded columns are ignored), copied to the host with ONE
``.cpu()`` and solved per image with :func:`scipy.optimize.linear_sum_assignment`.
:meth:`HungarianMatcher.match_sets` does the same for several prediction sets at once (all decoder
layers and the encoder output share one host copy per training step).
:func:`match_per_image_reference` is the straightforward image-by-image version (one transfer per
image) used by the tests and ``benchmarks/matcher.py``.

Cost of prediction q for ground truth g (all in fp32, autocast disabled)::

    C = w_obj * (focal_pos(p_q) - focal_neg(p_q)) + w_bbox * |b_q - b_g|_1 - w_giou * GIoU(b_q, b_g)
        + w_mask * mean_points BCE(m_q, m_g) + w_dice * dice(m_q, m_g)

with p_q = sigmoid(objectness logit), focal_pos(p) = alpha (1-p)^gamma (-log p) and
focal_neg(p) = (1-alpha) p^gamma (-log(1-p)) (Deformable DETR / DINO), boxes cxcywh normalised,
GIoU on xyxy, and mask costs on ``num_points`` uniform random points per image, shared by
the predictions and the ground truth of that image.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from up2.modeling.image_encoder.proposer.point_sampling import point_sample

__all__ = ["HungarianMatcher", "match_per_image_reference", "focal_objectness_cost", "mask_costs"]

logger = logging.getLogger(__name__)

Indices = List[Tuple[torch.Tensor, torch.Tensor]]
_EPS = 1e-8
# Finite stand-in for NaN/inf costs (e.g. degenerate boxes) so linear_sum_assignment never fails.
_BAD_COST = 1e8


def focal_objectness_cost(logits: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal matching cost of the foreground class, ``focal_pos(p) - focal_neg(p)``.

    Args:
        logits: (...,) objectness logits.

    Returns:
        (...,) fp32 cost (independent of which ground truth it is matched to).
    """
    prob = logits.float().sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + _EPS).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + _EPS).log()
    return pos - neg


def mask_costs(pred_points: torch.Tensor, gt_points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise point BCE and dice costs.

    Args:
        pred_points: (..., Q, P) mask logits at the points.
        gt_points: (..., G, P) ground-truth values (0/1, or fractions at mask borders) at the same points.

    Returns:
        ``(bce, dice)``, each (..., Q, G): BCE averaged over the points, and
        ``1 - (2 sum(sigma(x) t) + 1) / (sum(sigma(x)) + sum(t) + 1)``.
    """
    pred_points, gt_points = pred_points.float(), gt_points.float()
    num_points = pred_points.shape[-1]
    # BCE(x, t) = t softplus(-x) + (1 - t) softplus(x) = softplus(x) - t x  (softplus(-x) = softplus(x) - x)
    gt_t = gt_points.transpose(-1, -2)
    bce = (nn.functional.softplus(pred_points).sum(-1, keepdim=True) - pred_points @ gt_t) / num_points
    prob = pred_points.sigmoid()
    numerator = 2 * (prob @ gt_t)
    denominator = prob.sum(-1).unsqueeze(-1) + gt_points.sum(-1).unsqueeze(-2)
    dice = 1 - (numerator + 1) / (denominator + 1)
    return bce, dice


def _uses_masks(matcher, outputs, targets, use_masks: Optional[bool]) -> bool:
    if use_masks is None:
        use_masks = ("pred_masks" in outputs and (matcher.cost_mask != 0 or matcher.cost_dice != 0)
                     and all("masks" in t for t in targets))
    elif use_masks and "pred_masks" not in outputs:
        raise ValueError("HungarianMatcher: use_masks=True but the outputs have no 'pred_masks'")
    elif use_masks and not all("masks" in t for t in targets):
        raise ValueError("HungarianMatcher: use_masks=True but a target has no 'masks'")
    return bool(use_masks)


def _gt_mask_points(targets, point_coords: torch.Tensor) -> List[torch.Tensor]:
    """Ground-truth masks of each image sampled at that image's points: list of (G_b, P) fp32."""
    out = []
    for b, target in enumerate(targets):
        masks = target["masks"].to(device=point_coords.device, dtype=torch.float32)
        if masks.shape[0] == 0:
            out.append(masks.new_zeros((0, point_coords.shape[1])))
        else:
            out.append(point_sample(masks.unsqueeze(0), point_coords[b:b + 1])[0])
    return out


class HungarianMatcher(nn.Module):
    """One-to-one assignment of Q proposals to the ground truth of each image (no class costs).

    Args:
        cost_objectness, cost_bbox, cost_giou, cost_mask, cost_dice: cost weights (paper Table 7).
        num_points: points per image for the mask costs (paper: 112 * 112).
        focal_alpha, focal_gamma: focal objectness cost parameters.
    """

    @configurable
    def __init__(self, *, cost_objectness: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        costs = dict(cost_objectness=cost_objectness, cost_bbox=cost_bbox, cost_giou=cost_giou,
                     cost_mask=cost_mask, cost_dice=cost_dice)
        if any(v < 0 for v in costs.values()) or not any(v > 0 for v in costs.values()):
            raise ValueError(f"HungarianMatcher: costs must be >= 0 and not all 0, got {costs}")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be > 0, got {num_points}")
        self.cost_objectness, self.cost_bbox, self.cost_giou = cost_objectness, cost_bbox, cost_giou
        self.cost_mask, self.cost_dice = cost_mask, cost_dice
        self.num_points, self.focal_alpha, self.focal_gamma = num_points, focal_alpha, focal_gamma

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.MODEL.UP2.LOSS
        return {"cost_objectness": loss.COST_OBJECTNESS, "cost_bbox": loss.COST_BBOX, "cost_giou": loss.COST_GIOU,
                "cost_mask": loss.COST_MASK, "cost_dice": loss.COST_DICE, "num_points": loss.NUM_POINTS,
                "focal_alpha": loss.FOCAL_ALPHA, "focal_gamma": loss.FOCAL_GAMMA}

    def random_points(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, num_points, 2) uniform ``(x, y)`` points in [0, 1], one set per image."""
        gen_device = generator.device if generator is not None else device
        return torch.rand((batch_size, self.num_points, 2), generator=generator, device=gen_device).to(device)

    @torch.no_grad()
    def compute_cost(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
                     use_masks: Optional[bool] = None, point_coords: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Batched matching costs, on the predictions' device.

        Args:
            outputs: ``pred_logits`` (B, Q, 1), ``pred_boxes`` (B, Q, 4) cxcywh normalised, optionally
                ``pred_masks`` (B, Q, Hm, Wm) logits.
            targets: B dicts with ``boxes`` (G_b, 4) cxcywh normalised and ``masks`` (G_b, H, W).
            use_masks: add the mask costs; None: when ``pred_masks`` exist and a mask cost weight is > 0.
            point_coords: (B, P, 2) points for the mask costs; None draws ``num_points`` uniform points.
            generator: random generator for the points.

        Returns:
            (B, Q, G_max) fp32 costs; columns ``>= G_b`` of image b are padding (0).
        """
        logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries = logits.shape[:2]
        device = logits.device
        sizes = [len(t["boxes"]) for t in targets]
        if len(sizes) != batch:
            raise ValueError(f"HungarianMatcher: {len(sizes)} targets for a batch of {batch} predictions")
        max_gt = max(sizes, default=0)
        if max_gt == 0:
            return torch.zeros((batch, num_queries, 0), device=device)
        use_masks = _uses_masks(self, outputs, targets, use_masks)
        with torch.autocast(device_type=device.type, enabled=False):
            # Ground-truth boxes padded to G_max with a valid dummy box (no NaN in padded columns).
            gt_boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(batch, max_gt, 1)
            valid = torch.zeros((batch, max_gt), dtype=torch.bool, device=device)
            for b, target in enumerate(targets):
                gt_boxes[b, :sizes[b]] = target["boxes"].to(device=device, dtype=torch.float32)
                valid[b, :sizes[b]] = True
            boxes = pred_boxes.float()
            cost = self.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
            cost -= self.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                         box_convert(gt_boxes, "cxcywh", "xyxy"))
            cost += self.cost_objectness * focal_objectness_cost(logits[..., 0], self.focal_alpha,
                                                                 self.focal_gamma).unsqueeze(-1)
            if use_masks:
                if point_coords is None:
                    point_coords = self.random_points(batch, device, generator)
                point_coords = point_coords.to(device=device, dtype=torch.float32)
                pred_points = point_sample(outputs["pred_masks"].float(), point_coords)  # (B, Q, P)
                gt_points = pred_points.new_zeros((batch, max_gt, point_coords.shape[1]))
                for b, points in enumerate(_gt_mask_points(targets, point_coords)):
                    gt_points[b, :sizes[b]] = points
                bce, dice = mask_costs(pred_points, gt_points)
                cost += self.cost_mask * bce + self.cost_dice * dice
            cost = torch.nan_to_num(cost, nan=_BAD_COST, posinf=_BAD_COST, neginf=-_BAD_COST)
            return cost.masked_fill(~valid.unsqueeze(1), 0.0)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
                use_masks: Optional[bool] = None, point_coords: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Indices:
        """Matches every image of the batch with one device-to-host copy.

        Args: as :meth:`compute_cost`.

        Returns:
            list of B tuples ``(pred_idx, gt_idx)``: int64 tensors of length min(Q, G_b) on the
            predictions' device, ``pred_idx`` sorted; empty for images without ground truth.
        """
        cost = self.compute_cost(outputs, targets, use_masks, point_coords, generator)
        return self._assign([cost], targets, outputs["pred_logits"].device)[0]

    @torch.no_grad()
    def match_sets(self, outputs_list: Sequence[Dict[str, torch.Tensor]], targets: Sequence[Dict[str, torch.Tensor]],
                   generator: Optional[torch.Generator] = None) -> List[Indices]:
        """Matches several prediction sets (e.g. every decoder layer and the encoder output) to the same
        targets with ONE device-to-host copy for all of them. Each set uses its masks when it has
        ``pred_masks`` (``use_masks=None``) and gets its own random points.

        Returns:
            one list of B ``(pred_idx, gt_idx)`` per set, as :meth:`forward`.
        """
        if not outputs_list:
            return []
        costs = [self.compute_cost(o, targets, generator=generator) for o in outputs_list]
        return self._assign(costs, targets, outputs_list[0]["pred_logits"].device)

    @staticmethod
    def _assign(costs: List[torch.Tensor], targets, device) -> List[Indices]:
        """Solves the (B, Q_k, G_max) cost tensors per image after a single host copy of all of them."""
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64, device=device)
        if max(sizes, default=0) == 0:
            return [[(empty, empty) for _ in sizes] for _ in costs]
        flat = torch.cat([c.reshape(-1) for c in costs]).cpu().numpy()  # the single host synchronisation
        results, offset = [], 0
        for cost in costs:
            host = flat[offset:offset + cost.numel()].reshape(cost.shape)
            offset += cost.numel()
            indices = []
            for b, size in enumerate(sizes):
                if size == 0:
                    indices.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(host[b, :, :size])
                indices.append((torch.as_tensor(rows, dtype=torch.int64).to(device),
                                torch.as_tensor(cols, dtype=torch.int64).to(device)))
            results.append(indices)
        return results

    def extra_repr(self) -> str:
        return (f"cost_objectness={self.cost_objectness}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, num_points={self.num_points}")


@torch.no_grad()
def match_per_image_reference(matcher: HungarianMatcher, outputs, targets, use_masks: Optional[bool] = None,
                              point_coords: Optional[torch.Tensor] = None,
                              generator: Optional[torch.Generator] = None,
                              return_costs: bool = False):
    """Reference matcher: the same costs computed image by image with 2-D ops, one ``.cpu()`` per image.

    Args: as :meth:`HungarianMatcher.forward`; ``return_costs`` also returns the list of (Q, G_b) costs.

    Returns:
        indices as :meth:`HungarianMatcher.forward` (and the per-image cost list if ``return_costs``).
    """
    use_masks = _uses_masks(matcher, outputs, targets, use_masks)
    logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
    device = logits.device
    if use_masks and point_coords is None:
        point_coords = matcher.random_points(logits.shape[0], device, generator)
    indices, costs = [], []
    for b, target in enumerate(targets):
        gt_boxes = target["boxes"].to(device=device, dtype=torch.float32)
        if len(gt_boxes) == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            indices.append((empty, empty))
            costs.append(torch.zeros((logits.shape[1], 0)))
            continue
        boxes = pred_boxes[b].float()
        cost = (matcher.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
                - matcher.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                          box_convert(gt_boxes, "cxcywh", "xyxy"))
                + matcher.cost_objectness * focal_objectness_cost(logits[b, :, 0], matcher.focal_alpha,
                                                                  matcher.focal_gamma)[:, None])
        if use_masks:
            coords = point_coords[b:b + 1].to(device=device, dtype=torch.float32)
            pred_points = point_sample(outputs["pred_masks"][b:b + 1].float(), coords)[0]
            gt_points = point_sample(target["masks"].to(device=device, dtype=torch.float32)[None], coords)[0]
            bce, dice = mask_costs(pred_points, gt_points)
            cost = cost + matcher.cost_mask * bce + matcher.cost_dice * dice
        cost = torch.nan_to_num(cost, nan=_BAD_COST, posinf=_BAD_COST, neginf=-_BAD_COST).cpu()
        costs.append(cost)
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64).to(device),
                        torch.as_tensor(cols, dtype=torch.int64).to(device)))
    return (indices, costs) if return_costs else indices
