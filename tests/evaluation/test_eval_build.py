"""Tests of up2.evaluation.build: evaluator choice by task type, result flattening and table."""
import logging

import pytest
from detectron2.config import get_cfg
from detectron2.evaluation.testing import flatten_results_dict

from up2.config import TASK_TYPES, add_up2_config
from up2.evaluation import (CaptionEvaluator, ClassificationEvaluator, MLMEvaluator, RetrievalEvaluator,
                            build_evaluator, flatten_results, format_results_table, print_results_table)


@pytest.fixture
def cfg():
    c = get_cfg()
    add_up2_config(c)
    return c


@pytest.mark.parametrize("task_type,cls", [("classification", ClassificationEvaluator),
                                           ("retrieval", RetrievalEvaluator),
                                           ("captioning", CaptionEvaluator), ("mlm", MLMEvaluator)])
def test_build_by_task_type(cfg, task_type, cls):
    assert type(build_evaluator(cfg, "any_name", task_type)) is cls


def test_unknown_task_type_lists_valid_ones(cfg):
    with pytest.raises(ValueError) as info:
        build_evaluator(cfg, "my_set", "segmentation")
    message = str(info.value)
    assert "'segmentation'" in message and "my_set" in message
    for task_type in TASK_TYPES:
        assert task_type in message


def test_flatten_results_uses_detectron2_convention():
    results = {"bbox": {"AP": 50, "AP-cat": 10.5}, "segm": {"AP": 40.0}}
    flat = flatten_results(results)
    assert flat == {"bbox/AP": 50.0, "bbox/AP-cat": 10.5, "segm/AP": 40.0}
    assert flat == flatten_results_dict(results)
    assert all(isinstance(v, float) for v in flat.values())


def test_results_table(caplog):
    results = {"coco_val": {"bbox": {"AP": 41.25, "AP-cat": 3.0}},
               "imagenet_val": {"classification/top1": 80.5}}  # already flat rows are accepted too
    table = format_results_table(results)
    assert "| coco_val" in table and "bbox/AP " in table and "41.250" in table
    assert "imagenet_val" in table and "classification/top1" in table and "80.500" in table
    assert "AP-cat" not in table and "1 per-category AP values not shown" in table
    assert "bbox/AP-cat" in format_results_table(results, show_per_category=True)
    with caplog.at_level(logging.INFO, logger="up2.evaluation.build"):
        print_results_table(results)
    assert "41.250" in caplog.text
