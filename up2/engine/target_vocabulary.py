"""The "training_texts" target vocabulary (``MODEL.UP2.HEAD.TARGET_VOCABULARY``): per captioning / MLM
task, the tokens that occur in its training texts, plus the end token (captions end with it).

The trainer calls :func:`set_training_vocabularies` once, after building the model and before loading
any checkpoint: a loaded checkpoint (``MODEL.WEIGHTS``, ``--resume``) brings its own sets, which win.
"""
import logging
from typing import Iterable, List, Set

import torch.distributed as dist
from detectron2.data import DatasetCatalog
from detectron2.utils import comm

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


def _from_main_process(compute):
    """``compute()`` run on the main process only and broadcast to every rank (the datasets are read once)."""
    if comm.get_world_size() == 1:
        return compute()
    holder = [compute() if comm.is_main_process() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def set_training_vocabularies(cfg, model) -> None:
    """Restricts the vocabulary targets of every trained captioning / MLM task type to its training
    texts' tokens when ``MODEL.UP2.HEAD.TARGET_VOCABULARY`` is "training_texts" (no-op otherwise, or for
    a model without target sets). With several ranks the main process reads the texts and broadcasts
    the token ids, so every rank holds the same sets."""
    targets = getattr(model, "targets", None)
    if cfg.MODEL.UP2.HEAD.TARGET_VOCABULARY != "training_texts" or targets is None:
        return
    entries = get_task_entries(cfg, require_train=False)
    for task in VOCABULARY_TASKS:
        datasets = [name for entry in entries if entry.type == task for name in entry.train_datasets]
        if not datasets:
            continue

        def compute(datasets=datasets):
            texts = training_texts(datasets)
            return (sorted(text_token_ids(texts, model.text_encoder)) if texts else []), len(texts)

        ids, num_texts = _from_main_process(compute)
        targets.set_vocabulary_ids(task, ids, len(model.text_encoder.tokenizer))
        logger.info("Target vocabulary of %s: %d of the tokenizer's %d tokens (those of %d training texts of %s)",
                    task, len(ids), len(model.text_encoder.tokenizer), num_texts, datasets)
