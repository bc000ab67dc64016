"""Results of an evaluation that had nothing to score.

A metric of no prediction is undefined (an accuracy of 0 % or a perplexity of 0 would be a claim about
the model): every metric is NaN, the keys are those of a normal evaluation (result files and tables
keep their columns), and a warning names the dataset. ``eval_results.json`` writes NaN as ``null``.
"""
import logging
from collections import OrderedDict
from typing import Iterable, Optional

__all__ = ["nan_results"]

logger = logging.getLogger(__name__)


def nan_results(who: str, dataset_name: Optional[str], metrics: Iterable[str], what: str = "predictions"
                ) -> OrderedDict:
    """``{metric: nan}`` for every name in ``metrics``, with a warning that ``who`` had no ``what`` (for
    ``dataset_name`` unless it is None)."""
    where = "" if dataset_name is None else f" for '{dataset_name}'"
    logger.warning("%s: no %s%s; every metric is NaN", who, what, where)
    return OrderedDict((metric, float("nan")) for metric in metrics)
