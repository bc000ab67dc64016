"""The output of a weight converter: renamed tensors and the source keys that found no target."""
from typing import Dict, List

import torch

__all__ = ["StateDict", "RenamedTensors"]

StateDict = Dict[str, torch.Tensor]


class RenamedTensors:
    """Converted tensors by up2 name, the source key each came from, and the unmatched source keys.

    Attributes:
        tensors: up2 name -> tensor.
        origin: up2 name -> the source key it was converted from.
        unmatched: source keys with no counterpart in up2, in the order they were seen.
    """

    def __init__(self):
        self.tensors: StateDict = {}
        self.origin: Dict[str, str] = {}
        self.unmatched: List[str] = []

    def put(self, target: str, tensor: torch.Tensor, source_key: str):
        """Stores ``tensor`` under ``target``; a second source key mapping to the same target (aliases of a
        shared module, e.g. MaskDINO's ``bbox_embed`` / ``decoder.bbox_embed``) must hold the same values."""
        if target in self.tensors:
            previous = self.tensors[target]
            if previous.shape != tensor.shape or not torch.equal(previous, tensor):
                raise ValueError(f"{source_key!r} and {self.origin[target]!r} both map to {target!r} but hold "
                                 "different values")
            return
        self.tensors[target], self.origin[target] = tensor, source_key
