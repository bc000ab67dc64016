"""Masked language modelling evaluation: masked-token accuracy and perplexity."""
import logging
import math
from collections import OrderedDict
from typing import Dict, Optional

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from up2.evaluation.no_predictions import nan_results

__all__ = ["mlm_metrics", "MLMEvaluator"]

logger = logging.getLogger(__name__)


def mlm_metrics(num_correct: int, num_tokens: int, sum_log_prob: Optional[float] = None,
                num_log_prob_tokens: int = 0) -> Dict[str, float]:
    """Metrics from token counts.

    Args:
        num_correct: masked tokens predicted correctly.
        num_tokens: masked tokens.
        sum_log_prob: sum of the log-probabilities the model gave the true tokens (natural log), or
            None when the model did not report them.
        num_log_prob_tokens: tokens counted in ``sum_log_prob``.

    Returns:
        ``{"accuracy": percent}`` (NaN without tokens) plus ``"perplexity": exp(-sum_log_prob /
        num_log_prob_tokens)`` when log-probabilities are given.
    """
    results = OrderedDict(accuracy=100.0 * num_correct / num_tokens if num_tokens else float("nan"))
    if sum_log_prob is not None and num_log_prob_tokens:
        results["perplexity"] = math.exp(-sum_log_prob / num_log_prob_tokens)
    return results


class MLMEvaluator(DatasetEvaluator):
    """Masked-token accuracy (and perplexity when the model gives the true tokens' log-probabilities).

    Each output has ``"mlm_predictions"`` (T,) and ``"mlm_targets"`` (T,) token ids at the T masked
    positions, and optionally ``"mlm_target_log_probs"`` (T,). Only counts are kept and gathered.
    Returns ``{"mlm": {"accuracy", "perplexity"?}}`` on the main process, ``{}`` elsewhere;
    perplexity is reported when any output had log-probabilities (over those tokens only).
    """

    def __init__(self, dataset_name: str = "", distributed: bool = True):
        """
        Args:
            dataset_name: used in log messages.
            distributed: gather the counts of every rank and evaluate on the main process.
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self.reset()

    def reset(self):
        # [texts, masked tokens, correct, log-prob tokens, sum of log-probs, tokens in the target set]
        self._counts = [0, 0, 0, 0, 0.0, 0]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            pred = out["mlm_predictions"].detach().cpu().reshape(-1)
            target = out["mlm_targets"].detach().cpu().reshape(-1)
            if pred.numel() != target.numel():
                raise ValueError(f"text {inp.get('text_id')} of '{self._dataset_name}': {pred.numel()} "
                                 f"mlm_predictions but {target.numel()} mlm_targets")
            self._counts[0] += 1
            self._counts[1] += target.numel()
            self._counts[2] += int((pred == target).sum())
            inside = out.get("mlm_target_in_vocabulary")
            inside = (torch.ones(target.shape, dtype=torch.bool) if inside is None
                      else inside.detach().cpu().reshape(-1).bool())
            self._counts[5] += int(inside.sum())
            log_probs = out.get("mlm_target_log_probs")
            if log_probs is not None:
                log_probs = log_probs.detach().double().cpu().reshape(-1)
                if log_probs.numel() != target.numel():
                    raise ValueError(f"text {inp.get('text_id')} of '{self._dataset_name}': "
                                     f"{log_probs.numel()} mlm_target_log_probs but {target.numel()} targets")
                # tokens outside the target set have no probability: perplexity is over the set's tokens
                self._counts[3] += int(inside.sum())
                self._counts[4] += float(log_probs[inside].sum())

    def evaluate(self):
        counts = self._counts
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(counts, dst=0)
            if not comm.is_main_process():
                return {}
            counts = [sum(c[i] for c in gathered) for i in range(len(counts))]
        num_texts, num_tokens, num_correct, num_lp, sum_lp, num_inside = counts
        if num_tokens == 0:
            return OrderedDict(mlm=nan_results(f"MLMEvaluator ({num_texts} texts)", self._dataset_name,
                                               ("accuracy", "perplexity", "vocabulary_coverage"),
                                               what="masked tokens in the predictions"))
        if 0 < num_lp < num_tokens:
            logger.warning("MLMEvaluator: perplexity of '%s' covers %d of %d masked tokens (the others had no "
                           "log-probability, or lie outside the target vocabulary)", self._dataset_name, num_lp,
                           num_tokens)
        results = mlm_metrics(num_correct, num_tokens, sum_lp if num_lp else None, num_lp)
        # share of the masked tokens that the target vocabulary contains (the others count as misses)
        results["vocabulary_coverage"] = 100.0 * num_inside / num_tokens
        logger.info("MLM on '%s' (%d texts, %d masked tokens): %s", self._dataset_name, num_texts, num_tokens,
                    dict(results))
        return OrderedDict(mlm=results)
