"""The unified decoder g (paper §4.2–4.3, ``unified_decoder.py``) and its attention masks
(``attention_masks.py``)."""
from up2.modeling.decoder.attention_masks import (
    IMAGE_POSITION_ID, CaptionDecodingStep, bidirectional_mask, caption_decoding_step, caption_position_ids,
    caption_training_mask, to_additive_mask,
)
from up2.modeling.decoder.unified_decoder import (
    DecoderOutput, Segment, UnifiedDecoder, image_segment, text_segment,
)

__all__ = [
    "IMAGE_POSITION_ID", "CaptionDecodingStep", "DecoderOutput", "Segment", "UnifiedDecoder",
    "bidirectional_mask", "caption_decoding_step", "caption_position_ids", "caption_training_mask",
    "image_segment", "text_segment", "to_additive_mask",
]
