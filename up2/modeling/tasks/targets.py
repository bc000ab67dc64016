"""Target sets encoded by the shared network: class names and the token vocabulary (``docs/architecture.md``,
"Target sets").

Every target is a text sequence through the text encoder and the unified decoder on the *target side*;
its ``<SPE>`` output represents it. Class names are encoded as ``<s> name </s>`` (with a leading space,
so a name is tokenised as the same word inside a sentence); vocabulary token v as ``<s> v </s>``.

Cost and choices (vocabulary, the expensive set: V sequences of 3 tokens through both networks):

* training: the vocabulary is re-encoded with gradient at every captioning / MLM step (as Uni-Perceiver
  v1). The V ids are split evenly across ranks, each rank encodes its part in chunks of
  ``MODEL.UP2.HEAD.VOCAB_CHUNK_SIZE`` sequences with activation checkpointing (only the (chunk, d) outputs
  stay in memory; the networks run twice in backward), and the parts are concatenated with a
  differentiable all-gather. Per rank this costs about 3 V / world_size tokens forward + 2x that in
  backward: for RoBERTa's 50k tokens on 16 GPUs, ~9.4k tokens per step, i.e. a fraction of a captioning
  batch (24 x (1 + 210 image + 2 x 20 text) tokens).
* inference: target embeddings are cached (per task, target set and parameter version: any in-place
  update of a parameter, such as an optimizer step or ``load_state_dict``, invalidates the cache); a
  class list is encoded once per evaluation, the vocabulary once per evaluation.

Target vocabulary (``MODEL.UP2.HEAD.TARGET_VOCABULARY``): captioning and MLM score either every token of
the tokenizer ("full", the paper's setting) or a set of token ids per task ("training_texts": the tokens
that occur in the task's training texts, plus the end token; set by the trainer from the datasets). The
sets are buffers of this module (``captioning_vocabulary``, ``mlm_vocabulary``), so they are saved with
the weights and restored by the checkpointer (which resizes them to the checkpoint's), and the predictor,
``demo/demo.py`` and ``--eval-only`` use the trained set without reading any dataset. An empty buffer
means the full vocabulary. Logits then range over the set: index i is token ``vocabulary_ids(task)[i]``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from up2.modeling.decoder.unified_decoder import text_segment
from up2.modeling.distributed import all_gather_with_grad, world_info
from up2.modeling.moe import SIDE_TARGET

__all__ = ["TargetEncoder", "check_class_names", "VOCABULARY_TASKS", "TARGET_VOCABULARY_CHOICES"]

# Tasks whose targets are vocabulary tokens, and the choices of MODEL.UP2.HEAD.TARGET_VOCABULARY.
VOCABULARY_TASKS = ("captioning", "mlm")
TARGET_VOCABULARY_CHOICES = ("full", "training_texts")


def check_class_names(task: str, names: Sequence[str]) -> List[str]:
    """Validated class list: non-empty, no empty name, no duplicate (named in the error)."""
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"The vocabulary of task '{task}' is empty; give at least one class name")
    empty = [i for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise ValueError(f"The vocabulary of task '{task}' has empty class name(s) at position(s) {empty}")
    seen, duplicates = set(), []
    for name in names:
        key = name.strip().lower()
        if key in seen:
            duplicates.append(name)
        seen.add(key)
    if duplicates:
        raise ValueError(f"The vocabulary of task '{task}' has duplicate class name(s) {sorted(set(duplicates))}; "
                         "each class needs a distinct name")
    return names


class TargetEncoder(nn.Module):
    """Encodes class names and the vocabulary through ``text_encoder`` and ``decoder`` (not owned: the
    meta-architecture passes its modules at call time, so no parameter is registered twice).

    Args:
        vocab_chunk_size: sequences per chunk when encoding the vocabulary.
        checkpoint_chunks: use activation checkpointing for vocabulary chunks in training.
        class_targets_grad: class names are encoded with gradient (False: under ``torch.no_grad()``, also
            in training; the networks still change them through the other tasks' updates).
    """

    # buffers whose size comes from the checkpoint (the checkpointer resizes them before loading)
    variable_size_buffers = tuple(f"{task}_vocabulary" for task in VOCABULARY_TASKS)

    def __init__(self, vocab_chunk_size: int = 4096, checkpoint_chunks: bool = True, class_targets_grad: bool = True,
                 target_vocabulary: str = "full"):
        super().__init__()
        if vocab_chunk_size < 1:
            raise ValueError(f"MODEL.UP2.HEAD.VOCAB_CHUNK_SIZE must be >= 1, got {vocab_chunk_size}")
        if target_vocabulary not in TARGET_VOCABULARY_CHOICES:
            raise ValueError(f"MODEL.UP2.HEAD.TARGET_VOCABULARY: unknown value {target_vocabulary!r}; expected one "
                             f"of {list(TARGET_VOCABULARY_CHOICES)}")
        self.vocab_chunk_size = vocab_chunk_size
        self.checkpoint_chunks = checkpoint_chunks
        self.class_targets_grad = class_targets_grad
        self.target_vocabulary = target_vocabulary
        for name in self.variable_size_buffers:
            self.register_buffer(name, torch.zeros(0, dtype=torch.long))
        self._cache: Dict[Tuple, Tuple[int, torch.Tensor]] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the sets take the size they were saved with (also for a plain ``model.load_state_dict``)
        for name in self.variable_size_buffers:
            saved = state_dict.get(prefix + name)
            if torch.is_tensor(saved) and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        self.clear_cache()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ vocabulary sets
    def set_vocabulary_ids(self, task: str, token_ids: Sequence[int], vocab_size: int):
        """Restricts the vocabulary targets of ``task`` to ``token_ids`` (sorted, duplicates removed).

        Raises:
            ValueError: another task, an empty set (naming the task), or ids outside [0, vocab_size).
        """
        if task not in VOCABULARY_TASKS:
            raise ValueError(f"Task {task!r} has no vocabulary targets; expected one of {list(VOCABULARY_TASKS)}")
        ids = torch.as_tensor(sorted({int(i) for i in token_ids}), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError(f"The target vocabulary of task '{task}' is empty: its training texts gave no token; "
                             "check the task's TRAIN_DATASETS or set MODEL.UP2.HEAD.TARGET_VOCABULARY 'full'")
        if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
            raise ValueError(f"The target vocabulary of task '{task}' has ids outside [0, {vocab_size}): "
                             f"{[int(i) for i in ids if not 0 <= int(i) < vocab_size][:5]}")
        buffer = getattr(self, f"{task}_vocabulary")
        setattr(self, f"{task}_vocabulary", ids.to(buffer.device))
        self.clear_cache()

    def vocabulary_ids(self, task: str) -> Optional[torch.Tensor]:
        """(S,) token ids that ``task``'s logits range over, or None for the full tokenizer vocabulary."""
        if task not in VOCABULARY_TASKS:
            return None
        ids = getattr(self, f"{task}_vocabulary")
        return ids if ids.numel() else None

    def token_indices(self, task: str, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape) -> their index among ``task``'s logits; -100 where a token is outside the
        set (and where ``token_ids`` is -100 already)."""
        ids = self.vocabulary_ids(task)
        if ids is None:
            return token_ids
        ids = ids.to(token_ids.device)
        position = torch.searchsorted(ids, token_ids.clamp(min=0))
        found = (position < ids.numel()) & (ids[position.clamp(max=ids.numel() - 1)] == token_ids)
        return torch.where(found & (token_ids >= 0), position, torch.full_like(token_ids, -100))

    def full_vocabulary_scores(self, task: str, scores: torch.Tensor, vocab_size: int,
                               fill: float = float("-inf")) -> torch.Tensor:
        """(..., S) scores over ``task``'s set -> (..., vocab_size) with ``fill`` at tokens outside it."""
        ids = self.vocabulary_ids(task)
        if ids is None:
            return scores
        full = scores.new_full(scores.shape[:-1] + (vocab_size,), fill)
        full[..., ids.to(scores.device)] = scores
        return full

    def clear_cache(self):
        self._cache.clear()

    @staticmethod
    def _parameter_version(*modules) -> int:
        return sum(p._version for m in modules for p in m.parameters())

    def _cached(self, key, modules, compute):
        if self.training or torch.is_grad_enabled():
            return compute()
        version = self._parameter_version(*modules)
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            hit = (version, compute())
            self._cache[key] = hit
        return hit[1]

    @staticmethod
    def _encode_ids(text_encoder, decoder, task: str, input_ids, attention_mask) -> torch.Tensor:
        features = text_encoder.projection(text_encoder.encode_ids(input_ids, attention_mask))
        out = decoder(task, [text_segment(features, attention_mask, SIDE_TARGET)])
        return out.hidden[:, 0]

    def class_embeddings(self, text_encoder, decoder, task: str, names: Sequence[str]) -> torch.Tensor:
        """(C, d) ``<SPE>`` outputs of the class names."""
        def compute():
            batch = text_encoder.tokenize([" " + name.strip() for name in names])
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.class_targets_grad):
                return self._encode_ids(text_encoder, decoder, task, batch["input_ids"], batch["attention_mask"])

        return self._cached(("classes", task, tuple(names)), (text_encoder, decoder), compute)

    def vocabulary_embeddings(self, text_encoder, decoder, task: str) -> torch.Tensor:
        """(S, d) ``<SPE>`` outputs of the target tokens of ``task``: the set of :meth:`vocabulary_ids`, or
        every token of the tokenizer's vocabulary (S = V)."""
        ids = self.vocabulary_ids(task)  # a loaded or replaced set invalidates the cache
        key = ("vocabulary", task) if ids is None else ("vocabulary", task, ids.data_ptr(), ids._version, ids.numel())
        return self._cached(key, (text_encoder, decoder),
                            lambda: self._encode_vocabulary(text_encoder, decoder, task))

    def _encode_vocabulary(self, text_encoder, decoder, task: str) -> torch.Tensor:
        device = text_encoder.device
        bos, eos = text_encoder.bos_token_id, text_encoder.eos_token_id
        all_ids = self.vocabulary_ids(task)
        if all_ids is None:
            all_ids = torch.arange(len(text_encoder.tokenizer), device=device)
        world, rank = world_info() if self.training else (1, 0)
        per_rank = -(-all_ids.numel() // world)
        ids = all_ids.to(device)[rank * per_rank:(rank + 1) * per_rank]
        outputs = []
        for chunk in ids.split(self.vocab_chunk_size):
            input_ids = torch.stack([torch.full_like(chunk, bos), chunk, torch.full_like(chunk, eos)], dim=1)
            mask = torch.ones_like(input_ids)
            if self.training and self.checkpoint_chunks and torch.is_grad_enabled():
                outputs.append(checkpoint(self._encode_ids, text_encoder, decoder, task, input_ids, mask,
                                          use_reentrant=False))
            else:
                outputs.append(self._encode_ids(text_encoder, decoder, task, input_ids, mask))
        local = torch.cat(outputs) if outputs else ids.new_zeros((0, decoder.dim), dtype=torch.float32)
        return all_gather_with_grad(local) if world > 1 else local
