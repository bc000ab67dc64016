"""Input projections: channels, strides and the extra stride-64 level."""
import pytest
import torch
from detectron2.layers import ShapeSpec

from up2.modeling.image_encoder.input_projection import InputProjection

SHAPES = {"res2": ShapeSpec(channels=8, stride=4), "res3": ShapeSpec(channels=16, stride=8),
          "res4": ShapeSpec(channels=24, stride=16), "res5": ShapeSpec(channels=32, stride=32)}


def test_levels_channels_and_strides():
    projection = InputProjection(SHAPES, ["res2", "res3", "res4", "res5"], hidden_dim=32, num_groups=4)
    assert projection.strides == [4, 8, 16, 32, 64]
    height, width = 128, 192
    features = {name: torch.randn(2, spec.channels, height // spec.stride, width // spec.stride)
                for name, spec in SHAPES.items()}
    outputs = projection(features)
    assert [tuple(o.shape) for o in outputs] == [(2, 32, height // s, width // s) for s in (4, 8, 16, 32, 64)]
    # GroupNorm output: every group of every level has zero mean (affine initialised to identity).
    means = outputs[1].reshape(2, 4, -1).mean(-1)
    torch.testing.assert_close(means, torch.zeros_like(means), atol=1e-5, rtol=0)


def test_extra_level_is_a_stride2_conv_of_the_last_level():
    projection = InputProjection(SHAPES, ["res3", "res4", "res5"], hidden_dim=16, num_groups=4)
    res5 = torch.randn(1, 32, 5, 7)
    outputs = projection({"res3": torch.randn(1, 16, 20, 28), "res4": torch.randn(1, 24, 10, 14), "res5": res5})
    conv, norm = projection.extra[0]
    torch.testing.assert_close(outputs[-1], norm(conv(res5)))
    assert outputs[-1].shape == (1, 16, 3, 4)


def test_unknown_level_is_named():
    with pytest.raises(ValueError, match="res6"):
        InputProjection(SHAPES, ["res5", "res6"], hidden_dim=16, num_groups=4)
