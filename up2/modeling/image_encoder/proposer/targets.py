"""Detection targets of the region proposer from Detectron2 ``Instances``."""
import logging
from typing import Dict, List

import torch
from detectron2.structures import BitMasks, Instances, PolygonMasks
from torchvision.ops import box_convert

__all__ = ["instances_to_targets"]

logger = logging.getLogger(__name__)

# Degenerate (zero-area) ground-truth boxes dropped so far, and how often the count is logged.
_DEGENERATE = {"count": 0}
DEGENERATE_LOG_PERIOD = 100


def _count_degenerate(num: int) -> None:
    """Counts dropped degenerate boxes; warns on the first one and then once per DEGENERATE_LOG_PERIOD."""
    if num <= 0:
        return
    before = _DEGENERATE["count"]
    _DEGENERATE["count"] += num
    if before == 0 or before // DEGENERATE_LOG_PERIOD != _DEGENERATE["count"] // DEGENERATE_LOG_PERIOD:
        logger.warning("Dropped %d ground-truth box(es) of zero area (%d so far); check the "
                       "dataset's annotations", num, _DEGENERATE["count"])


def instances_to_targets(instances: List[Instances], padded_size, device) -> List[Dict[str, torch.Tensor]]:
    """Detectron2 ``Instances`` (boxes in absolute xyxy of the resized image) -> proposer targets.

    Args:
        instances: B ``Instances`` with ``gt_boxes`` and optionally ``gt_masks`` (PolygonMasks or BitMasks).
        padded_size: (H, W) of the batched (padded) images.

    Returns:
        B dicts: ``boxes`` (G, 4) cxcywh normalised by the image size (not the padded size) and ``masks``
        (G, H, W) float at the padded size. Zero-area boxes (and their masks) are dropped with a warning.
    """
    targets = []
    height_p, width_p = padded_size
    for inst in instances:
        h, w = inst.image_size
        keep = inst.gt_boxes.nonempty(threshold=0.0)
        _count_degenerate(int((~keep).sum()))
        inst = inst[keep]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        boxes = box_convert(inst.gt_boxes.tensor.to(device).float() / scale, "xyxy", "cxcywh").clamp(0, 1)
        target = {"boxes": boxes}
        masks = torch.zeros((len(inst), height_p, width_p), dtype=torch.float32, device=device)
        if inst.has("gt_masks"):
            gt_masks = inst.gt_masks
            if isinstance(gt_masks, PolygonMasks):
                gt_masks = BitMasks.from_polygon_masks(gt_masks, h, w)
            bitmaps = gt_masks.tensor.to(device)
            masks[:, :bitmaps.shape[1], :bitmaps.shape[2]] = bitmaps.float()
        else:  # no mask annotation: the box is the mask
            for i, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.round().long().tolist()):
                masks[i, y0:y1, x0:x1] = 1.0
        target["masks"] = masks
        targets.append(target)
    return targets
