"""Tests of up2.evaluation.mlm: masked-token accuracy and perplexity on hand-built outputs."""
import logging
import math

import pytest
import torch

from up2.evaluation import MLMEvaluator, mlm_metrics


def test_mlm_metrics_known_answer():
    r = mlm_metrics(3, 4, sum_log_prob=4 * math.log(0.25), num_log_prob_tokens=4)
    assert r["accuracy"] == 75.0
    assert r["perplexity"] == pytest.approx(4.0)
    assert "perplexity" not in mlm_metrics(1, 2)


def test_evaluator_accuracy_and_perplexity():
    evaluator = MLMEvaluator("mlm_set")
    evaluator.reset()
    # Text 0: 3 masked tokens, 2 right; text 1: 2 masked tokens, 1 right; text 2: nothing masked.
    probs = [[0.5, 0.25, 0.125], [1.0, 0.5]]
    evaluator.process(
        [{"text": "a b c", "text_id": 0}, {"text": "d e", "text_id": 1}],
        [{"mlm_predictions": torch.tensor([5, 6, 9]), "mlm_targets": torch.tensor([5, 6, 7]),
          "mlm_target_log_probs": torch.tensor(probs[0]).log()},
         {"mlm_predictions": torch.tensor([1, 2]), "mlm_targets": torch.tensor([1, 3]),
          "mlm_target_log_probs": torch.tensor(probs[1]).log()}])
    evaluator.process([{"text": "f", "text_id": 2}],
                      [{"mlm_predictions": torch.zeros(0, dtype=torch.long),
                        "mlm_targets": torch.zeros(0, dtype=torch.long),
                        "mlm_target_log_probs": torch.zeros(0)}])
    results = evaluator.evaluate()["mlm"]
    assert results["accuracy"] == pytest.approx(60.0)
    # Geometric mean of the probabilities is (0.5*0.25*0.125*1*0.5)^(1/5) = 2^(-7/5).
    assert results["perplexity"] == pytest.approx(2 ** (7 / 5))


def test_evaluator_without_log_probs_has_no_perplexity():
    evaluator = MLMEvaluator()
    evaluator.process([{"text_id": 0}],
                      [{"mlm_predictions": torch.tensor([1, 2]), "mlm_targets": torch.tensor([1, 1])}])
    assert evaluator.evaluate() == {"mlm": {"accuracy": 50.0, "vocabulary_coverage": 100.0}}


def test_length_mismatch_raises():
    evaluator = MLMEvaluator("m")
    with pytest.raises(ValueError, match="2 mlm_predictions but 3 mlm_targets"):
        evaluator.process([{"text_id": 4}], [{"mlm_predictions": torch.tensor([1, 2]),
                                              "mlm_targets": torch.tensor([1, 2, 3])}])


def test_evaluator_without_predictions_reports_nan(caplog):
    evaluator = MLMEvaluator("empty_mlm")
    evaluator.reset()
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate()["mlm"]
    # no masked token: accuracy and perplexity are undefined (a perplexity is >= 1, never 0)
    assert list(results) == ["accuracy", "perplexity", "vocabulary_coverage"]
    assert all(math.isnan(value) for value in results.values())
    assert "no masked tokens" in caplog.text and "'empty_mlm'" in caplog.text and "NaN" in caplog.text


def test_metrics_of_no_token_are_nan():
    assert math.isnan(mlm_metrics(0, 0)["accuracy"])
