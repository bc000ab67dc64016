"""Detectron2's checkpointer with atomic writes: a crash while saving never leaves a truncated
``model_*.pth`` or ``last_checkpoint`` behind (the file is written beside its destination, flushed,
fsync'ed and renamed over it)."""
import logging
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer", "atomic_write_bytes", "resize_variable_size_buffers"]

logger = logging.getLogger(__name__)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _atomic_write(path: str, write):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_bytes(path: str, data: bytes):
    """Writes ``data`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(data))


def resize_variable_size_buffers(model: torch.nn.Module, state_dict) -> None:
    """Gives each buffer that a module lists in ``variable_size_buffers`` (e.g. the target vocabulary
    sets of :class:`~up2.modeling.tasks.targets.TargetEncoder`) the shape it has in ``state_dict``, so that
    loading copies it instead of skipping it as a shape mismatch."""
    for prefix, module in model.named_modules():
        for name in getattr(module, "variable_size_buffers", ()):
            key = f"{prefix}.{name}" if prefix else name
            saved, current = state_dict.get(key), getattr(module, name, None)
            if torch.is_tensor(saved) and torch.is_tensor(current) and saved.shape != current.shape:
                setattr(module, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))


class AtomicCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` whose ``save`` and ``tag_last_checkpoint`` are atomic, and whose
    loading restores variable-size buffers (:func:`resize_variable_size_buffers`)."""

    def _load_model(self, checkpoint):
        if isinstance(checkpoint.get("model"), dict):
            resize_variable_size_buffers(self.model, checkpoint["model"])
        return super()._load_model(checkpoint)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(os.path.basename(save_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode())
