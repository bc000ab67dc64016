"""Tests of up2.evaluation.classification: top-k accuracy with pessimistic ties."""
import logging
import math
import uuid

import pytest
import torch
from detectron2.data import MetadataCatalog

from up2.evaluation import ClassificationEvaluator, topk_accuracy, true_class_rank

# 6 samples, 6 classes; the rank of the true class (pessimistic) is written beside each row.
SCORES = torch.tensor([
    [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: best -> rank 0
    [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],   # label 1: tied with class 0 -> rank 1
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # label 0: worst -> rank 5
    [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],   # label 3: all tied -> rank 5
    [0.0, 0.3, 0.1, 0.3, 0.3, 0.3],   # label 2: below 4 classes -> rank 4
    [0.0, 0.7, 0.6, 0.5, 0.4, 0.3],   # label 3: below 2 classes, above others -> rank 2
])
LABELS = torch.tensor([0, 1, 0, 3, 2, 3])
RANKS = [0, 1, 5, 5, 4, 2]


def test_true_class_rank_hand_built():
    assert true_class_rank(SCORES, LABELS).tolist() == RANKS


def test_topk_hand_built():
    r = topk_accuracy(SCORES, LABELS, ks=(1, 2, 5))
    assert r["top1"] == pytest.approx(100 / 6)
    assert r["top2"] == pytest.approx(200 / 6)
    assert r["top5"] == pytest.approx(400 / 6)


def test_k_capped_at_number_of_classes():
    r = topk_accuracy(SCORES[:, :3][:2], LABELS[:2], ks=(1, 5))
    assert r["top5"] == 100.0
    assert r["top1"] == 50.0


def test_bad_label_raises():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 6\)"):
        topk_accuracy(SCORES, torch.tensor([0, 1, 2, 3, 4, 6]))


def test_evaluator_two_batches():
    name = f"test_cls_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(thing_classes=[f"c{i}" for i in range(6)])
    evaluator = ClassificationEvaluator(name)
    evaluator.reset()
    for start in (0, 3):
        inputs = [{"file_name": f"{i}.jpg", "image_id": i, "label": int(LABELS[i])} for i in range(start, start + 3)]
        outputs = [{"class_scores": SCORES[i]} for i in range(start, start + 3)]
        evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    assert list(results) == ["classification"]
    assert results["classification"]["top1"] == pytest.approx(100 / 6)
    assert results["classification"]["top5"] == pytest.approx(400 / 6)


def test_evaluator_checks_number_of_classes():
    name = f"test_cls_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    evaluator = ClassificationEvaluator(name)
    with pytest.raises(ValueError, match="expected 3"):
        evaluator.process([{"image_id": 0, "label": 0}], [{"class_scores": torch.zeros(4)}])


def test_evaluator_without_predictions_reports_nan(caplog):
    evaluator = ClassificationEvaluator("")
    evaluator.reset()
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate()["classification"]
    assert list(results) == ["top1", "top5"] and all(math.isnan(v) for v in results.values())
    assert "no predictions" in caplog.text and "NaN" in caplog.text
    assert all(math.isnan(v) for v in topk_accuracy(torch.zeros(0, 3), torch.zeros(0)).values())
