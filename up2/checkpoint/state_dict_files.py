"""Reading the state dict of a checkpoint file, with the file named in every error."""
import os
import re

import torch

from up2.checkpoint.sources.renamed_tensors import StateDict

__all__ = ["extract_state_dict", "load_checkpoint_file"]


def extract_state_dict(obj, where: str = "state dict") -> StateDict:
    """Returns the name -> tensor dict held by a loaded checkpoint.

    Accepts a state dict or a dict with ``"model"`` / ``"state_dict"`` holding one (numpy arrays become
    tensors, a ``module.`` prefix common to all keys is removed).

    Raises:
        ValueError naming ``where`` when ``obj`` is not such a dict.
    """
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{where}: expected a state dict (parameter name -> tensor) or a dict with 'model' or "
                         f"'state_dict' holding one; got {type(obj).__name__}" + (" (empty)" if obj == {} else ""))
    out = {}
    for key, value in obj.items():
        if type(value).__module__ == "numpy":
            value = torch.as_tensor(value)
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: expected a state dict of tensors; entry {key!r} is a "
                             f"{type(value).__name__} (keys: {list(obj)[:5]}...)")
        out[key] = value
    if all(key.startswith("module.") for key in out):
        out = {key[len("module."):]: value for key, value in out.items()}
    return out


def load_checkpoint_file(path: str, trust_pickle: bool = False) -> StateDict:
    """Reads the state dict of a ``torch.save`` file (``.pth``, ``.pt``, ``.bin``) or a ``.safetensors``.

    Args:
        path: the file.
        trust_pickle: unpickle arbitrary objects (``torch.load(weights_only=False)``): only for trusted
            files holding more than tensors (e.g. a config object).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return extract_state_dict(load_file(path), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # noqa: BLE001 (torch.load raises many types for a non-checkpoint)
        message = str(err)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe:
            raise ValueError(f"{path}: holds a {unsafe.group(1)} object besides tensors; if you trust the file, "
                             "rerun with --trust-pickle") from err
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", message)
        raise ValueError(f"{path} is not a PyTorch checkpoint: expected a file written by torch.save holding a "
                         f"state dict ({type(err).__name__}: {detail.group(1) if detail else message[:200]})") from err
    return extract_state_dict(obj, path)
