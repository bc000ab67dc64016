"""Global attention pooling (paper eq. 3) and the sine position encodings."""
import math

import pytest
import torch
from detectron2.config import get_cfg

from up2.config import add_up2_config
from up2.modeling.build import build_global_pool
from up2.modeling.image_encoder.global_pooling import AttentionPooling
from up2.modeling.image_encoder.position_encoding import sine_encoding_of_coordinates, sine_position_encoding_2d


def test_sine_encoding_known_values():
    encoding = sine_encoding_of_coordinates(torch.tensor([[0.25]]), num_feats=4, temperature=100.0)
    angle0, angle1 = 2 * math.pi * 0.25, 2 * math.pi * 0.25 / 10.0
    expected = torch.tensor([[math.sin(angle0), math.cos(angle0), math.sin(angle1), math.cos(angle1)]])
    torch.testing.assert_close(encoding, expected)
    grid = sine_position_encoding_2d(2, 3, 8)
    assert grid.shape == (6, 8)
    # row-major: position 4 is (y=1, x=1) -> y = 0.75, x = 0.5
    torch.testing.assert_close(grid[4], sine_encoding_of_coordinates(torch.tensor([0.75, 0.5]), 4))


def manual_pooling(module, features, mask=None):
    """Single-head attention pooling written out: softmax(q W_q (k W_k)^T / sqrt(C)) v W_v, then W_o."""
    batch, channels, height, width = features.shape
    tokens = features.flatten(2).transpose(1, 2)
    keys = module.norm(tokens + sine_position_encoding_2d(height, width, channels))
    w_q, w_k, w_v = module.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.attention.in_proj_bias.chunk(3)
    q = module.queries @ w_q.T + b_q
    k = keys @ w_k.T + b_k
    v = tokens @ w_v.T + b_v
    logits = torch.einsum("qc,bkc->bqk", q, k) / math.sqrt(channels)
    if mask is not None:
        logits = logits.masked_fill(mask.flatten(1)[:, None, :], float("-inf"))
    pooled = torch.einsum("bqk,bkc->bqc", logits.softmax(-1), v)
    return module.attention.out_proj(pooled)


def test_pooling_equals_written_out_attention_and_flattened_map_follows():
    torch.manual_seed(0)
    module = AttentionPooling(in_channels=16, num_queries=3, num_heads=1, include_flattened=True).eval()
    features = torch.randn(2, 16, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3] = True
    with torch.no_grad():
        tokens = module(features, mask)
        expected = manual_pooling(module, features, mask)
    assert tokens.shape == (2, 3 + 12, 16) and module.num_tokens(3, 4) == 15
    torch.testing.assert_close(tokens[:, :3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 3:], features.flatten(2).transpose(1, 2))


def test_built_from_config_and_options():
    cfg = get_cfg()
    add_up2_config(cfg)
    module = build_global_pool(cfg, 256)
    assert module.num_queries == 10 and module.include_flattened
    assert module(torch.randn(1, 256, 2, 2)).shape == (1, 14, 256)
    pooled_only = AttentionPooling(in_channels=8, num_queries=2, num_heads=2, include_flattened=False)
    assert pooled_only(torch.randn(1, 8, 5, 5)).shape == (1, 2, 8)
    with pytest.raises(ValueError, match="num_queries"):
        AttentionPooling(in_channels=8, num_queries=0, num_heads=2, include_flattened=False)
