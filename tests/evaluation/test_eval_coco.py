"""Tests of up2.evaluation.coco: official COCOeval through Detectron2, class-agnostic mode, no predictions."""
import json
import logging
import math
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import polygons_to_bitmask

from up2.evaluation import build_coco_evaluator

# Category ids 1 and 3 (not contiguous) so that the contiguous -> json id mapping is exercised.
CATEGORIES = [{"id": 1, "name": "square", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape"}]
IMAGES = [{"id": 10, "file_name": "a.png", "height": 60, "width": 80},
          {"id": 11, "file_name": "b.png", "height": 50, "width": 50},
          {"id": 12, "file_name": "c.png", "height": 64, "width": 64}]
# (image id, category id, polygon)
OBJECTS = [(10, 1, [5, 5, 35, 5, 35, 35, 5, 35]), (10, 3, [45, 50, 75, 50, 60, 10]),
           (11, 3, [2, 40, 22, 40, 12, 4]), (12, 1, [30, 30, 60, 30, 60, 60, 30, 60]),
           (12, 1, [2, 2, 20, 2, 20, 20, 2, 20])]


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    annotations = []
    for ann_id, (image_id, category_id, poly) in enumerate(OBJECTS, start=1):
        xs, ys = poly[0::2], poly[1::2]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        image = next(im for im in IMAGES if im["id"] == image_id)
        area = float(polygons_to_bitmask([np.array(poly, dtype=float)], image["height"], image["width"]).sum())
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
                            "segmentation": [poly], "area": area, "iscrowd": 0})
    root = tmp_path_factory.mktemp("coco")
    json_file = root / "instances.json"
    json_file.write_text(json.dumps({"images": IMAGES, "annotations": annotations, "categories": CATEGORIES}))
    name = f"test_eval_coco_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_file), str(root))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.fixture
def gt_predictions(ground_truth_instances):
    """``make(dataset_name, wrong_classes=False)``: model-style (inputs, outputs) whose instances are the
    ground truth objects, score 1 (classes are contiguous indices, as load_coco_json maps them)."""
    def make(dataset_name, wrong_classes=False):
        inputs, outputs = [], []
        for record in DatasetCatalog.get(dataset_name):
            classes = [1 - a["category_id"] if wrong_classes else a["category_id"] for a in record["annotations"]]
            inputs.append({"image_id": record["image_id"], "height": record["height"], "width": record["width"]})
            outputs.append({"instances": ground_truth_instances(record, classes)})
        return inputs, outputs
    return make


def _run(evaluator, inputs, outputs):
    evaluator.reset()
    for i in range(0, len(inputs), 2):  # two batches
        evaluator.process(inputs[i:i + 2], outputs[i:i + 2])
    return evaluator.evaluate()


def test_ground_truth_predictions_give_ap_100(coco_dataset, tmp_path, gt_predictions):
    inputs, outputs = gt_predictions(coco_dataset)
    evaluator = build_coco_evaluator(coco_dataset, str(tmp_path))
    assert evaluator._use_fast_impl is False
    results = _run(evaluator, inputs, outputs)
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75", "AP-square", "AP-triangle"):
            assert results[task][metric] == pytest.approx(100.0), (task, metric)
    assert (tmp_path / "coco_instances_results.json").exists()


def test_wrong_classes_class_aware_vs_agnostic(coco_dataset, gt_predictions):
    inputs, outputs = gt_predictions(coco_dataset, wrong_classes=True)
    aware = _run(build_coco_evaluator(coco_dataset), inputs, outputs)
    assert aware["bbox"]["AP"] == pytest.approx(0.0)
    agnostic = _run(build_coco_evaluator(coco_dataset, class_agnostic=True), inputs, outputs)
    for task in ("bbox", "segm"):
        assert agnostic[task]["AP"] == pytest.approx(100.0)
        assert agnostic[task]["AP50"] == pytest.approx(100.0)
        assert not any(k.startswith("AP-") for k in agnostic[task])
    # The catalog's metadata is left as it was.
    assert MetadataCatalog.get(coco_dataset).thing_classes == ["square", "triangle"]


def test_class_agnostic_misses_count(coco_dataset, gt_predictions):
    """Dropping half of the objects of image 12 lowers the class-agnostic recall: it is evaluated."""
    inputs, outputs = gt_predictions(coco_dataset, wrong_classes=True)
    outputs[2] = {"instances": outputs[2]["instances"][:1]}
    results = _run(build_coco_evaluator(coco_dataset, class_agnostic=True), inputs, outputs)
    assert 50.0 < results["bbox"]["AP"] < 100.0


@pytest.mark.parametrize("mode", ["never_processed", "no_instances"])
def test_empty_predictions_report_nan(coco_dataset, caplog, mode, gt_predictions):
    evaluator = build_coco_evaluator(coco_dataset)
    evaluator.reset()
    if mode == "no_instances":
        inputs, outputs = gt_predictions(coco_dataset)
        evaluator.process(inputs, [{"instances": o["instances"][:0]} for o in outputs])
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate()
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert list(results[task]) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AP-square", "AP-triangle"]
        assert all(math.isnan(v) for v in results[task].values())
    assert "no bbox predictions" in caplog.text and "every metric is NaN" in caplog.text


def test_evaluator_built_before_dataset_is_loaded(coco_dataset, gt_predictions):
    """The json -> contiguous id mapping exists only once the dataset is loaded; the evaluator loads
    it itself rather than taking predicted class indices for json category ids."""
    name = f"{coco_dataset}_fresh"
    register_coco_instances(name, {}, MetadataCatalog.get(coco_dataset).json_file, "")
    try:
        evaluator = build_coco_evaluator(name, tasks=("bbox",))
        inputs, outputs = gt_predictions(coco_dataset)  # `name` itself is never loaded
        results = _run(evaluator, inputs, outputs)
        assert set(results) == {"bbox"} and results["bbox"]["AP"] == pytest.approx(100.0)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_build_evaluator_for_detection(coco_dataset, tmp_path, gt_predictions):
    from detectron2.config import get_cfg

    from up2.config import add_up2_config
    from up2.evaluation import UP2COCOEvaluator, build_evaluator

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = build_evaluator(cfg, coco_dataset, "detection")
    assert isinstance(evaluator, UP2COCOEvaluator) and evaluator._use_fast_impl is False
    assert evaluator._output_dir == str(tmp_path / "inference" / coco_dataset)
    inputs, outputs = gt_predictions(coco_dataset, wrong_classes=True)
    agnostic = build_evaluator(cfg, coco_dataset, "detection", class_agnostic=True)
    assert _run(agnostic, inputs, outputs)["bbox"]["AP"] == pytest.approx(100.0)
