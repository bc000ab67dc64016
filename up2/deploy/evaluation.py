"""Exported graphs against the PyTorch model: their results in the model's output format, and COCO
detection AP of both on the same images.

``compare_detection_ap(cfg, "detector.onnx", "shapes_det_val")`` runs :class:`~up2.engine.UP2Predictor`
(PyTorch eager, ``cfg.MODEL.WEIGHTS``) and :class:`~up2.deploy.runtime.OnnxPredictor` on every image of
the dataset and evaluates both with up2's COCO evaluator (``build_evaluator``: Detectron2's
``COCOEvaluator``, pure-Python COCOeval).
"""
import logging
import os
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from up2.deploy.runtime import OnnxPredictor

__all__ = ["to_model_output", "compare_detection_ap", "default_test_dataset"]

logger = logging.getLogger(__name__)


def default_test_dataset(cfg, task: str) -> str:
    """The first test dataset of ``task`` in ``DATASETS.UP2.TASKS`` (for detection, else ``DATASETS.TEST``)."""
    from up2.config import get_task_entries

    for entry in get_task_entries(cfg, require_train=False):
        if entry.type == task and entry.test_datasets:
            return entry.test_datasets[0]
    if task == "detection" and cfg.DATASETS.TEST:
        return cfg.DATASETS.TEST[0]
    raise ValueError(f"the config names no {task} test dataset (DATASETS.UP2.TASKS); give --dataset")


def to_model_output(result: Dict[str, np.ndarray], task: str, image_size) -> Dict:
    """An :class:`OnnxPredictor` result as the PyTorch model returns it: detection
    ``{"instances": Instances}`` (pred_boxes, scores, pred_classes, pred_masks) of ``image_size`` (H, W);
    classification ``{"class_scores": (C,) tensor}``."""
    if task == "classification":
        return {"class_scores": torch.from_numpy(np.asarray(result["class_scores"]))}
    instances = Instances(tuple(image_size))
    instances.pred_boxes = Boxes(torch.from_numpy(result["boxes"]).reshape(-1, 4))
    instances.scores = torch.from_numpy(result["scores"])
    instances.pred_classes = torch.from_numpy(result["classes"])
    instances.pred_masks = torch.from_numpy(result["masks"])
    return {"instances": instances}


def compare_detection_ap(cfg, onnx_path: str, dataset_name: str, output_dir: Optional[str] = None,
                         num_threads: Optional[int] = None, limit: Optional[int] = None) -> Dict[str, Dict]:
    """COCO results of the PyTorch model of ``cfg`` and of the exported detector on ``dataset_name``.

    Args:
        cfg: the model's config (``MODEL.WEIGHTS`` loaded by ``UP2Predictor``).
        onnx_path: a detection export whose class names are the dataset's ``thing_classes``.
        dataset_name: a registered detection dataset.
        output_dir: where the evaluators write their COCO results (``<dir>/pytorch``, ``<dir>/onnxruntime``);
            None: ``cfg.OUTPUT_DIR/inference_onnx/<dataset_name>``.
        num_threads: onnxruntime threads; limit: evaluate the first ``limit`` images only.

    Returns:
        ``{"pytorch": {"bbox": {...}, "segm": {...}}, "onnxruntime": {...}}``.

    Raises:
        ValueError: the export is not a detector or its class names are not the dataset's.
    """
    from up2.engine import UP2Predictor
    from up2.evaluation import build_evaluator

    onnx_predictor = OnnxPredictor(onnx_path, num_threads=num_threads)
    if onnx_predictor.task != "detection":
        raise ValueError(f"{onnx_path}: a {onnx_predictor.task} export; COCO AP needs a detection export")
    classes = list(MetadataCatalog.get(dataset_name).get("thing_classes", []))
    if onnx_predictor.class_names != classes:
        raise ValueError(f"{onnx_path}: class names {onnx_predictor.class_names} differ from the thing_classes of "
                         f"{dataset_name} {classes}; export with --vocabulary '{','.join(classes)}'")
    predictor = UP2Predictor(cfg)
    predictor.set_vocabulary("detection", classes)
    output_dir = output_dir or os.path.join(cfg.OUTPUT_DIR, "inference_onnx", dataset_name)
    evaluators = {name: build_evaluator(cfg, dataset_name, "detection", os.path.join(output_dir, name))
                  for name in ("pytorch", "onnxruntime")}
    for evaluator in evaluators.values():
        evaluator.reset()
    records = DatasetCatalog.get(dataset_name)[:limit]
    from up2.data.mappers import read_image

    for index, record in enumerate(records, 1):
        image = read_image(record["file_name"], "BGR")
        inputs = [{"image_id": record["image_id"], "height": image.shape[0], "width": image.shape[1],
                   "file_name": record["file_name"]}]
        with torch.no_grad():
            evaluators["pytorch"].process(inputs, [predictor(image, "detection")])
        onnx_output = to_model_output(onnx_predictor(image), "detection", image.shape[:2])
        evaluators["onnxruntime"].process(inputs, [onnx_output])
        if index % 50 == 0:
            logger.info("compare_detection_ap: %d / %d images", index, len(records))
    return {name: evaluator.evaluate() for name, evaluator in evaluators.items()}
