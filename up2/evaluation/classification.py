"""Image classification evaluation: top-1 / top-5 accuracy.

Ties are broken **pessimistically**: the true class is ranked below every other class that has the
same score, so a constant score vector is never counted as correct (unless K >= number of classes)
and the result does not depend on the class order.
"""
import itertools
import logging
from collections import OrderedDict
from typing import Dict, Sequence

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from up2.evaluation.no_predictions import nan_results

__all__ = ["true_class_rank", "topk_accuracy", "ClassificationEvaluator"]

logger = logging.getLogger(__name__)


def true_class_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of the true class with pessimistic ties.

    Args:
        scores: (N, C) class scores (logits or probabilities), higher is better.
        labels: (N,) true class indices in ``[0, C)``.

    Returns:
        (N,) long: the number of OTHER classes whose score is ``>=`` the true class's score; the
        sample is correct at top-K iff its rank is ``< K``.
    """
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if scores.dim() != 2 or scores.shape[0] != labels.numel():
        raise ValueError(f"scores must be (N, C) with N = len(labels) = {labels.numel()}; got {tuple(scores.shape)}")
    num_classes = scores.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]")
    true_scores = scores.gather(1, labels[:, None])  # (N, 1)
    return (scores >= true_scores).sum(1) - 1


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-K accuracy in percent, K capped at the number of classes, pessimistic ties.

    Args:
        scores: (N, C) class scores.
        labels: (N,) true class indices.
        ks: the K values; the key of K is ``f"top{K}"`` (the requested K, even when capped).

    Returns:
        ``{"top1": ..., "top5": ...}``; NaN for every K when N = 0.
    """
    ranks = true_class_rank(scores, labels)
    return _accuracy_from_ranks(ranks, scores.shape[1], ks)


def _accuracy_from_ranks(ranks: torch.Tensor, num_classes: int, ks: Sequence[int]) -> Dict[str, float]:
    results = OrderedDict()
    for k in ks:
        hits = ranks < min(k, num_classes)
        results[f"top{k}"] = float(hits.double().mean() * 100) if ranks.numel() else float("nan")
    return results


class ClassificationEvaluator(DatasetEvaluator):
    """Top-K accuracy of ``{"class_scores": (C,)}`` outputs against the inputs' ``"label"``.

    Only the rank of the true class is kept per image (not the C scores), so the memory and the
    cross-rank gather stay small on ImageNet-size sets. Returns
    ``{"classification": {"top1", "top5"}}`` on the main process, ``{}`` elsewhere.
    """

    def __init__(self, dataset_name: str = "", distributed: bool = True, ks: Sequence[int] = (1, 5)):
        """
        Args:
            dataset_name: registered dataset; its metadata ``thing_classes`` (when set) gives the
                expected number of classes C.
            distributed: gather across ranks and evaluate on the main process.
            ks: the K values of top-K accuracy.
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._ks = tuple(ks)
        class_names = MetadataCatalog.get(dataset_name).get("thing_classes", None) if dataset_name else None
        self._num_classes = len(class_names) if class_names is not None else None
        self.reset()

    def reset(self):
        self._ranks = []  # [int]
        self._num_seen_classes = None

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            scores = out["class_scores"].detach().float().cpu().reshape(1, -1)
            num_classes = scores.shape[1]
            expected = self._num_classes if self._num_classes is not None else self._num_seen_classes
            if expected is not None and num_classes != expected:
                raise ValueError(f"class_scores of image {inp.get('image_id')} in '{self._dataset_name}' have "
                                 f"{num_classes} entries; expected {expected} (metadata thing_classes)")
            self._num_seen_classes = num_classes
            label = int(inp["label"])
            if not 0 <= label < num_classes:
                raise ValueError(f"label {label} of image {inp.get('image_id')} in '{self._dataset_name}' "
                                 f"is outside [0, {num_classes})")
            self._ranks.append(int(true_class_rank(scores, torch.tensor([label]))[0]))

    def evaluate(self):
        ranks, num_classes = self._ranks, self._num_seen_classes
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((ranks, num_classes), dst=0)
            if not comm.is_main_process():
                return {}
            ranks = list(itertools.chain(*[r for r, _ in gathered]))
            num_classes = max((c for _, c in gathered if c is not None), default=None)
        if not ranks:
            return OrderedDict(classification=nan_results("ClassificationEvaluator", self._dataset_name,
                                                          (f"top{k}" for k in self._ks)))
        results = _accuracy_from_ranks(torch.tensor(ranks), num_classes, self._ks)
        logger.info("Classification on '%s' (%d images, %d classes): %s", self._dataset_name, len(ranks),
                    num_classes, dict(results))
        return OrderedDict(classification=results)
