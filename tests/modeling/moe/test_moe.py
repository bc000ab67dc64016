"""Conditional MoE with attribute-level routing: routing, weight-space mixing semantics, gradients."""
import pytest
import torch
import torch.nn.functional as F

import up2  # noqa: F401
from detectron2.config import get_cfg

from up2.config import add_up2_config
from up2.modeling.moe import (
    FFN, MODALITY_IMAGE, MODALITY_TEXT, SIDE_INPUT, SIDE_TARGET, ConditionalMoEFFN, build_ffn, build_routing_plan,
    grouped_ffn, make_attributes,
)

D, HIDDEN = 16, 24
CAP_IMG = make_attributes("captioning", MODALITY_IMAGE, SIDE_INPUT, False)
CAP_TXT = make_attributes("captioning", MODALITY_TEXT, SIDE_INPUT, True)
CLS_IMG = make_attributes("classification", MODALITY_IMAGE, SIDE_INPUT, False)
CLS_TGT = make_attributes("classification", MODALITY_TEXT, SIDE_TARGET, False)


def _layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = ConditionalMoEFFN(D, HIDDEN, **kwargs).double()
    with torch.no_grad():  # make the gate sensitive to the attributes
        for p in layer.gate.parameters():
            p.normal_(0, 1.0)
    return layer


def _batch():
    """B=3, T=7, S=3 segments; segment 2 of element 0 has no token."""
    attrs = torch.tensor([[CAP_IMG, CAP_TXT, CLS_TGT], [CLS_IMG, CLS_TGT, CLS_TGT], [CAP_IMG, CLS_IMG, CAP_TXT]])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 2, 2, 0]])
    x = torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x, attrs, seg


