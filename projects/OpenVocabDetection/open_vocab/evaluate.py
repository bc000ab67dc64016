"""Zero-shot evaluation of novel categories and its chance baseline.

The model detects the novel categories by name (``set_vocabulary("detection", novel)``). The chance
baseline keeps the same boxes, masks and scores but draws each detection's class uniformly at random
from the same vocabulary (seeded): it measures what the localisation alone earns, so the gap is what
naming the novel classes adds.
"""
import logging
from typing import Dict, Sequence

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from torch import nn

from up2.engine import UP2Trainer
from up2.evaluation import build_evaluator

__all__ = ["evaluate_classes_by_name", "evaluate_novel_classes", "RandomClassModel"]

logger = logging.getLogger(__name__)


class RandomClassModel(nn.Module):
    """Wraps a detector: same outputs with ``pred_classes`` replaced by uniform random classes."""

    def __init__(self, model: nn.Module, num_classes: int, seed: int = 0):
        super().__init__()
        self.model, self.num_classes = model, num_classes
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, batched_inputs):
        outputs = self.model(batched_inputs)
        for out in outputs:
            inst = out["instances"]
            inst.pred_classes = torch.randint(self.num_classes, (len(inst),), generator=self.generator).to(
                inst.pred_classes.device)
        return outputs


def evaluate_classes_by_name(cfg, model: nn.Module, dataset_name: str, names: Sequence[str],
                             output_dir: str) -> Dict[str, Dict[str, float]]:
    """COCO AP of ``model`` on ``dataset_name`` with the detection vocabulary set to the dataset's classes,
    and of the chance baseline. Returns ``{"by_name": {...}, "chance": {...}}`` (bbox and segm metrics).

    The vocabulary is the dataset's ``thing_classes`` (``names`` in category-id order): the evaluator maps
    predicted class index i to the i-th of them, whatever order ``names`` lists them in. The model's
    previous vocabulary is restored afterwards.

    Raises:
        ValueError: ``names`` is not the set of the dataset's classes.
    """
    classes = list(MetadataCatalog.get(dataset_name).thing_classes)
    if sorted(classes) != sorted(names):
        raise ValueError(f"evaluate_classes_by_name: {dataset_name} has the classes {classes}, expected the "
                         f"classes {sorted(names)}")
    previous = model.vocabulary("detection")
    model.set_vocabulary("detection", classes)
    model.eval()
    results = {}
    try:
        for name, evaluated in (("by_name", model), ("chance", RandomClassModel(model, len(classes)))):
            loader = UP2Trainer.build_test_loader(cfg, dataset_name, task_type="detection")
            evaluator = build_evaluator(cfg, dataset_name, "detection", f"{output_dir}/{name}")
            raw = inference_on_dataset(evaluated, loader, evaluator)
            results[name] = {f"{kind}/{metric}": value for kind, metrics in raw.items()
                             for metric, value in metrics.items()}
            logger.info("%s on %s: %s", name, dataset_name, results[name])
    finally:
        if previous:
            model.set_vocabulary("detection", previous)
    return results


def evaluate_novel_classes(cfg, model: nn.Module, dataset_name: str, novel: Sequence[str],
                           output_dir: str) -> Dict[str, Dict[str, float]]:
    """:func:`evaluate_classes_by_name` on the novel classes, which the detection task never trained on:
    returns ``{"zero_shot": {...}, "chance": {...}}``."""
    results = evaluate_classes_by_name(cfg, model, dataset_name, novel, output_dir)
    return {"zero_shot": results["by_name"], "chance": results["chance"]}
