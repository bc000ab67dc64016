"""Checkpointing (atomic saves) and weight conversion."""
from up2.checkpoint.checkpointer import AtomicCheckpointer, atomic_write_bytes  # noqa: F401
