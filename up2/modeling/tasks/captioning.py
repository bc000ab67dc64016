"""Image captioning in the unified formulation (``docs/architecture.md``, Uni-Perceiver v1).

Training sequence ``[<SPE>, image tokens, w_0..w_{T-1}, <spe>_0..<spe>_{T-1}]`` with the mask of
:func:`~up2.modeling.decoder.caption_training_mask`: placeholder ``<spe>_i`` sees the image side and the
words before i, and its output is scored against every vocabulary token to predict ``w_i``
(next-token cross-entropy). Words are the caption's tokens after ``<s>`` (ending with ``</s>``), encoded
by the text encoder *causally* (``<s> w_0 .. w_{i}`` for word i), so no word sees a later one through the
encoder either. Placeholders are the decoder's ``<SPE>`` embedding at text position i.

Inference: the image side is encoded once into a key/value cache; each step feeds ``[w_{t-1}, <spe>_t]``
(``caption_decoding_step``), keeps only ``w_{t-1}`` in the cache, and scores the vocabulary; beam search
(``MODEL.UP2.CAPTION.*``) or greedy decoding reorders the cache.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from up2.modeling.build import TASK_REGISTRY
from up2.modeling.decoder.attention_masks import caption_decoding_step, caption_position_ids, caption_training_mask
from up2.modeling.decoder.unified_decoder import Segment, image_segment
from up2.modeling.moe import MODALITY_TEXT, SIDE_INPUT
from up2.modeling.tasks.base import TaskHead, vocabulary_logits
from up2.modeling.tasks.beam_search import KVCache, beam_search, greedy_decode

__all__ = ["CaptioningTask", "DECODING_CHOICES"]

DECODING_CHOICES = ("beam", "greedy")


@TASK_REGISTRY.register()
class CaptioningTask(TaskHead):
    """
    Args:
        decoding: "beam" or "greedy".
        beam_size, max_length, length_penalty: decoding (v1: beam 2, 21 tokens, no penalty).
    """

    task_type = "captioning"

    @configurable
    def __init__(self, *, decoding: str = "beam", beam_size: int = 2, max_length: int = 21,
                 length_penalty: float = 0.0):
        super().__init__()
        if decoding not in DECODING_CHOICES:
            raise ValueError(f"MODEL.UP2.CAPTION.DECODING: unknown value {decoding!r}; expected one of "
                             f"{list(DECODING_CHOICES)}")
        if beam_size < 1 or max_length < 1:
            raise ValueError(f"MODEL.UP2.CAPTION: BEAM_SIZE and MAX_LENGTH must be >= 1, got {beam_size}, {max_length}")
        self.decoding, self.beam_size = decoding, beam_size
        self.max_length, self.length_penalty = max_length, length_penalty

    @classmethod
    def from_config(cls, cfg):
        cap = cfg.MODEL.UP2.CAPTION
        return {"decoding": cap.DECODING, "beam_size": cap.BEAM_SIZE, "max_length": cap.MAX_LENGTH,
                "length_penalty": cap.LENGTH_PENALTY}

    @staticmethod
    def _word_features(model, input_ids, attention_mask) -> torch.Tensor:
        """(B, T, d) causal text-encoder features of the words after ``<s>``."""
        hidden = model.text_encoder.encode_ids(input_ids, attention_mask, causal=True)
        return model.text_encoder.projection(hidden[:, 1:])

    def _placeholders(self, model, batch: int, positions: torch.Tensor, padding=None) -> Segment:
        tokens = model.decoder.spe_token.expand(batch, positions.numel(), -1)
        return Segment(tokens, MODALITY_TEXT, SIDE_INPUT, True, padding, positions)

    def teacher_forced_logits(self, model, batched_inputs: List[Dict], captions: List[str]):
        """Logits of the training sequence.

        Returns:
            tuple: logits (B, T, S) of placeholders ``<spe>_0..<spe>_{T-1}`` over the target tokens and
            targets (B, T): the token ids of the words w_0..w_{T-1} (caption tokens after ``<s>``, ending
            with ``</s>``; -100 at padding).
        """
        text = model.text_encoder.tokenize(captions)
        ids, mask = text["input_ids"], text["attention_mask"]
        words = self._word_features(model, ids, mask)  # (B, T, d)
        word_padding = mask[:, 1:] == 0
        targets = ids[:, 1:].masked_fill(word_padding, -100)
        images, padding_mask = model.preprocess_images(batched_inputs)
        image = model.encode_images(images.tensor, padding_mask)
        num_image, num_words = image["tokens"].shape[1], words.shape[1]
        # text positions of the words and of the placeholders (the image side has none)
        positions = caption_position_ids(num_image, num_words, device=words.device)[1 + num_image:]
        word_positions, placeholder_positions = positions[:num_words], positions[num_words:]
        segments = [image_segment(image["tokens"], image["padding_mask"], SIDE_INPUT),
                    Segment(words, MODALITY_TEXT, SIDE_INPUT, True, word_padding, word_positions),
                    self._placeholders(model, words.shape[0], placeholder_positions, word_padding)]
        attn_mask = caption_training_mask(num_image, num_words, image["padding_mask"], word_padding)
        hidden = model.decoder(self.task_type, segments, attn_mask=attn_mask).hidden
        return vocabulary_logits(model, self.task_type, hidden[:, 1 + num_image + num_words:]), targets

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        logits, targets = self.teacher_forced_logits(model, batched_inputs, [x["caption"] for x in batched_inputs])
        # token ids -> indices among the target tokens (words outside a restricted set are not scored)
        targets = model.targets.token_indices(self.task_type, targets)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return {"loss_captioning": loss}

    def _banned_tokens(self, model) -> List[int]:
        """Special tokens that never appear inside a caption (the end token stays allowed)."""
        eos = model.text_encoder.eos_token_id
        return [i for i in model.text_encoder.tokenizer.all_special_ids if i != eos]

    def decoding_start(self, model, batched_inputs: List[Dict]):
        """Encodes the image side once into a key/value cache.

        Returns:
            tuple: ``step_fn(tokens (N, 1), state) -> (log_probs (N, V), state)`` for
            :func:`beam_search` / :func:`greedy_decode` (first call with the start token), and the initial
            state (leading dim B).
        """
        images, padding_mask = model.preprocess_images(batched_inputs)
        image = model.encode_images(images.tensor, padding_mask)
        batch, num_image_side = image["tokens"].shape[0], 1 + image["tokens"].shape[1]
        cache = KVCache(model.decoder.num_layers)
        model.decoder(self.task_type, [image_segment(image["tokens"], image["padding_mask"], SIDE_INPUT)],
                      cache=cache)
        banned = torch.tensor(self._banned_tokens(model), dtype=torch.long, device=model.device)
        vocab_size = len(model.text_encoder.tokenizer)
        state = {"cache": cache, "image_padding": image["padding_mask"],
                 "prefix": torch.zeros((batch, 0), dtype=torch.long, device=model.device)}

        def step_fn(tokens, state):
            """tokens (N, 1): the start token at the first call, then the last chosen word."""
            prefix = torch.cat([state["prefix"], tokens], dim=1)  # <s> w_0 .. w_{t-1}
            t = prefix.shape[1] - 1  # words decoded so far
            plan = caption_decoding_step(t, num_image_side, state["image_padding"])
            # plan.position_ids: [t - 1, t] for [w_{t-1}, <spe>_t], or [0] for [<spe>_0] at t = 0
            positions = plan.position_ids.to(model.device)
            segments = []
            if t > 0:
                word = self._word_features(model, prefix, torch.ones_like(prefix))[:, -1:]
                segments.append(Segment(word, MODALITY_TEXT, SIDE_INPUT, True, None, positions[:1]))
            segments.append(self._placeholders(model, prefix.shape[0], positions[-1:]))
            out = model.decoder(self.task_type, segments, attn_mask=plan.attn_mask, prepend_spe=False,
                                cache=state["cache"], cache_keep=plan.num_keep)
            logits = vocabulary_logits(model, self.task_type, out.hidden[:, -1]).float()
            # over the whole tokenizer vocabulary (-inf outside a restricted target set)
            logits = model.targets.full_vocabulary_scores(self.task_type, logits, vocab_size)
            logits[:, banned] = float("-inf")
            return logits.log_softmax(-1), dict(state, prefix=prefix)

        return step_fn, state

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        bos, eos = model.text_encoder.bos_token_id, model.text_encoder.eos_token_id
        step_fn, state = self.decoding_start(model, batched_inputs)
        batch = len(batched_inputs)
        if self.decoding == "beam":
            result = beam_search(step_fn, state, batch, self.beam_size, self.max_length, bos, eos,
                                 self.length_penalty, device=model.device)
        else:
            result = greedy_decode(step_fn, state, batch, self.max_length, bos, eos, device=model.device)
        tokenizer = model.text_encoder.tokenizer
        return [{"caption": tokenizer.decode(seq, skip_special_tokens=True).strip()} for seq in result.sequences]
