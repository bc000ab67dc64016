"""Released MaskDINO checkpoints -> ``{prefix}backbone.*`` and ``{prefix}proposer.*`` of up2.

See :func:`_maskdino_rules` for the name map. Beyond renaming, the conversion

- reorders the encoder levels to up2's increasing stride (MaskDINO's ``FEATURE_ORDER: high2low`` stores
  them by decreasing stride; detected from the input-projection channels) in ``level_embed`` and in the
  per-level rows of every deformable attention (needs the number of heads, default 8);
- swaps the y and x blocks of ``ref_point_head``'s input (MaskDINO embeds boxes as (y, x, w, h), up2 as
  (x, y, w, h));
- swaps the decoder layer norms (MaskDINO: ``norm2`` after self-attention, ``norm1`` after
  cross-attention; up2: ``norm1``, ``norm2``);
- adds zero biases to the bias-free GroupNorm convolutions (``adapter_1``, ``layer_1``).

MaskDINO's multi-class heads (``class_embed``, ``label_enc``) have no counterpart in up2's binary
proposer: they are reported unmatched, and up2's objectness heads stay at their initialisation. A Swin
backbone goes through :func:`~up2.checkpoint.sources.swin.convert_swin`; a Detectron2 ResNet keeps its names.
"""
import logging
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from up2.checkpoint.sources.renamed_tensors import RenamedTensors, StateDict
from up2.checkpoint.sources.swin import convert_swin

__all__ = ["convert_maskdino", "FEATURE_ORDERS"]

logger = logging.getLogger(__name__)

FEATURE_ORDERS = ("auto", "low2high", "high2low")


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


def _convert_backbone(state_dict: StateDict, prefix: str, out: RenamedTensors):
    """The ``backbone.*`` tensors: Swin through timm's names, a Detectron2 ResNet as it is."""
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if any(k.startswith("patch_embed.") for k in backbone):
        convert_swin(backbone, prefix + "backbone.swin.", out, "maskdino", key_prefix="backbone.")
        return
    for key, tensor in backbone.items():  # Detectron2 ResNet: names already match
        if re.match(r"(stem|res\d+)\.", key):
            out.put(f"{prefix}backbone.{key}", tensor, "backbone." + key)
        else:
            out.unmatched.append("backbone." + key)


def convert_maskdino(state_dict: StateDict, prefix: str, out: RenamedTensors, feature_order: str, num_heads: int):
    """Puts the backbone and proposer tensors of a MaskDINO ``state_dict`` into ``out`` under ``prefix``.

    Args:
        state_dict: MaskDINO names -> tensors.
        prefix: prepended to ``backbone.*`` / ``proposer.*`` (``"image_encoder."`` for UniPerceiverV2).
        out: receives the tensors and the unmatched keys.
        feature_order: one of FEATURE_ORDERS (``MODEL.SEM_SEG_HEAD.FEATURE_ORDER`` of the checkpoint).
        num_heads: heads of MaskDINO's deformable attentions (``MaskDINO.NHEADS``).
    """
    targets, perm = _maskdino_levels(state_dict, feature_order)
    rules = [(re.compile("sem_seg_head\\." + src), dst, fn) for src, dst, fn in _maskdino_rules()]
    transforms: Dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {
        "level_rows": lambda t, k: t[perm].contiguous(),
        "levels": lambda t, k: _permute_levels(t, perm, num_heads, k),
        "sine_xy": _swap_sine_xy,
    }
    _convert_backbone(state_dict, prefix, out)
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
