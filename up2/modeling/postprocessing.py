"""Detection outputs at the original image size (Detectron2 ``Instances``) from proposer predictions."""
import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torchvision.ops import box_convert

__all__ = ["detections_to_instances"]


def detections_to_instances(boxes: torch.Tensor, mask_logits: torch.Tensor, scores: torch.Tensor,
                            classes: torch.Tensor, image_size, padded_size, output_size,
                            mask_threshold: float = 0.5) -> Instances:
    """Builds the ``Instances`` of one image.

    Args:
        boxes: (K, 4) cxcywh normalised by the (unpadded) image size.
        mask_logits: (K, H/4, W/4) mask logits over the padded image.
        scores: (K,); classes: (K,) long.
        image_size: (h, w) of the network input (unpadded); padded_size: (H, W) of the batch.
        output_size: (height, width) of the original image.
        mask_threshold: probability threshold of the binary masks.

    Returns:
        Instances at ``output_size`` with ``pred_boxes`` (abs xyxy), ``scores``, ``pred_classes`` and
        ``pred_masks`` (K, height, width) bool.
    """
    h, w = image_size
    out_h, out_w = output_size
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=torch.float32,
                                                                        device=boxes.device)
    inst = Instances((h, w), pred_boxes=Boxes(xyxy), scores=scores, pred_classes=classes,
                     keep_index=torch.arange(len(scores), device=scores.device))
    inst = detector_postprocess(inst, out_h, out_w)  # drops empty boxes
    masks = mask_logits[inst.keep_index].float()[None]  # (1, K, H/4, W/4)
    masks = F.interpolate(masks, size=tuple(padded_size), mode="bilinear", align_corners=False)[..., :h, :w]
    masks = F.interpolate(masks, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    inst.pred_masks = masks.sigmoid() > mask_threshold
    inst.remove("keep_index")
    return inst
