"""torchvision ResNet weights -> Detectron2 ResNet names.

``torchvision.models.resnet*().state_dict()`` names map to ``stem.conv1.weight``, ``stem.conv1.norm.*``,
``res2.0.conv1.*``, ``res2.0.shortcut.*``, ...: torchvision's ``layer{i}`` is Detectron2's ``res{i+1}`` and
``bn{k}`` is the norm of ``conv{k}``. torchvision puts the stride in the 3x3 convolution: build the
Detectron2 ResNet with ``MODEL.RESNETS.STRIDE_IN_1X1: False``. BatchNorm statistics go to
``FrozenBatchNorm2d`` / ``BatchNorm2d`` (``weight, bias, running_mean, running_var``);
``num_batches_tracked`` and the classifier ``fc.*`` are reported unmatched.
"""
import re

from up2.checkpoint.sources.renamed_tensors import RenamedTensors, StateDict

__all__ = ["convert_torchvision_resnet"]

_BN = r"(weight|bias|running_mean|running_var)"
_RESNET_RULES = [
    (r"conv1\.weight", r"stem.conv1.weight"),
    (rf"bn1\.{_BN}", r"stem.conv1.norm.\1"),
    (r"layer(\d+)\.(\d+)\.conv(\d+)\.weight", r"res{stage}.\2.conv\3.weight"),
    (rf"layer(\d+)\.(\d+)\.bn(\d+)\.{_BN}", r"res{stage}.\2.conv\3.norm.\4"),
    (r"layer(\d+)\.(\d+)\.downsample\.0\.weight", r"res{stage}.\2.shortcut.weight"),
    (rf"layer(\d+)\.(\d+)\.downsample\.1\.{_BN}", r"res{stage}.\2.shortcut.norm.\3"),
]


def convert_torchvision_resnet(state_dict: StateDict, prefix: str, out: RenamedTensors):
    """Puts every torchvision ResNet tensor of ``state_dict`` into ``out`` under ``prefix`` + its Detectron2
    name; other keys go to ``out.unmatched``."""
    for key, tensor in state_dict.items():
        for pattern, template in _RESNET_RULES:
            match = re.fullmatch(pattern, key)
            if match:
                stage = int(match.group(1)) + 1 if key.startswith("layer") else 0
                out.put(prefix + match.expand(template.replace("{stage}", str(stage))), tensor, key)
                break
        else:
            out.unmatched.append(key)  # fc.*, num_batches_tracked
