"""Task formulations of the unified model (``TASK_REGISTRY``: detection, classification, retrieval,
captioning, MLM), their target sets (``targets.py``) and decoding helpers (``beam_search.py``)."""
from up2.modeling.tasks.base import ClassNamesMixin, TaskHead, vocabulary_logits
from up2.modeling.tasks.beam_search import DecodeOutput, KVCache, beam_search, greedy_decode, reorder_state
from up2.modeling.tasks.captioning import CaptioningTask
from up2.modeling.tasks.classification import ClassificationTask
from up2.modeling.tasks.detection import DetectionTask
from up2.modeling.tasks.mlm import MLMTask, whole_word_mask
from up2.modeling.tasks.retrieval import RetrievalTask, contrastive_loss
from up2.modeling.tasks.targets import TargetEncoder, check_class_names

__all__ = [
    "CaptioningTask", "ClassNamesMixin", "ClassificationTask", "DecodeOutput", "DetectionTask", "KVCache",
    "MLMTask", "RetrievalTask", "TargetEncoder", "TaskHead", "beam_search", "check_class_names",
    "contrastive_loss", "greedy_decode", "reorder_state", "vocabulary_logits", "whole_word_mask",
]
