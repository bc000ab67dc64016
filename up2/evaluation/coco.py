"""COCO detection / instance segmentation evaluation through Detectron2's ``COCOEvaluator``.

:class:`UP2COCOEvaluator` is ``COCOEvaluator`` with three differences:

* it always uses the official pycocotools COCOeval (``use_fast_impl=False``: the fast one needs
  Detectron2's C++ extension, which up2 does not require);
* ``class_agnostic=True`` merges every category into one, "object", for both the ground truth (an
  in-memory single-category copy of the dataset's COCO json: nothing is written) and the predictions
  (every ``pred_classes`` becomes 0). This evaluates a class-agnostic region proposer;
* a dataset evaluated without any prediction (``process`` never called, or no instance at all)
  reports NaN for every metric with a warning, instead of ``{}``, so result files keep their keys.
"""
import copy
from collections import OrderedDict
from typing import Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from pycocotools.coco import COCO

from up2.evaluation.no_predictions import nan_results

__all__ = ["UP2COCOEvaluator", "build_coco_evaluator", "single_category_coco"]

# Tasks reported (as NaN) when there is no prediction to infer them from: UPv2 predicts both.
DEFAULT_EMPTY_TASKS = ("bbox", "segm")
AGNOSTIC_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def single_category_coco(coco_api: COCO) -> COCO:
    """A copy of a COCO api whose annotations all belong to one category (``AGNOSTIC_CATEGORY``).

    Args:
        coco_api: ground truth loaded by pycocotools.

    Returns:
        a new indexed ``COCO``; images, boxes, masks and ``iscrowd`` flags are unchanged.
    """
    dataset = copy.deepcopy(coco_api.dataset)
    dataset["categories"] = [dict(AGNOSTIC_CATEGORY)]
    for ann in dataset.get("annotations", []):
        ann["category_id"] = AGNOSTIC_CATEGORY["id"]
    merged = COCO()
    merged.dataset = dataset
    merged.createIndex()
    return merged


class UP2COCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` (official COCOeval) with class-agnostic and empty-input handling.

    Inputs/outputs as ``COCOEvaluator``: dataset dicts with ``image_id``; outputs
    ``{"instances": Instances(pred_boxes, scores, pred_classes, pred_masks?)}``. Returns
    ``{"bbox": {"AP", "AP50", ...}, "segm": {...}}`` on the main process, ``{}`` elsewhere.
    """

    def __init__(self, dataset_name: str, tasks: Optional[Sequence[str]] = None, distributed: bool = True,
                 output_dir: Optional[str] = None, *, class_agnostic: bool = False,
                 max_dets_per_image: Optional[int] = None):
        """
        Args:
            dataset_name: registered dataset with a ``json_file`` in its metadata, or Detectron2
                dicts (converted to COCO json in ``output_dir``).
            tasks: subset of ("bbox", "segm"); None infers them from the predictions (segm when
                masks are predicted).
            distributed: gather the predictions of every rank and evaluate on the main process.
            output_dir: where COCOEvaluator writes its predictions, or None.
            class_agnostic: merge all categories into one (see the module doc).
            max_dets_per_image: detections per image evaluated (COCO default 100).
        """
        metadata = MetadataCatalog.get(dataset_name)
        if not metadata.get("thing_dataset_id_to_contiguous_id") and dataset_name in DatasetCatalog.list():
            # load_coco_json sets the id mapping on first load; without it, predicted class indices
            # would be taken for the json's category ids.
            DatasetCatalog.get(dataset_name)
        super().__init__(dataset_name, tasks=tuple(tasks) if tasks else None, distributed=distributed,
                         output_dir=output_dir, max_dets_per_image=max_dets_per_image, use_fast_impl=False)
        self._dataset_name = dataset_name
        self._class_agnostic = class_agnostic
        if class_agnostic:
            self._coco_api = single_category_coco(self._coco_api)
            # A private Metadata (the catalog's entry is left alone): one class, dataset id 1 -> 0.
            self._metadata = Metadata(name=f"{dataset_name}:class_agnostic", thing_classes=["object"],
                                      thing_dataset_id_to_contiguous_id={AGNOSTIC_CATEGORY["id"]: 0},
                                      json_file=self._metadata.json_file)

    def process(self, inputs, outputs):
        start = len(self._predictions)
        super().process(inputs, outputs)
        if self._class_agnostic:
            for prediction in self._predictions[start:]:
                for instance in prediction.get("instances", []):
                    instance["category_id"] = 0

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if results or not comm.is_main_process() or not self._do_evaluation:
            return results
        # COCOEvaluator returns {} when no rank produced any prediction.
        class_names = self._metadata.get("thing_classes")
        return OrderedDict((task, self._derive_coco_results(None, task, class_names))
                           for task in (self._tasks or DEFAULT_EMPTY_TASKS))

    def _tasks_from_predictions(self, predictions):
        # Zero instances in total: nothing to infer the tasks from.
        return super()._tasks_from_predictions(predictions) if predictions else list(DEFAULT_EMPTY_TASKS)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is not None:
            return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        # No instance at all: every metric (per-category APs included) is NaN.
        metrics = ["AP", "AP50", "AP75", "APm", "APl"] if iou_type == "keypoints" else \
            ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        if class_names is not None and len(class_names) > 1:
            metrics += [f"AP-{name}" for name in class_names]
        return nan_results("UP2COCOEvaluator", self._dataset_name, metrics, what=f"{iou_type} predictions")


def build_coco_evaluator(dataset_name: str, output_dir: Optional[str] = None, *,
                         tasks: Optional[Sequence[str]] = None, class_agnostic: bool = False,
                         max_dets_per_image: Optional[int] = None, distributed: bool = True) -> UP2COCOEvaluator:
    """Factory of :class:`UP2COCOEvaluator` (official COCOeval; see the class for the arguments)."""
    return UP2COCOEvaluator(dataset_name, tasks=tasks, distributed=distributed, output_dir=output_dir,
                            class_agnostic=class_agnostic, max_dets_per_image=max_dets_per_image)
