"""Detectron2's checkpointer with atomic writes, strict loading and bounded disk use.

* Atomic writes (:mod:`up2.checkpoint.atomic_files`): a crash while saving never leaves a truncated
  ``model_*.pth`` or ``last_checkpoint`` behind.
* Strict loading (:mod:`up2.checkpoint.strict_loading`): a checkpoint that leaves model tensors out, holds
  tensors the model does not have or has other shapes is an error naming the file, unless it declares
  the parts it initialises; every error reading a file names it.
* :func:`prune_periodic_checkpoints` keeps the newest periodic checkpoints only.
"""
import logging
import os
import re
from typing import List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys

from up2.checkpoint.atomic_files import atomic_write, atomic_write_bytes
from up2.checkpoint.strict_loading import (UnreadableCheckpointError, check_checkpoint_fits, declared_prefixes)

__all__ = ["AtomicCheckpointer", "resize_variable_size_buffers", "prune_periodic_checkpoints",
           "expected_incompatibility"]

logger = logging.getLogger(__name__)

# Model tensors a checkpoint may leave out: Detectron2 sets the pixel statistics from the config.
_OPTIONAL_KEYS = ("pixel_mean", "pixel_std")


def prune_periodic_checkpoints(directory: str, max_to_keep: int, file_prefix: str = "model") -> List[str]:
    """Deletes the oldest periodic checkpoints ``{file_prefix}_NNNNNNN.pth`` of ``directory`` beyond the
    newest ``max_to_keep`` (by iteration, whichever run wrote them). ``{file_prefix}_final.pth`` and the file
    named by ``last_checkpoint`` are always kept.

    Returns:
        the paths removed.
    """
    if max_to_keep <= 0 or not os.path.isdir(directory):
        return []
    pattern = re.compile(re.escape(file_prefix) + r"_(\d+)\.pth")
    periodic = sorted((int(m.group(1)), name) for name in os.listdir(directory) if (m := pattern.fullmatch(name)))
    tagged = ""
    try:
        with open(os.path.join(directory, "last_checkpoint")) as f:
            tagged = f.read().strip()
    except OSError:
        pass
    removed = []
    for _, name in periodic[:-max_to_keep]:
        if name != tagged:
            path = os.path.join(directory, name)
            os.remove(path)
            removed.append(path)
            logger.info("Removed %s (keeping the newest %d periodic checkpoints)", path, max_to_keep)
    return removed


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


def expected_incompatibility(state_dict, model_state) -> _IncompatibleKeys:
    """What loading ``state_dict`` into a model whose state dict is ``model_state`` leaves out, as fvcore's
    loading reports it (a ``module.`` prefix on every key is ignored), computed without loading: tensors
    the model has and the file lacks (all of them: torch lets Detectron2's FrozenBatchNorm2d fill in
    absent running statistics silently), tensors the model lacks, and shape differences."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    missing = [k for k in model_state if k not in state_dict and k not in _OPTIONAL_KEYS]
    unexpected = [k for k in state_dict if k not in model_state]
    reshaped = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state_dict.items()
                if k in model_state and hasattr(v, "shape") and tuple(v.shape) != tuple(model_state[k].shape)]
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected, incorrect_shapes=reshaped)


def _read_error_detail(error: Exception) -> str:
    message = str(error)
    if "central directory" in message or "PytorchStreamReader" in message:
        return "the file is truncated or is not a torch.save file (an interrupted copy or download?)"
    return f"{type(error).__name__}: {message.splitlines()[0][:300] if message else ''}"


class AtomicCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` whose ``save`` and ``tag_last_checkpoint`` are atomic, whose loading
    restores variable-size buffers (:func:`resize_variable_size_buffers`) and, with ``strict``, refuses a
    checkpoint that does not fit the model (:mod:`up2.checkpoint.strict_loading`). Every error reading
    or loading a file names it."""

    def __init__(self, model, save_dir: str = "", *, strict: bool = True, save_to_disk=None, **checkpointables):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as :class:`DetectionCheckpointer`.
            strict: ``MODEL.UP2.WEIGHTS_STRICT``: a checkpoint that does not fit is an error (True) or
                loaded as far as it fits, with warnings (False, Detectron2's behaviour).
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = bool(strict)
        self._file_being_loaded = ""

    def _load_file(self, filename: str):
        self._file_being_loaded = filename
        try:
            loaded = super()._load_file(filename)
        except Exception as error:  # noqa: BLE001 (torch.load raises many types for a bad file)
            raise UnreadableCheckpointError(f"Cannot read the checkpoint {filename}: {_read_error_detail(error)}; "
                                            "expected a file written by torch.save holding a state dict") from error
        state_dict = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(state_dict, dict) or not state_dict:
            raise UnreadableCheckpointError(f"{filename} holds no state dict: expected a dict of tensors, or a dict "
                                            f"whose 'model' entry is one; got {type(loaded).__name__}"
                                            + (f" with 'model' a {type(state_dict).__name__}" if isinstance(loaded, dict)
                                               and "model" in loaded else ""))
        return loaded

    def _load_model(self, checkpoint):
        path = self._file_being_loaded or "the checkpoint"
        prefixes = declared_prefixes(checkpoint, path)
        author = str(checkpoint.get("__author__", ""))
        resize_variable_size_buffers(self.model, checkpoint["model"])
        # Checked before anything is loaded, so that a refused checkpoint leaves the model as it was; a
        # file that Detectron2 renames by heuristics (model-zoo .pkl) can only be checked afterwards.
        renamed = bool(checkpoint.get("matching_heuristics", False))
        left_at_initialisation = []
        if self.strict and not renamed:
            left_at_initialisation = check_checkpoint_fits(
                path, expected_incompatibility(checkpoint["model"], self.model.state_dict()), self.model, prefixes,
                author)
        try:
            incompatible = super()._load_model(checkpoint)
        except (ValueError, TypeError, RuntimeError) as error:  # e.g. a non-tensor entry
            raise UnreadableCheckpointError(f"Cannot load {path}: {error}") from error
        if not self.strict:
            return incompatible
        if renamed:
            left_at_initialisation = check_checkpoint_fits(path, incompatible, self.model, prefixes, author)
        if prefixes is not None:
            logger.info("%s initialises %s; %d model tensor(s) keep their initialisation%s", path, prefixes,
                        len(left_at_initialisation),
                        f", e.g. {left_at_initialisation[:3]}" if left_at_initialisation else "")
            # the tensors left out on purpose are no warning
            left = set(left_at_initialisation)
            incompatible = incompatible._replace(missing_keys=[k for k in incompatible.missing_keys if k not in left])
        return incompatible

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(os.path.basename(save_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode())
