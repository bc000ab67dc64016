"""Similarity head: cosine logits scaled by a capped, per-group learnable temperature."""
import math

import pytest
import torch
import torch.nn.functional as F

from up2.modeling.similarity import SimilarityHead


def test_logits_are_scaled_cosines_per_group():
    torch.manual_seed(0)
    head = SimilarityHead(dim=8, groups=["classification", "retrieval"], temperature_init=0.07, max_logit_scale=100)
    with torch.no_grad():
        head.logit_scale[1] = math.log(20.0)
    x, y = torch.randn(2, 3, 8), torch.randn(5, 8)
    logits = head(x, y, "retrieval")
    ex = F.normalize(head.projection(F.layer_norm(x, (8,), head.norm.weight, head.norm.bias)), dim=-1)
    ey = F.normalize(head.projection(F.layer_norm(y, (8,), head.norm.weight, head.norm.bias)), dim=-1)
    torch.testing.assert_close(logits, 20.0 * torch.einsum("bnd,kd->bnk", ex, ey))
    torch.testing.assert_close(head.scale("classification"), torch.tensor(1 / 0.07))
    assert logits.abs().max() <= 20.0 + 1e-5


def test_scale_is_capped_and_gets_gradient():
    head = SimilarityHead(dim=4, groups=["mlm"], temperature_init=0.07, max_logit_scale=100)
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert float(head.scale("mlm").detach()) == pytest.approx(100.0)
    head.logit_scale.data.fill_(1.0)
    head(torch.randn(3, 4), torch.randn(2, 4), "mlm").sum().backward()
    assert head.logit_scale.grad is not None and head.logit_scale.grad.abs().sum() > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="distinct"):
        SimilarityHead(dim=4, groups=["a", "a"], temperature_init=0.07, max_logit_scale=100)
    with pytest.raises(ValueError, match="temperature_init"):
        SimilarityHead(dim=4, groups=["a"], temperature_init=0.001, max_logit_scale=100)
    head = SimilarityHead(dim=4, groups=["a"], temperature_init=0.07, max_logit_scale=100)
    with pytest.raises(KeyError, match="'b'"):
        head.scale("b")
