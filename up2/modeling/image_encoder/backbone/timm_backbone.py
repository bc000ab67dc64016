"""timm models behind Detectron2's ``Backbone`` interface (``build_timm_backbone``).

Any timm model with ``forward_intermediates`` works (CNNs such as EfficientNet, ConvNeXt, ResNet, and
transformers such as Swin): its stages of stride 4, 8, 16 and 32 are returned as ``res2..res5`` with
Detectron2's :class:`ShapeSpec`. The timm model is kept whole under one attribute, so timm state dicts
load by name; the classifier and the blocks after the last requested stage are pruned, so every
parameter left takes part in the forward pass.

Input normalisation is the model's, not the backbone's: ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD``
(0-255 scale, RGB with ``INPUT.FORMAT: "RGB"``) must match what the weights were trained with, e.g.
``[127.5] * 3`` / ``[127.5] * 3`` for TF-ported EfficientNet-Lite weights (inputs in [-1, 1]) and
``[123.675, 116.28, 103.53]`` / ``[58.395, 57.12, 57.375]`` for ImageNet-statistics weights.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn

from up2.checkpoint.backbone_weights import load_backbone_weights

__all__ = ["TimmBackbone", "build_timm_backbone", "STAGE_NAMES"]


# Detectron2 names of the stages of stride 4, 8, 16, 32.
STAGE_NAMES = ("res2", "res3", "res4", "res5")


def _stage_name(reduction: int) -> Optional[str]:
    level = int(round(math.log2(reduction))) if reduction > 0 else -1
    return f"res{level}" if 2 ** level == reduction and f"res{level}" in STAGE_NAMES else None


class TimmBackbone(Backbone):
    """A timm model returning its stride-4..32 stages as ``res2..res5`` (NCHW).

    Args:
        model_name: timm model name, e.g. ``"tf_efficientnet_lite0"``.
        out_features: subset of ``("res2", "res3", "res4", "res5")``.
        drop_path_rate: stochastic depth rate.
        weights: optional weights file (see :func:`~up2.checkpoint.backbone_weights.load_backbone_weights`
            for paths, ``package://`` paths and formats), loaded by name.
        weights_format: ``"timm"`` (a timm state dict) or a converter source such as
            ``"efficientnet_lite"``.
        freeze_bn: replace every BatchNorm by a frozen one (statistics and affine parameters fixed, as
            Detectron2's ``FrozenBN``): the right choice for small per-task batches.
        freeze_at: as Detectron2's ``MODEL.BACKBONE.FREEZE_AT``: 0 trains everything, 1 freezes the stem,
            k >= 2 the stem and the stages up to ``res{k}``.
        prune_norm: drop the final norm layer that only the classifier reads.
        timm_kwargs: extra ``timm.create_model`` arguments.
    """

    # attribute that holds the timm model (the prefix of its parameter names)
    timm_attribute = "model"

    def __init__(self, model_name: str, out_features: Sequence[str], drop_path_rate: float = 0.0,
                 weights: Optional[str] = None, weights_format: str = "timm", freeze_bn: bool = False,
                 freeze_at: int = 0, prune_norm: bool = True, **timm_kwargs):
        super().__init__()
        import timm

        unknown = [name for name in out_features if name not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"{type(self).__name__} out_features {unknown} are not backbone stages; valid: "
                             f"{list(STAGE_NAMES)}")
        model = timm.create_model(model_name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                  **timm_kwargs)
        # index in feature_info of each stage (the last entry of a stride wins)
        stages = {}
        for index, info in enumerate(model.feature_info):
            name = _stage_name(info["reduction"])
            if name is not None:
                stages[name] = (index, info["num_chs"], info["reduction"])
        missing = [name for name in out_features if name not in stages]
        if missing:
            raise ValueError(f"timm model {model_name!r} has no stage of the stride of {missing}; its strides are "
                             f"{[info['reduction'] for info in model.feature_info]}")
        self._out_features = list(out_features)
        self._indices = [stages[name][0] for name in self._out_features]
        self._out_feature_channels = {name: stages[name][1] for name in self._out_features}
        self._out_feature_strides = {name: stages[name][2] for name in self._out_features}
        complete = set(model.state_dict())
        model.prune_intermediate_layers(sorted(set(self._indices)), prune_norm=prune_norm, prune_head=True)
        # Tensors that pretrained checkpoints of the whole model hold and this backbone dropped on purpose:
        # strict loading (up2.checkpoint.strict_loading) does not count them as unexpected.
        self.pruned_checkpoint_keys = sorted(f"{self.timm_attribute}.{k}" for k in complete - set(model.state_dict()))
        self._freeze(model, freeze_at, [info.get("module", "") for info in model.feature_info], stages)
        if freeze_bn:  # timm's own conversion keeps the activation of its BatchNormAct2d layers
            from timm.layers import freeze_batch_norm_2d

            model = freeze_batch_norm_2d(model)
        self.add_module(self.timm_attribute, model)
        self.model_name = model_name
        if weights:
            self.load_weights(weights, weights_format)

    @staticmethod
    def _freeze(model: nn.Module, freeze_at: int, modules: List[str], stages: Dict) -> None:
        """``freeze_at`` as Detectron2's ``MODEL.BACKBONE.FREEZE_AT``: 0 nothing, 1 the stem (everything
        before the first stage), k >= 2 everything up to the end of stage ``res{k}``."""
        if freeze_at <= 0:
            return
        names = [n for n, _ in model.named_parameters()]
        if freeze_at == 1:
            # the stem: everything before the first stage that has parameters (a feature_info entry can be
            # the stem's own output activation, e.g. timm ResNets' "act1", which has none)
            starts = [next((i for i, n in enumerate(names) if n.startswith(module + ".")), None) for module in modules]
            first_stage = next((i for i in starts if i is not None), len(names))
            frozen = set(names[:first_stage])
        else:
            name = f"res{freeze_at}"
            if name not in stages:
                raise ValueError(f"MODEL.BACKBONE.FREEZE_AT {freeze_at}: no stage {name} to freeze up to; "
                                 f"stages: {sorted(stages)}")
            last = modules[stages[name][0]]
            end = max(i for i, n in enumerate(names) if n.startswith(last + ".")) + 1
            frozen = set(names[:end])
        for n, parameter in model.named_parameters():
            if n in frozen:
                parameter.requires_grad_(False)

    @property
    def timm_model(self) -> nn.Module:
        return getattr(self, self.timm_attribute)

    def load_weights(self, path_or_state_dict, weights_format: str = "timm") -> List[str]:
        """Loads pretrained weights by name (keys of pruned layers and classifiers are ignored).

        Returns:
            the names of this backbone's tensors that the weights did not provide.
        """
        return load_backbone_weights(self.timm_model, path_or_state_dict, weights_format, self.model_name)

    # kept for the Swin wrapper's callers
    load_timm_state_dict = load_weights

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 3, H, W).

        Returns:
            dict of the requested stages, ``res{i}``: (B, C_i, H / s_i, W / s_i) with s_i = 4..32.
        """
        stages = self.timm_model.forward_intermediates(images, indices=self._indices, intermediates_only=True,
                                                       output_fmt="NCHW")
        return dict(zip(self._out_features, stages))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """Builds the timm model ``MODEL.UP2.BACKBONE.TIMM_NAME`` (``MODEL.BACKBONE.NAME: "build_timm_backbone"``),
    initialised from ``MODEL.UP2.BACKBONE.WEIGHTS`` (format ``WEIGHTS_FORMAT``) when set. ``MODEL.WEIGHTS``
    (a full checkpoint, or ``--resume``) is loaded after the model is built and so always wins."""
    if input_shape.channels != 3:
        raise ValueError(f"timm backbones take 3-channel images, got {input_shape.channels} channels")
    backbone_cfg = cfg.MODEL.UP2.BACKBONE
    return TimmBackbone(backbone_cfg.TIMM_NAME, list(backbone_cfg.OUT_FEATURES), backbone_cfg.DROP_PATH_RATE,
                        weights=backbone_cfg.WEIGHTS or None, weights_format=backbone_cfg.WEIGHTS_FORMAT,
                        freeze_bn=backbone_cfg.FREEZE_BN, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
