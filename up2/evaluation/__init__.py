"""Task evaluators (Detectron2 ``DatasetEvaluator``s) and result helpers.

Each evaluator gathers its data across ranks and returns ``{task: {metric: value}}`` on the main
process (``{}`` elsewhere); a dataset evaluated without predictions reports NaN for every metric, with a
warning (:mod:`up2.evaluation.no_predictions`).
"""
from up2.evaluation.build import build_evaluator, flatten_results, format_results_table, print_results_table
from up2.evaluation.caption import CaptionEvaluator, caption_scores, simple_ptb_tokenize, tokenize_captions
from up2.evaluation.classification import ClassificationEvaluator, topk_accuracy, true_class_rank
from up2.evaluation.coco import UP2COCOEvaluator, build_coco_evaluator, single_category_coco
from up2.evaluation.mlm import MLMEvaluator, mlm_metrics
from up2.evaluation.retrieval import RetrievalEvaluator, retrieval_recall

__all__ = [
    "build_evaluator",
    "flatten_results",
    "format_results_table",
    "print_results_table",
    "CaptionEvaluator",
    "caption_scores",
    "simple_ptb_tokenize",
    "tokenize_captions",
    "ClassificationEvaluator",
    "topk_accuracy",
    "true_class_rank",
    "UP2COCOEvaluator",
    "build_coco_evaluator",
    "single_category_coco",
    "MLMEvaluator",
    "mlm_metrics",
    "RetrievalEvaluator",
    "retrieval_recall",
]
