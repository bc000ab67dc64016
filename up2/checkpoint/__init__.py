"""Checkpointing (atomic saves, strict loading) and weight conversion (``conversion.py``, one module per
source in ``sources/``, the command line ``python -m up2.checkpoint.convert``)."""
from up2.checkpoint.atomic_files import atomic_write_bytes  # noqa: F401
from up2.checkpoint.checkpointer import AtomicCheckpointer  # noqa: F401
