"""Masked language modelling in the unified formulation: whole-word masking (15 % of the words; of
their tokens' replacements 80 % ``<mask>``, 10 % a random token, 10 % unchanged, decided per word), the
masked text through the text encoder and the unified decoder, each masked position's output scored
against every vocabulary token (cross-entropy)."""
import zlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from up2.modeling.build import TASK_REGISTRY
from up2.modeling.decoder.unified_decoder import text_segment
from up2.modeling.moe import SIDE_INPUT
from up2.modeling.tasks.base import TaskHead, vocabulary_logits

__all__ = ["MLMTask", "whole_word_mask"]


def whole_word_mask(input_ids: torch.Tensor, word_ids: Sequence[Sequence[Optional[int]]], mask_token_id: int,
                    random_token_ids: torch.Tensor, mask_prob: float = 0.15, replace_probs=(0.8, 0.1, 0.1),
                    generator: Optional[torch.Generator] = None, seeds: Optional[Sequence[int]] = None):
    """Masks whole words.

    Args:
        input_ids: (B, T) token ids.
        word_ids: B lists of T word indices (None at special tokens / padding).
        random_token_ids: (R,) ids a "random" replacement draws from.
        mask_prob: fraction of the words of each text chosen (at least one word per text).
        replace_probs: probabilities of <mask>, random token, unchanged for a chosen word.
        generator: random source; or ``seeds``: one seed per text (deterministic masks at evaluation).

    Returns:
        tuple: masked ids (B, T) and targets (B, T) (original id at chosen positions, -100 elsewhere).
    """
    masked, targets = input_ids.clone(), torch.full_like(input_ids, -100)
    probs = torch.tensor(replace_probs, dtype=torch.float64)
    for b, words in enumerate(word_ids):
        gen = generator
        if seeds is not None:
            gen = torch.Generator().manual_seed(int(seeds[b]))
        word_list = sorted({w for w in words if w is not None})
        if not word_list:
            continue
        chosen = torch.rand(len(word_list), generator=gen) < mask_prob
        if not bool(chosen.any()):
            chosen[torch.randint(len(word_list), (1,), generator=gen)] = True
        actions = torch.multinomial(probs, len(word_list), replacement=True, generator=gen)
        for index, word in enumerate(word_list):
            if not chosen[index]:
                continue
            positions = [t for t, w in enumerate(words) if w == word]
            targets[b, positions] = input_ids[b, positions]
            if int(actions[index]) == 0:
                masked[b, positions] = mask_token_id
            elif int(actions[index]) == 1:
                pick = torch.randint(len(random_token_ids), (len(positions),), generator=gen)
                masked[b, positions] = random_token_ids[pick].to(masked.device)
    return masked, targets


def _text_seed(text_id, base_seed: int) -> int:
    return zlib.crc32(f"{base_seed}:{text_id}".encode()) & 0x7FFFFFFF


