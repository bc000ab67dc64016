"""The unified decoder g (paper §4.2–4.3) and its attention masks (``attention_masks.py``)."""
from up2.modeling.decoder.attention_masks import (
    IMAGE_POSITION_ID, CaptionDecodingStep, bidirectional_mask, caption_decoding_step, caption_position_ids,
    caption_training_mask, to_additive_mask,
)

__all__ = [
    "IMAGE_POSITION_ID", "CaptionDecodingStep", "bidirectional_mask", "caption_decoding_step",
    "caption_position_ids", "caption_training_mask", "to_additive_mask",
]
