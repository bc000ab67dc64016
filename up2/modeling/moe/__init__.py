"""Conditional mixture of experts with attribute-level routing (UPv2 §4.3), used in every FFN of the
unified decoder; :func:`build_ffn` returns it, or a dense FFN when ``MODEL.UP2.MOE.ENABLED`` is off."""
from up2.modeling.moe.experts import ExpertFFNs, MixedExpertFFN, grouped_ffn, mixed_expert_ffn
from up2.modeling.moe.gate import (
    ATTRIBUTE_NAMES, DEFAULT_NUM_ATTRIBUTE_VALUES, MODALITY_IMAGE, MODALITY_TEXT, SIDE_INPUT, SIDE_TARGET,
    AttributeGate, make_attributes, num_attribute_values,
)
from up2.modeling.moe.layer import FFN, ConditionalMoEFFN, RoutingPlan, build_ffn, build_routing_plan

__all__ = [
    "ATTRIBUTE_NAMES", "DEFAULT_NUM_ATTRIBUTE_VALUES", "MODALITY_IMAGE", "MODALITY_TEXT", "SIDE_INPUT",
    "SIDE_TARGET", "AttributeGate", "ConditionalMoEFFN", "ExpertFFNs", "FFN", "MixedExpertFFN", "RoutingPlan",
    "build_ffn", "build_routing_plan", "grouped_ffn", "make_attributes", "mixed_expert_ffn", "num_attribute_values",
]