def _explicit_mixture(layer, x, attrs, seg):
    """Reference: per token, build the gate-weighted FFN of its segment explicitly (Python loops)."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            indices, gates, _ = layer.gate(attrs[b, seg[b, t]])
            e = layer.experts
            w1 = sum(g * e.w1[i] for g, i in zip(gates, indices))
            b1 = sum(g * e.b1[i] for g, i in zip(gates, indices))
            w2 = sum(g * e.w2[i] for g, i in zip(gates, indices))
            b2 = sum(g * e.b2[i] for g, i in zip(gates, indices))
            out[b, t] = F.linear(F.gelu(F.linear(x[b, t], w1, b1)), w2, b2)
    return out


def test_same_attributes_same_experts_and_gates():
    layer = _layer()
    attrs = torch.tensor([CAP_TXT, CLS_IMG, CAP_TXT, CLS_IMG, CAP_TXT])
    indices, gates, _ = layer.gate(attrs)
    assert indices.shape == (5, 2) and gates.shape == (5, 2)
    for i in (2, 4):
        assert torch.equal(indices[i], indices[0]) and torch.allclose(gates[i], gates[0], rtol=0, atol=1e-12)
    assert torch.equal(indices[3], indices[1]) and torch.allclose(gates[3], gates[1], rtol=0, atol=1e-12)
    # The layer routes each distinct attribute vector once, so equal attributes share the very same gates.
    plan = build_routing_plan(attrs.view(1, 5, 4), torch.arange(5).view(1, 5))
    assert plan.counts == [2, 3] or plan.counts == [3, 2]
    assert sorted(map(tuple, plan.attributes.tolist())) == sorted([CAP_TXT, CLS_IMG])
    assert torch.allclose(gates.sum(-1), torch.ones(5, dtype=gates.dtype))
    # renormalised gates = softmax over the two kept logits, kept logits are the two largest
    logits = layer.gate.logits(attrs)
    top = logits.topk(2, dim=-1)
    assert torch.equal(indices, top.indices)
    assert torch.allclose(gates, top.values.softmax(-1))


def test_different_tasks_can_route_differently():
    layer = _layer()
    all_attrs = torch.tensor([make_attributes(task, m, s, c) for task in ("detection", "classification", "retrieval",
                                                                             "captioning", "mlm")
                              for m in (0, 1) for s in (0, 1) for c in (0, 1)])
    indices, gates, _ = layer.gate(all_attrs)
    routings = {(tuple(sorted(i.tolist()))) for i in indices}
    assert len(routings) > 1
    caption_vs_cls = layer.gate(torch.tensor([CAP_TXT, make_attributes("classification", MODALITY_TEXT, SIDE_INPUT,
                                                                        True)]))
    assert not (torch.equal(caption_vs_cls[0][0], caption_vs_cls[0][1])
                and torch.allclose(caption_vs_cls[1][0], caption_vs_cls[1][1]))


def test_routing_plan_groups_tokens():
    x, attrs, seg = _batch()
    plan = build_routing_plan(attrs, seg)
    # CLS_TGT of element 0 owns no token but CLS_TGT appears in element 1: 4 distinct present vectors.
    assert sorted(map(tuple, plan.attributes.tolist())) == sorted([CAP_IMG, CAP_TXT, CLS_IMG, CLS_TGT])
    assert sum(plan.counts) == 21
    token_attrs = attrs.gather(1, seg[..., None].expand(-1, -1, 4)).reshape(-1, 4)[plan.order]
    groups = torch.split(token_attrs, plan.counts)
    for group, vec in zip(groups, plan.attributes):
        assert (group == vec).all()
    assert torch.equal(plan.order[plan.inverse], torch.arange(21))


def test_merged_path_equals_explicit_mixture():
    layer = _layer()
    x, attrs, seg = _batch()
    y, aux = layer(x, attrs, seg)
    assert y.shape == x.shape and float(aux) == 0.0
    assert torch.allclose(y, _explicit_mixture(layer, x, attrs, seg), atol=1e-12)
    # Not the output mixture sum_i g_i FFN_i(x) of token-level MoEs (documented semantics).
    indices, gates, _ = layer.gate(torch.tensor(CAP_IMG))
    out_mix = sum(g * layer.experts.expert(int(i), x[0, 0]) for g, i in zip(gates, indices))
    assert not torch.allclose(y[0, 0], out_mix, atol=1e-6)


@pytest.mark.parametrize("max_padding", [0.0, 10.0])  # loop over routings / one padded bmm
def test_grouped_ffn_equals_explicit_mixture(max_padding):
    """The autograd reference path: merged mixtures + grouped_ffn on the sorted tokens."""
    layer = _layer()
    x, attrs, seg = _batch()
    plan = build_routing_plan(attrs, seg)
    gates, _, _ = layer.route(plan.attributes)
    w1, b1, w2, b2 = layer.experts.merged(gates)
    y = grouped_ffn(x.reshape(-1, D)[plan.order], plan.counts, w1, b1, w2, b2, max_padding=max_padding)
    assert torch.allclose(y[plan.inverse].view_as(x), _explicit_mixture(layer, x, attrs, seg), atol=1e-12)


def test_top1_equals_the_selected_expert():
    layer = _layer(top_k=1)
    x, attrs, seg = _batch()
    y, _ = layer(x, attrs, seg)
    (index,), _, _ = layer.gate(attrs[1, 1])
    assert torch.allclose(y[1, 2], layer.experts.expert(int(index), x[1, 2]), atol=1e-12)


def test_gradients_reach_gate_and_selected_experts_only():
    layer = _layer()
    x, _, _ = _batch()
    attrs = torch.tensor([[CAP_IMG, CAP_TXT]] * 3)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 3)
    y, _ = layer(x, attrs, seg)
    y.pow(2).sum().backward()
    selected = set(layer.gate(attrs[0])[0].flatten().tolist())
    assert 2 <= len(selected) <= 4
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(layer.experts, name).grad
        per_expert = grad.flatten(1).abs().sum(1)
        for e in range(8):
            assert (per_expert[e] > 0) == (e in selected), (name, e)
    for p in layer.gate.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_balance_loss():
    layer = _layer(balance_loss_weight=0.5)
    x, attrs, seg = _batch()
    _, aux = layer(x, attrs, seg)
    assert aux.requires_grad and float(aux.detach()) > 0
    aux.backward()
    assert layer.gate.to_logits.weight.grad.abs().sum() > 0
    # one routing, gates uniform over all experts -> E * sum f_e P_e with f uniform over 2 experts = 1
    logits = torch.zeros(1, 8, dtype=torch.float64)
    loss = layer.balance_loss(logits, torch.tensor([[0, 1]]), [5])
    assert torch.isclose(loss, torch.tensor(1.0, dtype=torch.float64))


def test_bad_inputs_raise():
    layer = _layer()
    x, attrs, seg = _batch()
    with pytest.raises(ValueError, match="segment_ids"):
        layer(x, attrs, seg + 3)
    bad = attrs.clone()
    bad[0, 0, 1] = 2
    with pytest.raises(ValueError, match="attribute values"):
        layer(x, bad, seg)
    with pytest.raises(ValueError, match="unknown task"):
        make_attributes("vqa", 0, 0, False)


def test_build_ffn_and_dense_interface():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.UP2.DECODER.DROPOUT = 0.0
    moe = build_ffn(cfg, D, HIDDEN)
    assert isinstance(moe, ConditionalMoEFFN) and moe.experts.w1.shape == (8, HIDDEN, D)
    assert moe.gate.top_k == 2
    cfg.MODEL.UP2.MOE.ENABLED = False
    dense = build_ffn(cfg, D, HIDDEN)
    assert isinstance(dense, FFN)
    x = torch.randn(2, 3, D)
    y, aux = dense(x, None, None)
    assert torch.allclose(y, dense.fc2(F.gelu(dense.fc1(x)))) and float(aux) == 0.0
