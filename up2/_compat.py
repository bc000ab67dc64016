"""Compatibility fixes that let Detectron2 0.6 run on current Python packages.

Applied once, when ``up2`` is imported (import ``up2`` before ``detectron2`` modules). Each fix is
a no-op where the environment does not need it, so the official Detectron2 is left untouched.
"""
import PIL.Image


def _restore_pillow_linear():
    """Pillow 10 removed ``Image.LINEAR`` (an alias of ``BILINEAR``); Detectron2 0.6 uses it as a
    default argument value at import time in ``detectron2.data.transforms``."""
    if not hasattr(PIL.Image, "LINEAR"):
        PIL.Image.LINEAR = PIL.Image.BILINEAR


def apply():
    _restore_pillow_linear()
