"""The "training_texts" target vocabulary (``MODEL.UP2.HEAD.TARGET_VOCABULARY``): per captioning / MLM
task, the tokens that occur in its training texts, plus the end token (captions end with it).

The trainer calls :func:`set_training_vocabularies` once, after building the model and before loading
any checkpoint: a loaded checkpoint (``MODEL.WEIGHTS``, ``--resume``) brings its own sets, which win.
"""
import logging
from typing import Iterable, List, Set

from detectron2.data import DatasetCatalog

from up2.config import get_task_entries
from up2.modeling.tasks.targets import VOCABULARY_TASKS

__all__ = ["training_texts", "text_token_ids", "set_training_vocabularies"]

logger = logging.getLogger(__name__)


def training_texts(dataset_names: Iterable[str]) -> List[str]:
    """Every caption (``"captions"``) and corpus line (``"text"``) of the registered datasets."""
    texts = []
    for name in dataset_names:
        for record in DatasetCatalog.get(name):
            texts.extend(record.get("captions", ()))
            if record.get("text"):
                texts.append(record["text"])
    return texts


def text_token_ids(texts: List[str], text_encoder) -> Set[int]:
    """Ids of the tokens of ``texts`` as the text encoder tokenises them (same truncation), special tokens
    left out, plus the end-of-sequence token."""
    tokenizer = text_encoder.tokenizer
    special = set(tokenizer.all_special_ids)
    ids = {text_encoder.eos_token_id}
    for start in range(0, len(texts), 4096):
        batch = tokenizer(texts[start:start + 4096], truncation=True, max_length=text_encoder.max_length)
        for sequence in batch["input_ids"]:
            ids.update(i for i in sequence if i not in special)
    return ids


def set_training_vocabularies(cfg, model) -> None:
    """Restricts the vocabulary targets of every trained captioning / MLM task type to its training
    texts' tokens when ``MODEL.UP2.HEAD.TARGET_VOCABULARY`` is "training_texts" (no-op otherwise, or for
    a model without target sets)."""
    targets = getattr(model, "targets", None)
    if cfg.MODEL.UP2.HEAD.TARGET_VOCABULARY != "training_texts" or targets is None:
        return
    entries = get_task_entries(cfg, require_train=False)
    for task in VOCABULARY_TASKS:
        datasets = [name for entry in entries if entry.type == task for name in entry.train_datasets]
        if not datasets:
            continue
        texts = training_texts(datasets)
        ids = text_token_ids(texts, model.text_encoder) if texts else set()
        targets.set_vocabulary_ids(task, ids, len(model.text_encoder.tokenizer))
        logger.info("Target vocabulary of %s: %d of the tokenizer's %d tokens (those of %d training texts of %s)",
                    task, len(ids), len(model.text_encoder.tokenizer), len(texts), datasets)
