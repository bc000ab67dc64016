"""Global image representations (paper eq. 3): M' attention poolings over the last feature level,
concatenated with the flattened level itself."""
import torch
from detectron2.config import configurable
from torch import nn

from up2.modeling.build import GLOBAL_POOL_REGISTRY
from up2.modeling.image_encoder.position_encoding import sine_position_encoding_2d

__all__ = ["AttentionPooling"]


@GLOBAL_POOL_REGISTRY.register()
class AttentionPooling(nn.Module):
    """M' learned queries, each attending over the feature map (one attention pooling per query),
    plus optionally the flattened map.

    Args:
        in_channels: channels C of the feature map.
        num_queries: M', the number of attention poolings (paper: 10).
        num_heads: heads of the pooling attention.
        include_flattened: append ``Flatten(F_L)`` after the pooled tokens.
    """

    @configurable
    def __init__(self, *, in_channels: int, num_queries: int, num_heads: int, include_flattened: bool):
        super().__init__()
        if num_queries < 0 or (num_queries == 0 and not include_flattened):
            raise ValueError(f"AttentionPooling needs num_queries > 0 or include_flattened, got {num_queries}")
        if in_channels % num_heads:
            raise ValueError(f"in_channels {in_channels} must be divisible by num_heads {num_heads}")
        self.num_queries = num_queries
        self.include_flattened = include_flattened
        self.queries = nn.Parameter(torch.randn(num_queries, in_channels) * in_channels ** -0.5)
        self.attention = nn.MultiheadAttention(in_channels, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(in_channels)

    @classmethod
    def from_config(cls, cfg, in_channels):
        pool = cfg.MODEL.UP2.GLOBAL_POOL
        return {"in_channels": in_channels, "num_queries": pool.NUM_QUERIES, "num_heads": pool.NUM_HEADS,
                "include_flattened": pool.INCLUDE_FLATTENED}

    def num_tokens(self, height: int, width: int) -> int:
        """Number of global tokens for an (height, width) feature map."""
        return self.num_queries + (height * width if self.include_flattened else 0)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor = None) -> torch.Tensor:
        """
        Args:
            features: (B, C, h, w) last feature level.
            padding_mask: optional (B, h, w) bool, True at padded positions (ignored by pooling).

        Returns:
            (B, M' + h*w, C) global tokens (B, M', C without the flattened map).
        """
        batch, channels, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, h*w, C)
        keys = tokens + sine_position_encoding_2d(height, width, channels, features.device, features.dtype)
        key_padding = padding_mask.flatten(1) if padding_mask is not None else None
        outputs = []
        if self.num_queries:
            queries = self.queries.to(features.dtype).unsqueeze(0).expand(batch, -1, -1)
            pooled, _ = self.attention(queries, self.norm(keys), tokens, key_padding_mask=key_padding,
                                       need_weights=False)
            outputs.append(pooled)
        if self.include_flattened:
            outputs.append(tokens)
        return torch.cat(outputs, dim=1)
