"""Converting pretrained weights into up2's parameter names: the sources, their default key prefixes,
and the comparison of converted weights with a model.

Each source has its module in :mod:`up2.checkpoint.sources`; ``python -m up2.checkpoint.convert`` is
the command line.
"""
from typing import Dict, List, Optional, Tuple

from up2.checkpoint.sources.efficientnet_lite import convert_efficientnet_lite_into
from up2.checkpoint.sources.maskdino import FEATURE_ORDERS, convert_maskdino
from up2.checkpoint.sources.renamed_tensors import RenamedTensors, StateDict
from up2.checkpoint.sources.swin import convert_swin
from up2.checkpoint.sources.torchvision_resnet import convert_torchvision_resnet
from up2.checkpoint.state_dict_files import extract_state_dict
from up2.checkpoint.strict_loading import CONVERTER_AUTHOR, converted_prefixes, save_partial_checkpoint

__all__ = ["SOURCES", "DEFAULT_PREFIXES", "FEATURE_ORDERS", "convert_state_dict", "compare_with_model",
           "save_converted"]

SOURCES = ("torchvision_resnet", "timm_swin", "official_swin", "maskdino", "efficientnet_lite")
# Key prefixes of the parts inside up2's main model, UniPerceiverV2 (its ImageEncoder holds the backbone
# and the proposer); for ProposalDetector pass --prefix backbone. (ResNet) / backbone.swin. / "" (MaskDINO).
DEFAULT_PREFIXES = {"torchvision_resnet": "image_encoder.backbone.", "timm_swin": "image_encoder.backbone.swin.",
                    "official_swin": "image_encoder.backbone.swin.", "maskdino": "image_encoder.",
                    "efficientnet_lite": "image_encoder.backbone.model."}


def convert_state_dict(source: str, state_dict, prefix: Optional[str] = None, *, feature_order: str = "auto",
                       num_heads: int = 8) -> Tuple[StateDict, List[str]]:
    """Renames (and where needed reorders) a pretrained state dict into up2's names.

    Args:
        source: one of :data:`SOURCES`.
        state_dict: name -> tensor, or a checkpoint dict holding it under ``"model"`` / ``"state_dict"``.
        prefix: prepended to every converted key; default :data:`DEFAULT_PREFIXES` ``[source]``.
        feature_order: MaskDINO only: ``"auto"`` (from the input projections), ``"low2high"`` or
            ``"high2low"`` (``MODEL.SEM_SEG_HEAD.FEATURE_ORDER`` of the checkpoint's config).
        num_heads: MaskDINO only: attention heads of its deformable attentions (``MaskDINO.NHEADS``),
            needed to reorder their per-level rows.

    Returns:
        ``(converted, unmatched)``: the converted name -> tensor dict, and the source keys with no
        counterpart in up2 (dropped buffers and heads included), in source order.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if feature_order not in FEATURE_ORDERS:
        raise ValueError(f"feature_order must be one of {FEATURE_ORDERS}, got {feature_order!r}")
    state_dict = extract_state_dict(state_dict, f"{source} state dict")
    prefix = DEFAULT_PREFIXES[source] if prefix is None else prefix
    out = RenamedTensors()
    if source == "torchvision_resnet":
        convert_torchvision_resnet(state_dict, prefix, out)
    elif source in ("timm_swin", "official_swin"):
        convert_swin(state_dict, prefix, out, source)
    elif source == "efficientnet_lite":  # tensors paired by position with timm's
        convert_efficientnet_lite_into(state_dict, prefix, out)
    else:
        convert_maskdino(state_dict, prefix, out, feature_order, num_heads)
    if not out.tensors:
        raise ValueError(f"{source}: none of the {len(state_dict)} keys (e.g. {list(state_dict)[:3]}) is a "
                         f"{source} parameter name")
    return out.tensors, out.unmatched


def compare_with_model(converted: StateDict, model, prefix: str = "") -> Dict[str, List[str]]:
    """What loading ``converted`` into ``model`` would leave out.

    Args:
        converted: the output of :func:`convert_state_dict`.
        model: an ``nn.Module`` or its state dict.
        prefix: only target keys starting with it are expected (e.g. ``"backbone."`` for a backbone).

    Returns:
        dict with ``missing`` (model keys under ``prefix`` not converted; BatchNorm's
        ``num_batches_tracked`` ignored), ``unexpected`` (converted keys the model lacks) and
        ``shape_mismatch`` (``"key: checkpoint (..) vs model (..)"``).
    """
    target = model.state_dict() if hasattr(model, "state_dict") else model
    return {
        "missing": [k for k in target if k.startswith(prefix) and k not in converted
                    and not k.endswith("num_batches_tracked")],
        "unexpected": [k for k in converted if k not in target],
        "shape_mismatch": [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                           for k, v in converted.items() if k in target and v.shape != target[k].shape],
    }


def save_converted(path: str, state_dict: StateDict, source: str, prefix: Optional[str] = None):
    """Writes ``{"model": state_dict, ...}`` to ``path`` atomically (Detectron2 checkpoint format), declaring
    what it initialises (:func:`~up2.checkpoint.strict_loading.converted_prefixes` of ``source`` and ``prefix``)."""
    prefix = DEFAULT_PREFIXES[source] if prefix is None else prefix
    save_partial_checkpoint(path, state_dict, converted_prefixes(source, prefix, state_dict),
                            author=f"{CONVERTER_AUTHOR} ({source})")
