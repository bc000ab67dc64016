"""Attribute-level gate of the conditional MoE (Uni-Perceiver-MoE; UPv2 paper §4.3).

The gate never sees token content. Each *segment* of a sequence (e.g. the image tokens of a
captioning input, the words of a class name on the target side) carries a small vector of discrete
attributes, and every token of the segment is routed by that vector:

====  ===========  ============================================================
 idx  name         values
====  ===========  ============================================================
  0   task         index of the task type among the registered ones (``up2.task_specs``)
  1   modality     ``MODALITY_IMAGE`` (0) or ``MODALITY_TEXT`` (1)
  2   side         ``SIDE_INPUT`` (0) or ``SIDE_TARGET`` (1)
  3   causal       0 (bidirectional attention) or 1 (causal attention)
====  ===========  ============================================================

Gate: concatenated one-hot codes -> Linear(sum(values) -> d) -> LayerNorm -> Linear(d -> E) -> top-k
logits -> softmax over the k kept logits (renormalised gates).
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from up2.task_specs import BUILTIN_TASK_TYPES, TASK_SPEC_REGISTRY

__all__ = [
    "AttributeGate", "ATTRIBUTE_NAMES", "DEFAULT_NUM_ATTRIBUTE_VALUES",
    "MODALITY_IMAGE", "MODALITY_TEXT", "SIDE_INPUT", "SIDE_TARGET", "make_attributes", "num_attribute_values",
]

ATTRIBUTE_NAMES = ("task", "modality", "side", "causal")
MODALITY_IMAGE, MODALITY_TEXT = 0, 1
SIDE_INPUT, SIDE_TARGET = 0, 1
# Number of values of each attribute: the built-in task types, then three binary attributes.
DEFAULT_NUM_ATTRIBUTE_VALUES = (len(BUILTIN_TASK_TYPES), 2, 2, 2)


def num_attribute_values() -> Tuple[int, int, int, int]:
    """Number of values of each attribute for the task types registered now."""
    return (len(TASK_SPEC_REGISTRY.task_types()), 2, 2, 2)


def make_attributes(task: str, modality: int, side: int, causal: bool) -> Tuple[int, int, int, int]:
    """Attribute tuple of one segment, e.g. ``make_attributes("captioning", MODALITY_TEXT, SIDE_INPUT, True)``.

    Raises:
        ValueError: for a task type that is not registered or a modality / side outside {0, 1}.
    """
    task_types = TASK_SPEC_REGISTRY.task_types()
    if task not in task_types:
        raise ValueError(f"make_attributes: unknown task type {task!r}; valid types are {list(task_types)}")
    if modality not in (MODALITY_IMAGE, MODALITY_TEXT) or side not in (SIDE_INPUT, SIDE_TARGET):
        raise ValueError(f"make_attributes: modality and side must be 0 or 1, got {modality!r}, {side!r}")
    return (task_types.index(task), int(modality), int(side), int(bool(causal)))


class AttributeGate(nn.Module):
    """Top-k routing from discrete attributes.

    Args:
        d_model: width d of the hidden layer of the gate.
        num_experts: E.
        top_k: k experts kept per attribute vector.
        num_attribute_values: number of values of each of the A attributes.
    """

    def __init__(self, d_model: int, num_experts: int = 8, top_k: int = 2,
                 num_attribute_values: Sequence[int] = DEFAULT_NUM_ATTRIBUTE_VALUES):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"AttributeGate: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not num_attribute_values or any(int(n) < 1 for n in num_attribute_values):
            raise ValueError(f"AttributeGate: num_attribute_values must be positive, got {num_attribute_values}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_attribute_values = tuple(int(n) for n in num_attribute_values)
        self.register_buffer("offsets", torch.tensor([0] + list(self.num_attribute_values[:-1])).cumsum(0),
                             persistent=False)
        self.attr_proj = nn.Linear(sum(self.num_attribute_values), d_model)
        self.norm = nn.LayerNorm(d_model)
        self.to_logits = nn.Linear(d_model, num_experts)

    def check_attributes(self, attributes: torch.Tensor):
        """Raises ValueError unless ``attributes`` is (..., A) integer with values in range."""
        if attributes.dtype not in (torch.int64, torch.int32) or attributes.shape[-1] != len(self.num_attribute_values):
            raise ValueError(f"AttributeGate: attributes must be an integer tensor (..., "
                             f"{len(self.num_attribute_values)}) ({ATTRIBUTE_NAMES}), got "
                             f"{attributes.dtype} {tuple(attributes.shape)}")
        limits = torch.tensor(self.num_attribute_values, device=attributes.device)
        bad = ((attributes < 0) | (attributes >= limits)).any(dim=-1)
        if bool(bad.any()):
            raise ValueError(f"AttributeGate: attribute values must lie in [0, n) with n = "
                             f"{self.num_attribute_values} for {ATTRIBUTE_NAMES}, got {attributes[bad][0].tolist()}")

    def logits(self, attributes: torch.Tensor) -> torch.Tensor:
        """
        Args:
            attributes: (..., A) long.

        Returns:
            (..., E) routing logits.
        """
        codes = F.one_hot(attributes.long() + self.offsets, sum(self.num_attribute_values)).sum(dim=-2)
        return self.to_logits(self.norm(self.attr_proj(codes.to(self.attr_proj.weight.dtype))))

    def forward(self, attributes: torch.Tensor):
        """
        Args:
            attributes: (..., A) long.

        Returns:
            tuple: ``indices`` (..., k) long, the selected experts in decreasing logit order;
            ``gates`` (..., k), softmax of the k selected logits (sum to 1);
            ``logits`` (..., E), for the load-balancing loss.
        """
        self.check_attributes(attributes)
        logits = self.logits(attributes)
        top_logits, indices = logits.topk(self.top_k, dim=-1)
        return indices, top_logits.softmax(dim=-1), logits
