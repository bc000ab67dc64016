"""Projects backbone levels to the proposer width (paper Appendix A): a 1x1 convolution + GroupNorm
per level, and an extra 3x3 stride-2 convolution + GroupNorm on the last level (stride 64)."""
from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from torch import nn

__all__ = ["InputProjection"]


class InputProjection(nn.Module):
    """F_l -> F'_l for every backbone level, plus F'_{extra} from the last level.

    Args:
        input_shape: backbone outputs, name -> ShapeSpec, e.g. res2..res5.
        in_features: the levels to project, in increasing stride.
        hidden_dim: d, output channels.
        num_extra_levels: stride-2 levels appended after the last one (paper: 1, stride 64).
        num_groups: GroupNorm groups.
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], in_features: List[str], hidden_dim: int,
                 num_extra_levels: int = 1, num_groups: int = 32):
        super().__init__()
        missing = [name for name in in_features if name not in input_shape]
        if missing:
            raise ValueError(f"InputProjection: backbone has no output {missing}; it has {sorted(input_shape)}")
        self.in_features = list(in_features)
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_shape[name].channels, hidden_dim, 1), nn.GroupNorm(num_groups, hidden_dim))
            for name in self.in_features)
        last_channels = input_shape[self.in_features[-1]].channels
        self.extra = nn.ModuleList()
        for i in range(num_extra_levels):
            in_channels = last_channels if i == 0 else hidden_dim
            self.extra.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1),
                                            nn.GroupNorm(num_groups, hidden_dim)))
        last_stride = input_shape[self.in_features[-1]].stride
        self.strides = [input_shape[name].stride for name in self.in_features] + [
            last_stride * 2 ** (i + 1) for i in range(num_extra_levels)]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features: backbone outputs, name -> (B, C_l, H_l, W_l).

        Returns:
            list of (B, d, H_l, W_l) in increasing stride, extra levels last.
        """
        outputs = [proj(features[name]) for proj, name in zip(self.lateral, self.in_features)]
        source = features[self.in_features[-1]]
        for extra in self.extra:
            source = extra(source)
            outputs.append(source)
        return outputs
