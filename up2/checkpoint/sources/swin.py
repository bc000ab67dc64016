"""timm or Microsoft Swin-Transformer weights -> the current timm names kept by
:class:`~up2.modeling.image_encoder.backbone.SwinBackbone`.

The official layout (also older timm) ends each stage with its ``downsample``; current timm starts the
next stage with it: the layout is detected from the keys and ``layers.{i}.downsample`` moved to
``layers.{i+1}``. ``layers_{i}`` is read as ``layers.{i}``. Relative-position indices, attention masks and
the classifier head are reported unmatched. Window sizes are not resampled.
"""
import logging
import re

from up2.checkpoint.sources.renamed_tensors import RenamedTensors, StateDict

__all__ = ["convert_swin"]

logger = logging.getLogger(__name__)

_SWIN_BUFFERS = re.compile(r"(.*\.)?(relative_position_index|attn_mask)")
_SWIN_PARAMS = re.compile(
    r"patch_embed\..+|absolute_pos_embed|layers\.\d+\.(blocks|downsample)\..+|norm\.(weight|bias)")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")


def convert_swin(state_dict: StateDict, prefix: str, out: RenamedTensors, source: str, key_prefix: str = ""):
    """Puts every Swin parameter of ``state_dict`` into ``out`` under ``prefix`` + its timm name.

    Args:
        state_dict: official, old-timm or timm Swin names -> tensors.
        prefix: prepended to the timm names.
        out: receives the tensors and the unmatched keys.
        source: ``"timm_swin"``, ``"official_swin"`` or ``"maskdino"`` (for messages; ``official_swin``
            warns when the checkpoint has timm's layout).
        key_prefix: prepended to the reported unmatched keys (MaskDINO's ``backbone.``).
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