@TASK_REGISTRY.register()
class MLMTask(TaskHead):
    """
    Args:
        mask_prob: fraction of words masked (0.15).
        replace_probs: <mask> / random / unchanged (0.8, 0.1, 0.1).
        whole_word: mask whole words (True) or single tokens.
        eval_seed: masks at evaluation depend only on this seed and each text's ``text_id``.
    """

    task_type = "mlm"

    @configurable
    def __init__(self, *, mask_prob: float = 0.15, replace_probs=(0.8, 0.1, 0.1), whole_word: bool = True,
                 eval_seed: int = 0):
        super().__init__()
        if not 0 < mask_prob <= 1:
            raise ValueError(f"MODEL.UP2.MLM.MASK_PROB must be in (0, 1], got {mask_prob}")
        if len(replace_probs) != 3 or min(replace_probs) < 0 or abs(sum(replace_probs) - 1) > 1e-6:
            raise ValueError(f"MODEL.UP2.MLM.REPLACE_PROBS must be 3 non-negative numbers summing to 1, got "
                             f"{list(replace_probs)}")
        self.mask_prob, self.replace_probs = mask_prob, tuple(replace_probs)
        self.whole_word, self.eval_seed = whole_word, eval_seed

    @classmethod
    def from_config(cls, cfg):
        mlm = cfg.MODEL.UP2.MLM
        return {"mask_prob": mlm.MASK_PROB, "replace_probs": tuple(mlm.REPLACE_PROBS), "whole_word": mlm.WHOLE_WORD,
                "eval_seed": cfg.MODEL.UP2.TEST.MLM_SEED}

    def _random_token_ids(self, tokenizer) -> torch.Tensor:
        """Ids a "random" replacement draws from (every non-special token), computed once per tokenizer."""
        key = (id(tokenizer), len(tokenizer))
        if getattr(self, "_random_ids_key", None) != key:
            special = set(tokenizer.all_special_ids)
            self._random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
            self._random_ids_key = key
        return self._random_ids

    def _masked_batch(self, model, batched_inputs: List[Dict]):
        tokenizer = model.text_encoder.tokenizer
        if tokenizer.mask_token_id is None:
            raise ValueError(f"MLM needs a tokenizer with a mask token; {type(tokenizer).__name__} has none")
        text = model.text_encoder.tokenize([x["text"] for x in batched_inputs], word_ids=True)
        word_ids = text["word_ids"]
        if not self.whole_word:  # every token its own "word"
            word_ids = [[None if w is None else t for t, w in enumerate(words)] for words in word_ids]
        random_ids = self._random_token_ids(tokenizer)
        seeds = None if self.training else [_text_seed(x.get("text_id", i), self.eval_seed)
                                            for i, x in enumerate(batched_inputs)]
        masked, targets = whole_word_mask(text["input_ids"].cpu(), word_ids, tokenizer.mask_token_id, random_ids,
                                          self.mask_prob, self.replace_probs, seeds=seeds)
        return masked.to(model.device), targets.to(model.device), text["attention_mask"]

    def _logits(self, model, masked, attention_mask, targets):
        features = model.text_encoder.projection(model.text_encoder.encode_ids(masked, attention_mask))
        hidden = model.decoder(self.task_type, [text_segment(features, attention_mask, SIDE_INPUT)]).hidden[:, 1:]
        return vocabulary_logits(model, self.task_type, hidden[targets != -100])  # (M, S)

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        masked, targets, attention_mask = self._masked_batch(model, batched_inputs)
        logits = self._logits(model, masked, attention_mask, targets)
        indices = model.targets.token_indices(self.task_type, targets[targets != -100])
        if not bool((indices != -100).any()):  # every masked token outside a restricted target set
            return {"loss_mlm": logits.sum() * 0.0}
        return {"loss_mlm": F.cross_entropy(logits.float(), indices, ignore_index=-100)}

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        """Per text, at its M_i masked positions: ``mlm_predictions`` and ``mlm_targets`` (M_i,) token ids,
        ``mlm_target_log_probs`` (M_i,) (for perplexity; -inf for a target outside a restricted target set)
        and ``mlm_target_in_vocabulary`` (M_i,) bool (the target is one of the scored tokens)."""
        masked, targets, attention_mask = self._masked_batch(model, batched_inputs)
        log_probs = self._logits(model, masked, attention_mask, targets).float().log_softmax(-1)
        flat_targets = targets[targets != -100]
        indices = model.targets.token_indices(self.task_type, flat_targets)
        in_vocabulary = indices != -100
        target_log_probs = log_probs.gather(1, indices.clamp(min=0)[:, None])[:, 0]
        target_log_probs = target_log_probs.masked_fill(~in_vocabulary, float("-inf"))
        predictions = log_probs.argmax(-1)
        ids = model.targets.vocabulary_ids(self.task_type)
        if ids is not None:
            predictions = ids.to(predictions.device)[predictions]
        counts = (targets != -100).sum(1).tolist()
        return [{"mlm_predictions": pred, "mlm_targets": tg, "mlm_target_log_probs": lp,
                 "mlm_target_in_vocabulary": inside}
                for pred, tg, lp, inside in zip(predictions.split(counts), flat_targets.split(counts),
                                                target_log_probs.split(counts), in_vocabulary.split(counts))]
