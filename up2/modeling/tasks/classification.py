"""Image classification in the unified formulation: the image ``<SPE>`` output against the class-name
embeddings (eq. 5–6), cross-entropy with label smoothing."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from up2.modeling.build import TASK_REGISTRY
from up2.modeling.decoder.unified_decoder import image_segment
from up2.modeling.moe import SIDE_INPUT
from up2.modeling.tasks.base import ClassNamesMixin, TaskHead

__all__ = ["ClassificationTask", "encode_image_spe", "image_tensor_spe"]


def encode_image_spe(model, task: str, batched_inputs: List[Dict]) -> torch.Tensor:
    """(B, d) decoder ``<SPE>`` outputs of the images of ``batched_inputs`` (sequence [<SPE>, image tokens])."""
    images, padding_mask = model.preprocess_images(batched_inputs)
    return image_tensor_spe(model, task, images.tensor, padding_mask)


def image_tensor_spe(model, task: str, images: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, d) decoder ``<SPE>`` outputs of normalised, padded ``images`` (B, 3, H, W) with their (B, H, W)
    padding mask (True at padding)."""
    image = model.encode_images(images, padding_mask)
    return model.decoder(task, [image_segment(image["tokens"], image["padding_mask"], SIDE_INPUT)]).hidden[:, 0]


@TASK_REGISTRY.register()
class ClassificationTask(ClassNamesMixin, TaskHead):
    """
    Args:
        class_names: default target set (the training dataset's ``thing_classes``), may be None.
        class_names_datasets: datasets whose ``thing_classes`` are read at first use when none are set.
        label_smoothing: of the cross-entropy (0.1).
    """

    task_type = "classification"

    @configurable
    def __init__(self, *, class_names=None, class_names_datasets=(), label_smoothing: float = 0.1):
        super().__init__()
        if class_names:
            self.set_class_names(class_names)
        self.class_names_datasets = tuple(class_names_datasets)
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg, class_names=None, class_names_datasets=()):
        return {"class_names": class_names, "class_names_datasets": class_names_datasets,
                "label_smoothing": cfg.MODEL.UP2.HEAD.LABEL_SMOOTHING}

    def logits(self, model, batched_inputs: List[Dict]) -> torch.Tensor:
        """(B, C) logits."""
        spe = encode_image_spe(model, self.task_type, batched_inputs)
        return model.head(spe, self.class_embeddings(model), self.task_type)

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        logits = self.logits(model, batched_inputs)
        labels = torch.tensor([int(x["label"]) for x in batched_inputs], device=logits.device)
        if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
            raise ValueError(f"Classification label {labels.tolist()} outside [0, {logits.shape[1]}) "
                             f"(class names {self.class_names})")
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"loss_classification": loss}

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        probs = self.logits(model, batched_inputs).float().softmax(-1)
        return [{"class_scores": p} for p in probs]
