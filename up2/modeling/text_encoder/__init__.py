"""Text encoders (TEXT_ENCODER_REGISTRY)."""
from up2.modeling.text_encoder.hf_text_encoder import HFTextEncoder, load_hf_tokenizer  # noqa: F401
