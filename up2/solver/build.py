"""Builds the UPv2 optimizer from the config.

``SOLVER.UP2.OPTIMIZER`` picks :class:`~up2.solver.mt_adamw.MTAdamW` (paper §4.4) or
:class:`TaskAdamW` (``torch.optim.AdamW`` with a no-op ``set_task``, for the Table 4 ablation), so
the trainer calls ``optimizer.set_task(s_k, ω_k)`` without branching. Both take the parameter
groups of :func:`~up2.solver.param_groups.build_param_groups`, and both honour Detectron2's
``SOLVER.CLIP_GRADIENTS`` through ``detectron2.solver.build.maybe_add_gradient_clipping``
(Detectron2 clips per parameter, before the update; for MTAdamW that is before the global
normalisation, so norm clipping only reshapes the direction). The learning-rate schedule is
Detectron2's ``build_lr_scheduler``, which scales each group's own ``lr``.
"""
import logging

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

from .mt_adamw import UNUSED_PARAM_MODES, MTAdamW, _validate_task
from .param_groups import build_param_groups

__all__ = ["TaskAdamW", "build_optimizer", "OPTIMIZERS"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("MTAdamW", "AdamW")


class TaskAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose :meth:`set_task` only validates its arguments (no effect)."""

    def set_task(self, sampling_ratio: float, loss_weight: float) -> None:
        """Accepted for interface compatibility with MTAdamW; the update ignores the task."""
        _validate_task(sampling_ratio, loss_weight)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Builds MTAdamW or AdamW over UPv2's parameter groups.

    Reads ``SOLVER.{BASE_LR, WEIGHT_DECAY, WEIGHT_DECAY_NORM, WEIGHT_DECAY_BIAS, CLIP_GRADIENTS}``
    and ``SOLVER.UP2.{OPTIMIZER, BETAS, EPS, NORMALIZE_GRADIENT, COMPENSATE_SAMPLING,
    UNUSED_PARAMS, ENCODER_LR_MULTIPLIER(S), ENCODER_PARAM_PREFIXES, MODULE_PARAM_PREFIXES,
    MODULE_LR_MULTIPLIERS, WEIGHT_DECAY_EMBED}``.
    """
    solver = cfg.SOLVER
    name = solver.UP2.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.UP2.OPTIMIZER: unknown optimizer {name!r}, expected one of "
                         f"{list(OPTIMIZERS)}")
    if solver.UP2.UNUSED_PARAMS not in UNUSED_PARAM_MODES:
        raise ValueError(f"SOLVER.UP2.UNUSED_PARAMS: unknown mode {solver.UP2.UNUSED_PARAMS!r}, "
                         f"expected one of {list(UNUSED_PARAM_MODES)}")
    betas = tuple(solver.UP2.BETAS)
    if len(betas) != 2:
        raise ValueError(f"SOLVER.UP2.BETAS must hold two values, got {list(solver.UP2.BETAS)}")
    weight_decay_bias = solver.WEIGHT_DECAY_BIAS
    if weight_decay_bias is None:
        weight_decay_bias = solver.WEIGHT_DECAY
    groups = build_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        encoder_prefixes=tuple(solver.UP2.ENCODER_PARAM_PREFIXES),
        encoder_lr_multiplier=list(solver.UP2.ENCODER_LR_MULTIPLIERS) or solver.UP2.ENCODER_LR_MULTIPLIER,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_bias=weight_decay_bias,
        weight_decay_embed=solver.UP2.WEIGHT_DECAY_EMBED,
        module_prefixes=tuple(solver.UP2.MODULE_PARAM_PREFIXES),
        module_lr_multipliers=list(solver.UP2.MODULE_LR_MULTIPLIERS),
    )
    common = dict(lr=solver.BASE_LR, betas=betas, eps=solver.UP2.EPS,
                  weight_decay=solver.WEIGHT_DECAY)
    if name == "MTAdamW":
        optimizer_cls = maybe_add_gradient_clipping(cfg, MTAdamW)
        optimizer = optimizer_cls(
            groups, **common,
            normalize_gradient=solver.UP2.NORMALIZE_GRADIENT,
            compensate_sampling=solver.UP2.COMPENSATE_SAMPLING,
            unused_params=solver.UP2.UNUSED_PARAMS,
        )
    else:
        optimizer = maybe_add_gradient_clipping(cfg, TaskAdamW)(groups, **common)
    logger.info("optimizer %s: %d groups, %d tensors%s", type(optimizer).__name__, len(groups),
                sum(len(g["params"]) for g in groups),
                ", gradient clipping " + solver.CLIP_GRADIENTS.CLIP_TYPE
                if solver.CLIP_GRADIENTS.ENABLED else "")
    return optimizer
