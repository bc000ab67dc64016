"""The evaluator of a test dataset, chosen by its task type, and result formatting.

``EVALUATOR_REGISTRY`` holds one builder per evaluator, ``builder(cfg, dataset_name, output_dir,
**options) -> DatasetEvaluator``; the :class:`~up2.task_specs.TaskSpec` of a task type names its
builder. Evaluators return Detectron2-style ``{task: {metric: value}}`` (``{"bbox": {"AP": ...}}``,
``{"classification": {"top1": ...}}``, ...); :func:`flatten_results` turns them into the flat
``{"bbox/AP": ...}`` of ``eval_results.json`` (Detectron2's ``flatten_results_dict`` convention).
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, Mapping, Optional

from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils.registry import Registry
from tabulate import tabulate

from up2.evaluation.caption import CaptionEvaluator
from up2.evaluation.classification import ClassificationEvaluator
from up2.evaluation.coco import build_coco_evaluator
from up2.evaluation.mlm import MLMEvaluator
from up2.evaluation.retrieval import RetrievalEvaluator
from up2.task_specs import TASK_SPEC_REGISTRY

__all__ = ["EVALUATOR_REGISTRY", "build_evaluator", "flatten_results", "format_results_table",
           "print_results_table"]

logger = logging.getLogger(__name__)

EVALUATOR_REGISTRY = Registry("UP2_EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = "Evaluator builders: (cfg, dataset_name, output_dir, **options) -> DatasetEvaluator."


@EVALUATOR_REGISTRY.register()
def coco_evaluator(cfg, dataset_name: str, output_dir: str, class_agnostic: Optional[bool] = None):
    """COCO bbox + segm (official COCOeval); ``class_agnostic`` overrides ``MODEL.UP2.TEST.CLASS_AGNOSTIC``."""
    if class_agnostic is None:
        class_agnostic = cfg.MODEL.UP2.TEST.CLASS_AGNOSTIC
    return build_coco_evaluator(dataset_name, output_dir, class_agnostic=class_agnostic,
                                max_dets_per_image=cfg.MODEL.UP2.TEST.DETECTIONS_PER_IMAGE)


@EVALUATOR_REGISTRY.register()
def classification_evaluator(cfg, dataset_name: str, output_dir: str):
    return ClassificationEvaluator(dataset_name)


@EVALUATOR_REGISTRY.register()
def retrieval_evaluator(cfg, dataset_name: str, output_dir: str):
    return RetrievalEvaluator(dataset_name)


@EVALUATOR_REGISTRY.register()
def caption_evaluator(cfg, dataset_name: str, output_dir: str):
    return CaptionEvaluator(dataset_name, output_dir=output_dir)


@EVALUATOR_REGISTRY.register()
def mlm_evaluator(cfg, dataset_name: str, output_dir: str):
    return MLMEvaluator(dataset_name)


def build_evaluator(cfg, dataset_name: str, task_type: str, output_dir: Optional[str] = None,
                    *, class_agnostic: Optional[bool] = None) -> DatasetEvaluator:
    """The evaluator of one test dataset.

    Args:
        cfg: the config (detection reads ``MODEL.UP2.TEST.DETECTIONS_PER_IMAGE`` and
            ``MODEL.UP2.TEST.CLASS_AGNOSTIC``).
        dataset_name: a registered dataset.
        task_type: a registered task type (``up2.task_specs``; built in: "detection", "classification",
            "retrieval", "captioning", "mlm").
        output_dir: where evaluators write predictions (COCO results, captions); None means
            ``cfg.OUTPUT_DIR/inference/<dataset_name>`` (Detectron2's train_net convention).
        class_agnostic: detection only; overrides the config (one merged category).

    Returns:
        a ``DatasetEvaluator`` that gathers across ranks and returns ``{task: {metric: value}}`` on
        the main process.
    """
    if task_type not in TASK_SPEC_REGISTRY:
        raise ValueError(f"Unknown task type {task_type!r} for test dataset '{dataset_name}'; expected one of "
                         f"{', '.join(TASK_SPEC_REGISTRY.task_types())}")
    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    options = {} if class_agnostic is None else {"class_agnostic": class_agnostic}
    builder = EVALUATOR_REGISTRY.get(TASK_SPEC_REGISTRY.get(task_type).evaluator)
    return builder(cfg, dataset_name, output_dir, **options)


def flatten_results(results: Mapping) -> Dict[str, float]:
    """``{task: {metric: value}}`` → ``{"task/metric": value}`` (Detectron2's ``flatten_results_dict``).

    Args:
        results: nested dict of numbers, any depth.

    Returns:
        flat dict with "/"-joined keys and float values.
    """
    return OrderedDict((k, float(v)) for k, v in flatten_results_dict(dict(results)).items())


def format_results_table(results: Mapping, show_per_category: bool = False) -> str:
    """A readable table of ``{dataset: {task: {metric: value}}}`` or of already flat
    ``{dataset: {metric: value}}``: one row per (dataset, metric).

    Args:
        results: evaluation results per dataset.
        show_per_category: include per-category AP rows ("bbox/AP-person"); hidden by default, with
            a count of the hidden rows.

    Returns:
        the table as a string (tabulate's "pipe" format).
    """
    rows, hidden = [], 0
    for dataset, dataset_results in results.items():
        for metric, value in flatten_results(dataset_results or {}).items():
            if not show_per_category and "/AP-" in metric:
                hidden += 1
                continue
            rows.append((dataset, metric, value))
    table = tabulate(rows, headers=["dataset", "metric", "value"], tablefmt="pipe", floatfmt=".3f")
    if hidden:
        table += f"\n({hidden} per-category AP values not shown)"
    return table


def print_results_table(results: Mapping, show_per_category: bool = False):
    """Logs :func:`format_results_table` at INFO level (logger ``up2.evaluation.build``)."""
    logger.info("Evaluation results:\n%s", format_results_table(results, show_per_category))
