"""Task formulations of the unified model (detection, classification, retrieval, captioning, MLM) and
their decoding helpers (``beam_search.py``)."""
from up2.modeling.tasks.beam_search import DecodeOutput, KVCache, beam_search, greedy_decode, reorder_state

__all__ = ["DecodeOutput", "KVCache", "beam_search", "greedy_decode", "reorder_state"]
