"""ONNX export of detection / classification with a fixed vocabulary.

:func:`export_onnx` traces a :mod:`up2.deploy.graphs` module with ``torch.onnx.export(dynamo=False)``
(the TorchScript exporter), rewrites what onnxruntime cannot run (:mod:`up2.deploy.onnx_passes`), runs
``onnx.checker`` and writes the metadata of :mod:`up2.deploy.metadata` (task, class names, input size,
channel order, test-time resize, thresholds).

Why the TorchScript exporter: the model takes host-side decisions for a given input size, e.g. the
deformable attention checks its level sizes (``spatial_shapes.tolist()``) and the MoE groups tokens by
routing into Python counts. Tracing records them as constants of the traced size, which is what a
fixed-size graph needs; ``torch.export`` (the default ``dynamo=True``) rejects them as data-dependent
("Could not guard on data-dependent expression"). No ``onnxscript`` is needed.

Sizes: the image size (H, W) is fixed at export, the batch is dynamic. The deformable attention is
exported as its PyTorch form (``grid_sample`` per level, ONNX GridSample), never the CUDA or Triton kernel:
every ``MSDeformAttn`` is switched to ``impl="pytorch"`` while tracing.
"""
import logging
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T

from up2.deploy.graphs import build_export_graph
from up2.deploy.metadata import INPUT_NAMES, OUTPUT_NAMES, ExportMetadata
from up2.layers import MSDeformAttn

__all__ = ["export_onnx", "runtime_preprocessing", "default_image_size", "compare_with_onnxruntime", "OPSET"]

logger = logging.getLogger(__name__)

OPSET = 17  # GridSample (16) and LayerNormalization (17)


def runtime_preprocessing(cfg, task: str) -> List[Dict]:
    """The test-time augmentations of ``task``'s dataset mapper as :data:`~up2.deploy.metadata.PREPROCESSING_OPS`
    steps (what the runtime repeats without Detectron2).

    Raises:
        ValueError: an augmentation with no such description (random or multi-scale test augmentations).
    """
    from up2.data.mappers import CenterCrop, build_mapper

    steps = []
    for augmentation in build_mapper(cfg, task, is_train=False).augmentations.augs:
        if isinstance(augmentation, T.ResizeShortestEdge) and len(set(augmentation.short_edge_length)) == 1:
            steps.append({"op": "resize_shortest_edge", "short_edge_length": int(augmentation.short_edge_length[0]),
                          "max_size": int(augmentation.max_size), "interp": int(augmentation.interp)})
        elif isinstance(augmentation, CenterCrop):
            steps.append({"op": "center_crop", "size": int(augmentation.size)})
        else:
            raise ValueError(f"export: the {task} test-time augmentation {augmentation} has no ONNX-runtime "
                             "equivalent; expected one ResizeShortestEdge size, optionally followed by CenterCrop")
    return steps


def default_image_size(steps: Sequence[Dict]) -> Tuple[int, int]:
    """The graph's input size for these preprocessing steps: the crop of a centre crop, else the square
    of the resize's shorter side (what square images become; see ``--image-size``)."""
    for step in reversed(steps):
        if step["op"] == "center_crop":
            return step["size"], step["size"]
        if step["op"] == "resize_shortest_edge":
            return step["short_edge_length"], step["short_edge_length"]
    raise ValueError("export: no resize in the preprocessing steps; give the image size explicitly")


def _example_inputs(task: str, batch: int, image_size: Tuple[int, int], device) -> Tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *image_size), dtype=torch.uint8, generator=generator).to(device)
    if task == "classification":
        return (images,)
    return images, torch.tensor([list(image_size)] * batch, dtype=torch.long, device=device)


