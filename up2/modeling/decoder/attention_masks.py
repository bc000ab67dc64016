"""Attention masks of the unified decoder (``docs/architecture.md``, Uni-Perceiver v1 Appendix B).

Boolean masks use True = "query may attend to key", shape (..., Q, K); :func:`to_additive_mask` turns
them into float masks (0 / -inf) for ``scaled_dot_product_attention`` / ``nn.MultiheadAttention``.
Every row of every mask built here has at least one True entry (no NaN rows).

Captioning training sequence (T = number of word slots, n = image tokens)::

    index:    0       1 .. n          n+1 .. n+T       n+T+1 .. n+2T
    token:  <SPE>   image tokens      w_0 .. w_{T-1}   <spe>_0 .. <spe>_{T-1}
    sees:   image side only           image side + w_{<=i}   image side + w_{<i} + itself

``<spe>_i`` predicts ``w_i`` (the *current* word, as in Uni-Perceiver v1). Text position ids are
0..T-1 for the words and again 0..T-1 for the placeholders; the image side (``<SPE>`` and the image
tokens) gets position id -1: it carries no text position embedding (image tokens carry their own
positional information from the image encoder; ``<SPE>`` is a learned token).

Incremental decoding (:func:`caption_decoding_step`): the image side is encoded once (bidirectional
mask) and its keys/values cached. Step t feeds ``[w_{t-1}, <spe>_t]`` (only ``[<spe>_0]`` at t = 0):
``w_{t-1}`` sees the cache and itself, ``<spe>_t`` sees the cache, ``w_{t-1}`` and itself and predicts
``w_t``. Only ``w_{t-1}``'s keys/values join the cache, so every token sees exactly what it sees in
the training sequence.
"""
from typing import NamedTuple, Optional

import torch

__all__ = [
    "bidirectional_mask", "caption_training_mask", "caption_position_ids", "caption_decoding_step",
    "CaptionDecodingStep", "to_additive_mask", "IMAGE_POSITION_ID",
]

# Position id of the image side (``<SPE>`` + image tokens) in captioning sequences: no text position.
IMAGE_POSITION_ID = -1


def bidirectional_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """Every token sees every non-padding token of its sequence (classification, retrieval, MLM, targets).

    Args:
        padding_mask: (B, L) bool, True at padding tokens.

    Returns:
        (B, L, L) bool. Padding queries also see themselves (their outputs are ignored; no empty rows).
    """
    length = padding_mask.shape[-1]
    eye = torch.eye(length, dtype=torch.bool, device=padding_mask.device)
    return (~padding_mask)[:, None, :] | eye


def caption_training_mask(num_image_tokens: int, num_words: int, image_padding_mask: Optional[torch.Tensor] = None,
                          word_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mask of the captioning training sequence ``[<SPE>, image (n), w_0..w_{T-1}, <spe>_0..<spe>_{T-1}]``.

    Args:
        num_image_tokens: n (without ``<SPE>``).
        num_words: T.
        image_padding_mask: (B, n) bool, True at padded image tokens (hidden as keys).
        word_padding_mask: (B, T) bool, True at padded words (hidden as keys; their placeholders' losses
            should be ignored by the caller).

    Returns:
        (L, L) bool with L = 1 + n + 2T when no padding mask is given, else (B, L, L).
    """
    image_side, total = 1 + num_image_tokens, 1 + num_image_tokens + 2 * num_words
    mask = torch.zeros(total, total, dtype=torch.bool)
    words = slice(image_side, image_side + num_words)
    placeholders = slice(image_side + num_words, total)
    mask[:, :image_side] = True  # everyone sees the image side; the image side sees only itself
    mask[words, words] = torch.ones(num_words, num_words, dtype=torch.bool).tril()
    mask[placeholders, words] = torch.ones(num_words, num_words, dtype=torch.bool).tril(-1)
    mask[placeholders, placeholders] = torch.eye(num_words, dtype=torch.bool)
    if image_padding_mask is None and word_padding_mask is None:
        return mask
    ref = image_padding_mask if image_padding_mask is not None else word_padding_mask
    batch, device = ref.shape[0], ref.device
    key_padding = torch.zeros(batch, total, dtype=torch.bool, device=device)
    if image_padding_mask is not None:
        key_padding[:, 1:image_side] = image_padding_mask
    if word_padding_mask is not None:
        key_padding[:, words] = word_padding_mask
    eye = torch.eye(total, dtype=torch.bool, device=device)
    return mask.to(device)[None] & (~key_padding[:, None, :] | eye)


def caption_position_ids(num_image_tokens: int, num_words: int, device=None) -> torch.Tensor:
    """(1 + n + 2T,) long: -1 (``IMAGE_POSITION_ID``) on the image side, then 0..T-1 twice."""
    text = torch.arange(num_words, device=device)
    image = torch.full((1 + num_image_tokens,), IMAGE_POSITION_ID, dtype=torch.long, device=device)
    return torch.cat([image, text, text])


class CaptionDecodingStep(NamedTuple):
    """Inputs of one incremental decoding step.

    Attributes:
        attn_mask: (B, Q, K) bool over keys ``[cache (num_cached), new tokens (Q)]``.
        position_ids: (Q,) long text positions of the new tokens.
        num_keep: how many of the Q new tokens (the first ones) have keys/values to append to the cache.
    """

    attn_mask: torch.Tensor
    position_ids: torch.Tensor
    num_keep: int


def caption_decoding_step(step: int, num_image_side: int, image_padding_mask: Optional[torch.Tensor] = None,
                          batch_size: int = 1) -> CaptionDecodingStep:
    """Mask of incremental decoding step ``step`` (new tokens: ``[<spe>_0]`` at 0, else ``[w_{t-1}, <spe>_t]``).

    The cache holds the image side (``num_image_side`` = 1 + n keys) and the words w_0..w_{t-2}.

    Args:
        step: t >= 0.
        num_image_side: 1 + n.
        image_padding_mask: (B, n) bool, True at padded image tokens.
        batch_size: B when no padding mask is given.

    Returns:
        CaptionDecodingStep.
    """
    if step < 0:
        raise ValueError(f"caption_decoding_step: step must be >= 0, got {step}")
    num_cached = num_image_side + max(step - 1, 0)
    if step == 0:
        new = torch.ones(1, 1, dtype=torch.bool)
        positions, num_keep = torch.tensor([0]), 0
    else:
        new = torch.tensor([[True, False], [True, True]])
        positions, num_keep = torch.tensor([step - 1, step]), 1
    device = image_padding_mask.device if image_padding_mask is not None else None
    if image_padding_mask is not None:
        batch_size = image_padding_mask.shape[0]
    cache = torch.ones(batch_size, new.shape[0], num_cached, dtype=torch.bool, device=device)
    if image_padding_mask is not None:
        cache[:, :, 1:num_image_side] = ~image_padding_mask[:, None, :]
    mask = torch.cat([cache, new.to(device).expand(batch_size, -1, -1)], dim=-1)
    return CaptionDecodingStep(mask, positions.to(device), num_keep)


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask (True = attend) -> float mask with 0 where allowed and -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
