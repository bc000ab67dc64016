"""Strict loading of ``MODEL.WEIGHTS``: a checkpoint that does not fit the model is an error, not a warning.

:class:`~up2.checkpoint.AtomicCheckpointer` with ``strict=True`` (``MODEL.UP2.WEIGHTS_STRICT``, the
default) accepts a checkpoint only when

* every model tensor is in it (no *missing* tensor),
* every tensor in it is a model tensor (no *unexpected* tensor), and
* every tensor has the model's shape.

A **partial** checkpoint declares the parts of the model it initialises: the top-level key
``"initialised_prefixes"`` lists key prefixes (``["image_encoder.backbone."]``). Only model tensors under
those prefixes must then be in it; the others keep their initialisation (logged). Unexpected tensors
and shape differences stay errors. The converter's outputs (``python -m up2.checkpoint.convert``, written
by :func:`save_partial_checkpoint`) declare what they initialise: see :func:`converted_prefixes`.

Two kinds of tensor never count: BatchNorm's ``num_batches_tracked`` (converters drop it; it does not
change any output), and the tensors a module lists in its ``pruned_checkpoint_keys`` attribute (parts a
module drops on purpose, such as the classifier and last blocks of a timm backbone, that pretrained
checkpoints still hold).

With ``strict=False`` loading is Detectron2's: what fits is loaded and the rest is logged as warnings.
"""
import io
from typing import Dict, List, Optional, Sequence, Set

import torch
from torch import nn

from up2.checkpoint.atomic_files import atomic_write_bytes

__all__ = ["INITIALISED_PREFIXES_KEY", "CONVERTER_AUTHOR", "UnreadableCheckpointError",
           "IncompatibleCheckpointError", "declared_prefixes", "pruned_checkpoint_keys", "check_checkpoint_fits",
           "converted_prefixes", "save_partial_checkpoint"]

INITIALISED_PREFIXES_KEY = "initialised_prefixes"
# "__author__" of the checkpoints written by the weight converter (python -m up2.checkpoint.convert).
CONVERTER_AUTHOR = "up2.checkpoint.convert"
# How many names of each kind an error shows.
NAMES_SHOWN = 5
_WHAT_TO_DO = ("Load a checkpoint of this model (the same config), convert pretrained weights with "
               "`python -m up2.checkpoint.convert` (its outputs declare the parts they initialise), or set "
               "MODEL.UP2.WEIGHTS_STRICT False to load only the tensors that fit (Detectron2's behaviour).")


class UnreadableCheckpointError(ValueError):
    """A weights file that is not a readable checkpoint (truncated, not written by ``torch.save``, or
    without a state dict); the message names the file."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file, counts the missing,
    unexpected and reshaped tensors and shows the first few of each."""


def declared_prefixes(checkpoint: dict, path: str) -> Optional[List[str]]:
    """The prefixes a checkpoint declares it initialises (``checkpoint["initialised_prefixes"]``), or
    None when it declares nothing (a checkpoint of the whole model).

    Raises:
        UnreadableCheckpointError: the declaration is not a list of strings.
    """
    value = checkpoint.get(INITIALISED_PREFIXES_KEY)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise UnreadableCheckpointError(f"{path}: '{INITIALISED_PREFIXES_KEY}' must be a list of key prefixes "
                                        f"(strings), got {value!r}")
    return list(value)


def pruned_checkpoint_keys(model: nn.Module) -> Set[str]:
    """Full names of the tensors that modules of ``model`` list in ``pruned_checkpoint_keys``."""
    keys = set()
    for prefix, module in model.named_modules():
        for name in getattr(module, "pruned_checkpoint_keys", ()):
            keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:NAMES_SHOWN])
    return shown + (f", ... ({len(items) - NAMES_SHOWN} more)" if len(items) > NAMES_SHOWN else "")


def _counted(key: str) -> bool:
    return not key.endswith("num_batches_tracked")


def check_checkpoint_fits(path: str, incompatible, model: nn.Module, prefixes: Optional[Sequence[str]],
                          author: str = "") -> List[str]:
    """Raises unless the checkpoint ``path`` fits ``model`` (see the module doc).

    Args:
        path: the checkpoint file (named in the error).
        incompatible: fvcore's ``_IncompatibleKeys`` of the load (``missing_keys``, ``unexpected_keys``,
            ``incorrect_shapes`` as ``(key, shape in checkpoint, shape in model)``).
        model: the model loaded into (for its ``pruned_checkpoint_keys``).
        prefixes: what the checkpoint declares it initialises (None: the whole model).
        author: the checkpoint's ``__author__`` (an old converter output gets a hint).

    Returns:
        the model tensors that keep their initialisation (outside the declared prefixes).

    Raises:
        IncompatibleCheckpointError: naming the file, with counts and the first names of each kind.
    """
    pruned = pruned_checkpoint_keys(model)
    covered = (lambda key: True) if prefixes is None else (lambda key: any(key.startswith(p) for p in prefixes))
    missing = [k for k in incompatible.missing_keys if _counted(k)]
    not_loaded = [k for k in missing if not covered(k)]
    missing = [k for k in missing if covered(k)]
    unexpected = [k for k in incompatible.unexpected_keys if _counted(k) and k not in pruned]
    reshaped = [f"{k} (checkpoint {tuple(saved)} vs model {tuple(own)})" for k, saved, own in incompatible.incorrect_shapes]
    if missing or unexpected or reshaped:
        lines = [f"{path} does not fit the model:"]
        if prefixes is not None:
            lines.append(f"  it declares that it initialises the tensors under {list(prefixes)}")
        if missing:
            lines.append(f"  {len(missing)} model tensor(s) missing from it: {_examples(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} tensor(s) in it that the model does not have: {_examples(unexpected)}")
        if reshaped:
            lines.append(f"  {len(reshaped)} tensor(s) with another shape: {_examples(reshaped)}")
        if prefixes is None and author.startswith(CONVERTER_AUTHOR):
            lines.append("  it was written by an older converter that declared nothing: convert it again")
        lines.append(_WHAT_TO_DO)
        raise IncompatibleCheckpointError("\n".join(lines))
    return not_loaded


def converted_prefixes(source: str, prefix: str, converted: Dict[str, torch.Tensor]) -> List[str]:
    """What a converter output declares it initialises.

    A backbone source (torchvision ResNet, Swin, EfficientNet-Lite) initialises everything under its
    ``prefix``. ``maskdino`` initialises ``{prefix}backbone.`` (when the checkpoint has a backbone) and,
    in the proposer, each module that has a MaskDINO counterpart: up2's objectness heads, DN label
    embedding, fusion layers and the like keep their initialisation.
    """
    if source != "maskdino":
        return [prefix]
    backbone, proposer = prefix + "backbone.", prefix + "proposer."
    modules = sorted({key.rsplit(".", 1)[0] + "." for key in converted if key.startswith(proposer)})
    return ([backbone] if any(key.startswith(backbone) for key in converted) else []) + modules


def save_partial_checkpoint(path: str, state_dict: Dict[str, torch.Tensor], initialised_prefixes: Sequence[str],
                            author: str):
    """Writes ``{"model": state_dict, "initialised_prefixes": [...], "__author__": author}`` to ``path``
    atomically (Detectron2's checkpoint format, loadable with ``MODEL.WEIGHTS``)."""
    buffer = io.BytesIO()
    torch.save({"model": state_dict, INITIALISED_PREFIXES_KEY: list(initialised_prefixes), "__author__": author,
                "matching_heuristics": False}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
