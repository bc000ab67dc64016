"""What an exported up2 graph says about itself, stored as ONNX ``metadata_props`` (strings).

Written by :func:`up2.deploy.export.export_onnx`, read by :class:`up2.deploy.runtime.OnnxPredictor`; no
torch or onnx import, so a runtime needs only numpy, Pillow and onnxruntime.

Keys: ``up2_format`` (version of this layout), ``task``, ``class_names`` (JSON list), ``input_format``
("RGB" / "BGR": the channel order the graph's ``images`` input expects), ``image_height`` /
``image_width`` (the fixed size of the input), ``preprocessing`` (JSON list of the test-time resize steps,
see :data:`PREPROCESSING_OPS`), and for detection ``score_threshold`` and ``mask_threshold``.
"""
import json
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = ["ExportMetadata", "FORMAT_VERSION", "PREPROCESSING_OPS", "INPUT_NAMES", "OUTPUT_NAMES"]

FORMAT_VERSION = "1"
# {"op": "resize_shortest_edge", "short_edge_length": int, "max_size": int, "interp": PIL filter (int)} and
# {"op": "center_crop", "size": int}: Detectron2's ResizeShortestEdge and up2's CenterCrop
PREPROCESSING_OPS = ("resize_shortest_edge", "center_crop")
INPUT_NAMES = {"detection": ("images", "image_sizes"), "classification": ("images",)}
OUTPUT_NAMES = {"detection": ("boxes", "scores", "classes", "mask_logits"), "classification": ("class_scores",)}


@dataclass
class ExportMetadata:
    """
    Attributes:
        task: "detection" or "classification".
        class_names: the C names that class indices refer to.
        input_format: channel order of the ``images`` input ("RGB" or "BGR").
        image_size: (H, W) of the ``images`` input.
        preprocessing: test-time resize steps, dicts with an ``op`` in :data:`PREPROCESSING_OPS`.
        score_threshold, mask_threshold: detection only (``MODEL.UP2.TEST.SCORE_THRESH`` /
            ``MASK_THRESHOLD``), applied by the runtime.
    """

    task: str
    class_names: List[str]
    input_format: str
    image_size: Tuple[int, int]
    preprocessing: List[Dict] = field(default_factory=list)
    score_threshold: float = 0.0
    mask_threshold: float = 0.5

    def __post_init__(self):
        if self.task not in INPUT_NAMES:
            raise ValueError(f"ExportMetadata: task {self.task!r}; expected one of {list(INPUT_NAMES)}")
        if not self.class_names:
            raise ValueError("ExportMetadata: class_names is empty")
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"ExportMetadata: input_format {self.input_format!r}; expected 'RGB' or 'BGR'")
        for step in self.preprocessing:
            if step.get("op") not in PREPROCESSING_OPS:
                raise ValueError(f"ExportMetadata: preprocessing step {step}; expected an 'op' in "
                                 f"{list(PREPROCESSING_OPS)}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def to_props(self) -> Dict[str, str]:
        """The ``metadata_props`` strings."""
        props = {"up2_format": FORMAT_VERSION, "task": self.task, "class_names": json.dumps(self.class_names),
                 "input_format": self.input_format, "image_height": str(self.image_size[0]),
                 "image_width": str(self.image_size[1]), "preprocessing": json.dumps(self.preprocessing)}
        if self.task == "detection":
            props.update(score_threshold=repr(float(self.score_threshold)),
                         mask_threshold=repr(float(self.mask_threshold)))
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: Optional[str] = None) -> "ExportMetadata":
        """Reads :meth:`to_props` output; a graph not exported by up2 raises ValueError naming ``source``."""
        where = f"{source}: " if source else ""
        if props.get("up2_format") != FORMAT_VERSION:
            raise ValueError(f"{where}not an up2 export of format {FORMAT_VERSION} (metadata up2_format is "
                             f"{props.get('up2_format')!r}); export it with tools/deploy/export_onnx.py")
        missing = [key for key in ("task", "class_names", "input_format", "image_height", "image_width")
                   if key not in props]
        if missing:
            raise ValueError(f"{where}the model's metadata lacks {missing}")
        return cls(task=props["task"], class_names=json.loads(props["class_names"]),
                   input_format=props["input_format"],
                   image_size=(int(props["image_height"]), int(props["image_width"])),
                   preprocessing=json.loads(props.get("preprocessing", "[]")),
                   score_threshold=float(props.get("score_threshold", 0.0)),
                   mask_threshold=float(props.get("mask_threshold", 0.5)))
