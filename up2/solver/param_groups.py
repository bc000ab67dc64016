"""Parameter groups for UPv2: encoder learning-rate multiplier and per-kind weight decay.

Every trainable parameter is classified once, by its module and name:

- ``norm``: parameters of normalisation layers (BatchNorm/InstanceNorm/SyncBN, GroupNorm, LayerNorm,
  LocalResponseNorm) → ``weight_decay_norm``;
- ``temperature``: names ending with ``logit_scale`` or ``temperature`` → no weight decay;
- ``embed``: ``nn.Embedding`` weights and names containing ``pos_embed``, ``position_embedding``,
  ``query_embed`` or ``level_embed`` → ``weight_decay_embed``;
- ``bias``: other parameters called ``bias`` → ``weight_decay_bias``;
- ``weight``: everything else → ``weight_decay``.

Parameters whose full name starts with one of ``encoder_prefixes`` (the pretrained image backbone
and text encoder) get ``base_lr × encoder_lr_multiplier``; ``encoder_lr_multiplier`` is one factor for
every prefix or a list with one factor per prefix (the first matching prefix decides). Other modules
may get their own factor by prefix too (``module_prefixes`` / ``module_lr_multipliers``, e.g. a
from-scratch part that learns faster than the rest); an encoder prefix wins over a module prefix.
Groups with the same (lr, weight_decay) are merged; each group's ``"name"`` lists the kinds it holds
(``"encoder.bias,encoder.norm"``, ``"module.weight"``, ``"other.weight"``).
"""
import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Union

from torch import nn

__all__ = ["build_param_groups", "param_kind"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_EMBED_KEYWORDS = ("pos_embed", "position_embedding", "query_embed", "level_embed")
_TEMPERATURE_SUFFIXES = ("logit_scale", "temperature")


def param_kind(module: nn.Module, local_name: str, full_name: str) -> str:
    """Kind of parameter ``full_name`` (``local_name`` inside ``module``):
    one of "norm", "temperature", "embed", "bias", "weight"."""
    if isinstance(module, _NORM_TYPES):
        return "norm"
    if full_name.endswith(_TEMPERATURE_SUFFIXES):
        return "temperature"
    if (isinstance(module, nn.Embedding) and local_name == "weight") or any(
            k in full_name for k in _EMBED_KEYWORDS):
        return "embed"
    if local_name == "bias":
        return "bias"
    return "weight"


def _prefix_multipliers(prefixes: Sequence[str], multiplier, keys: str = "ENCODER") -> List[float]:
    """One lr factor per prefix: ``multiplier`` repeated, or the list itself (checked against the prefixes)."""
    if isinstance(multiplier, (int, float)):
        return [float(multiplier)] * len(prefixes)
    multipliers = [float(m) for m in multiplier]
    if len(multipliers) != len(prefixes):
        hint = (" or leave it empty to use SOLVER.UP2.ENCODER_LR_MULTIPLIER for all" if keys == "ENCODER" else "")
        raise ValueError(f"SOLVER.UP2.{keys}_LR_MULTIPLIERS has {len(multipliers)} values {multipliers} for "
                         f"{len(prefixes)} SOLVER.UP2.{keys}_PARAM_PREFIXES {list(prefixes)}; give one per prefix"
                         + hint)
    return multipliers


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    encoder_prefixes: Sequence[str] = ("backbone.", "text_encoder.encoder."),
    encoder_lr_multiplier: Union[float, Sequence[float]] = 0.1,
    weight_decay_norm: Optional[float] = 0.0,
    weight_decay_bias: Optional[float] = 0.0,
    weight_decay_embed: Optional[float] = 0.0,
    module_prefixes: Sequence[str] = (),
    module_lr_multipliers: Sequence[float] = (),
) -> List[Dict[str, Any]]:
    """Splits the trainable parameters of ``model`` into optimizer parameter groups.

    Args:
        model: the model; a parameter shared by several modules is placed once (first name).
        base_lr: learning rate of non-encoder parameters.
        weight_decay: weight decay of ordinary weights.
        encoder_prefixes: full-name prefixes of the pretrained encoders.
        encoder_lr_multiplier: lr factor of encoder parameters, or one factor per prefix.
        weight_decay_norm / weight_decay_bias / weight_decay_embed: weight decay of norm-layer
            parameters, biases and embeddings; None means ``weight_decay``. Temperatures get 0.
        module_prefixes / module_lr_multipliers: full-name prefixes of other modules and their lr factors
            (one per prefix).

    Returns:
        list of dicts with keys ``params``, ``lr``, ``weight_decay`` and ``name``, in order of
        first appearance.
    """
    if isinstance(encoder_prefixes, str):
        raise ValueError(f"encoder_prefixes must be a list of prefixes, got the string "
                         f"{encoder_prefixes!r}")
    kind_wd = {
        "norm": weight_decay if weight_decay_norm is None else weight_decay_norm,
        "temperature": 0.0,
        "embed": weight_decay if weight_decay_embed is None else weight_decay_embed,
        "bias": weight_decay if weight_decay_bias is None else weight_decay_bias,
        "weight": weight_decay,
    }
    prefixes = tuple(encoder_prefixes)
    multipliers = _prefix_multipliers(prefixes, encoder_lr_multiplier)
    labels = ["encoder"] * len(prefixes)
    if module_prefixes:
        prefixes += tuple(module_prefixes)
        multipliers += _prefix_multipliers(tuple(module_prefixes), list(module_lr_multipliers), keys="MODULE")
        labels += ["module"] * len(module_prefixes)
    groups: "OrderedDict[tuple, Dict[str, Any]]" = OrderedDict()
    counts: Dict[str, int] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{local_name}" if module_name else local_name
            kind = param_kind(module, local_name, full_name)
            owner, multiplier = next(((o, m) for p, m, o in zip(prefixes, multipliers, labels)
                                      if full_name.startswith(p)), ("other", None))
            label = f"{owner}.{kind}"
            lr = base_lr if multiplier is None else base_lr * multiplier
            wd = kind_wd[kind]
            group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd,
                                                 "_labels": []})
            group["params"].append(param)
            if label not in group["_labels"]:
                group["_labels"].append(label)
            counts[label] = counts.get(label, 0) + 1
    result = []
    for group in groups.values():
        group["name"] = ",".join(sorted(group.pop("_labels")))
        result.append(group)
        logger.info("param group %-40s lr=%.3g wd=%.3g tensors=%d elements=%d", group["name"],
                    group["lr"], group["weight_decay"], len(group["params"]),
                    sum(p.numel() for p in group["params"]))
    logger.debug("parameter kinds: %s", counts)
    return result

