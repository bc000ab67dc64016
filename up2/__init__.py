"""up2: Uni-Perceiver v2 as a Detectron2 extension."""
from up2 import _compat

_compat.apply()

__version__ = "0.1.0"
