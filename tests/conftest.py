"""Shared pytest fixtures. ``import up2`` first: it applies the Detectron2 compatibility fixes."""
import os

import up2  # noqa: F401  (must precede any detectron2 import)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
