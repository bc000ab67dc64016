"""The similarity head of the unified formulation (paper eq. 6):
P(x, y) ∝ exp(cos(g(f(x)), g(f(y))) / τ), with a learnable temperature per task group."""
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

__all__ = ["SimilarityHead"]


class SimilarityHead(nn.Module):
    """Output LayerNorm + linear projection, L2 normalisation, and logits
    ``exp(log_scale[group]) * <x, y>`` with ``exp(log_scale)`` capped at ``max_logit_scale``.

    The learnable ``logit_scale`` (1 / τ, log-parameterised, one entry per task group, initialised at
    ln(1 / temperature_init)) gets no weight decay (``up2.solver.build_param_groups``).

    Args:
        dim: decoder width.
        groups: names of the task groups that own a temperature (e.g. the task types).
        temperature_init: τ at initialisation (0.07, as CLIP and Uni-Perceiver).
        max_logit_scale: cap of 1 / τ (100).
    """

    @configurable
    def __init__(self, *, dim: int, groups: Sequence[str], temperature_init: float, max_logit_scale: float):
        super().__init__()
        if not groups or len(set(groups)) != len(groups):
            raise ValueError(f"SimilarityHead needs distinct group names, got {list(groups)}")
        if temperature_init <= 0 or 1.0 / temperature_init > max_logit_scale:
            raise ValueError(f"temperature_init must be in [1 / max_logit_scale, inf), got {temperature_init} "
                             f"with max_logit_scale {max_logit_scale}")
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, dim)
        self.group_index = {name: i for i, name in enumerate(groups)}
        self.logit_scale = nn.Parameter(torch.full((len(groups),), math.log(1.0 / temperature_init)))
        self.max_log_scale = math.log(max_logit_scale)

    @classmethod
    def from_config(cls, cfg, groups):
        head = cfg.MODEL.UP2.HEAD
        return {"dim": cfg.MODEL.UP2.DECODER.HIDDEN_DIM, "groups": groups,
                "temperature_init": head.TEMPERATURE_INIT, "max_logit_scale": head.MAX_LOGIT_SCALE}

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """(..., dim) decoder outputs -> (..., dim) unit vectors."""
        return F.normalize(self.projection(self.norm(features)), dim=-1)

    def scale(self, group: str) -> torch.Tensor:
        """1 / τ of ``group`` (a scalar tensor), capped at ``max_logit_scale``."""
        if group not in self.group_index:
            raise KeyError(f"No temperature for task group {group!r}; known: {sorted(self.group_index)}")
        return self.logit_scale[self.group_index[group]].clamp(max=self.max_log_scale).exp()

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, group: str) -> torch.Tensor:
        """Logits of every input against every target.

        Args:
            inputs: (..., N, dim) decoder outputs of the inputs (e.g. <SPE> tokens, regional tokens).
            targets: (K, dim) decoder outputs of the targets (class names, captions, vocabulary).
            group: task group whose temperature applies.

        Returns:
            (..., N, K) logits ``<embed(x), embed(y)> / τ``.
        """
        return self.scale(group) * self.embed(inputs) @ self.embed(targets).transpose(-1, -2)