def export_onnx(model, task: str, class_names: Sequence[str], output: str, *, image_size: Tuple[int, int],
                input_format: str = "RGB", preprocessing: Sequence[Dict] = (), opset: int = OPSET) -> ExportMetadata:
    """Writes the ONNX graph of ``task`` with the vocabulary ``class_names`` to ``output``.

    Args:
        model: a :class:`~up2.modeling.meta_arch.UniPerceiverV2` in eval mode (its vocabulary of ``task``
            becomes ``class_names``).
        task: "detection" or "classification".
        class_names: non-empty list of class names (stored in the graph's metadata).
        output: path of the ``.onnx`` file.
        image_size: (H, W) of the graph's ``images`` input (fixed).
        input_format: channel order of the images (``INPUT.FORMAT``).
        preprocessing: the test-time resize steps (:func:`runtime_preprocessing`), stored for the runtime.
        opset: ONNX opset (>= 17).

    Returns:
        the :class:`ExportMetadata` written.

    Raises:
        ValueError: unsupported task, empty vocabulary or class name, model in training mode.
    """
    import onnx

    from up2.deploy.onnx_passes import replace_boolean_eye_like, set_metadata

    graph = build_export_graph(model, task, class_names)
    head = model.tasks[task]
    metadata = ExportMetadata(task=task, class_names=list(class_names), input_format=input_format,
                              image_size=image_size, preprocessing=list(preprocessing),
                              score_threshold=getattr(head, "score_thresh", 0.0),
                              mask_threshold=getattr(head, "mask_threshold", 0.5))
    inputs = _example_inputs(task, 1, metadata.image_size, model.device)
    names = list(INPUT_NAMES[task]) + list(OUTPUT_NAMES[task])
    attentions = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    impls = [m.impl for m in attentions]
    try:
        for module in attentions:
            module.impl = "pytorch"
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns at every host-side value it freezes; the graph is checked against PyTorch instead
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, inputs, output, input_names=list(INPUT_NAMES[task]),
                              output_names=list(OUTPUT_NAMES[task]), opset_version=opset, dynamo=False,
                              dynamic_axes={name: {0: "batch"} for name in names})
    finally:
        for module, impl in zip(attentions, impls):
            module.impl = impl
    proto = onnx.load(output)
    replaced = replace_boolean_eye_like(proto)
    set_metadata(proto, metadata.to_props())
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, output)
    logger.info("export: wrote %s (%s, %d classes, input %dx%d, dynamic batch; %d boolean EyeLike rewritten)",
                output, task, len(class_names), *metadata.image_size, replaced)
    return metadata


def compare_with_onnxruntime(model, path: str, batch: int = 2, seed: int = 0,
                             num_threads: Optional[int] = None) -> Dict[str, float]:
    """Largest absolute difference of every output between onnxruntime and the PyTorch graph module on
    ``batch`` random images (another batch size than the traced one: checks the dynamic batch).

    ``model`` must carry the export's vocabulary (it does after :func:`export_onnx`). Class indices
    count the positions whose classes differ (where scores tie, orders may differ)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    metadata = ExportMetadata.from_props(session.get_modelmeta().custom_metadata_map, path)
    graph = build_export_graph(model, metadata.task, metadata.class_names)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, *metadata.image_size), dtype=torch.uint8, generator=generator)
    inputs = (images,) if metadata.task == "classification" else (
        images, torch.tensor([list(metadata.image_size)] * batch, dtype=torch.long))
    with torch.no_grad():
        expected = graph(*[t.to(model.device) for t in inputs])
    expected = expected if isinstance(expected, tuple) else (expected,)
    feeds = {name: tensor.numpy() for name, tensor in zip(INPUT_NAMES[metadata.task], inputs)}
    got = session.run(list(OUTPUT_NAMES[metadata.task]), feeds)
    differences = {}
    for name, reference, value in zip(OUTPUT_NAMES[metadata.task], expected, got):
        reference = reference.cpu().numpy()
        if name == "classes":
            differences[name] = float((reference != value).sum())
        else:
            differences[name] = float(np.abs(reference - value).max()) if value.size else 0.0
    return differences
