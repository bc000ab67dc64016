"""Rewrites of an exported ONNX graph for onnxruntime's CPU kernels, and its metadata.

``torch.eye(n, dtype=torch.bool)`` (the decoder's attention masks) exports as ``EyeLike`` on a boolean
input, for which onnxruntime has no kernel: :func:`replace_boolean_eye_like` computes it in float and
casts the result back.
"""
import json
from typing import Dict, Mapping

import onnx
from onnx import TensorProto, helper

__all__ = ["replace_boolean_eye_like", "set_metadata"]


def _value_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Element type of every typed value of the graph (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    for initializer in graph.initializer:
        types[initializer.name] = initializer.data_type
    for node in graph.node:  # constants, which shape inference may leave out of value_info
        if node.op_type in ("Constant", "ConstantOfShape"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    types.setdefault(node.output[0], attribute.t.data_type)
    return types


def replace_boolean_eye_like(model: onnx.ModelProto) -> int:
    """Replaces, in place, every ``EyeLike`` whose input is boolean by Cast(float) -> EyeLike -> Cast(bool).

    Returns:
        the number of nodes replaced.
    """
    types = _value_types(model)
    nodes, replaced = [], 0
    for node in model.graph.node:
        if node.op_type != "EyeLike" or types.get(node.input[0]) != TensorProto.BOOL:
            nodes.append(node)
            continue
        as_float, eye_float = f"{node.name}/float_input", f"{node.name}/float_output"
        nodes.append(helper.make_node("Cast", [node.input[0]], [as_float], name=f"{node.name}/CastToFloat",
                                      to=TensorProto.FLOAT))
        nodes.append(helper.make_node("EyeLike", [as_float], [eye_float], name=node.name,
                                      **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        nodes.append(helper.make_node("Cast", [eye_float], list(node.output), name=f"{node.name}/CastToBool",
                                      to=TensorProto.BOOL))
        replaced += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return replaced


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, object]):
    """Writes ``metadata`` into ``model.metadata_props``: strings as they are, other values as JSON."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)

