"""The hand-written forward / backward of the conditional MoE (``MixedExpertFFN``): gradcheck, equality with
the autograd reference (merged mixtures + ``grouped_ffn``), routing-plan permutations, dtypes."""
import pytest
import torch
import torch.nn.functional as F

import up2  # noqa: F401
from up2.modeling.moe import (
    MODALITY_IMAGE, MODALITY_TEXT, SIDE_INPUT, SIDE_TARGET, ConditionalMoEFFN, build_routing_plan, grouped_ffn,
    make_attributes, mixed_expert_ffn,
)
import up2.modeling.moe.experts as experts_module
from up2.modeling.moe.experts import HUGEPAGE_MIN_BYTES, _new_buffer, _span

D, HIDDEN = 16, 24
CAP_IMG = make_attributes("captioning", MODALITY_IMAGE, SIDE_INPUT, False)
CAP_TXT = make_attributes("captioning", MODALITY_TEXT, SIDE_INPUT, True)
CLS_TGT = make_attributes("classification", MODALITY_TEXT, SIDE_TARGET, False)


def _params(num_experts=4, dim=3, hidden=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((num_experts, hidden, dim), (num_experts, hidden), (num_experts, dim, hidden), (num_experts, dim))
    return [torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_() for shape in shapes]


def _permutation(n, seed=0):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return order, inverse


def _reference(x, gates, routes, counts, params, order=None, inverse=None):
    """Autograd reference: dense (U, E) gates -> merged weights -> grouped_ffn on the sorted tokens."""
    w1, b1, w2, b2 = params
    dense = torch.zeros(len(routes), w1.shape[0], dtype=gates.dtype)
    positions = (torch.arange(len(routes)).repeat_interleave(len(routes[0])), torch.tensor(routes).flatten())
    dense = dense.index_put(positions, gates.flatten(), accumulate=True)
    merged = [(dense @ p.flatten(1)).view(len(routes), *p.shape[1:]) for p in params]
    x_sorted = x if order is None else x[order]
    y = grouped_ffn(x_sorted, counts, *merged)
    return y if inverse is None else y[inverse]


# routes: top-2 (adjacent / spread / shared experts), top-3 with unequal spacing (the all-experts fallback of
# _span), top-1, and one expert listed twice
ROUTES = {
    "top2": ([[0, 2], [3, 0], [1, 2]], [2, 4, 1]),
    "top3-uneven": ([[0, 1, 3], [3, 2, 0]], [3, 4]),
    "top1": ([[2], [0], [2]], [1, 3, 3]),
    "repeated": ([[1, 1], [0, 3]], [4, 3]),
}


@pytest.fixture(params=["small", "large"])
def weight_space(request, monkeypatch):
    """Both weight-space code paths: (U, E)-dense products, or per-routing / per-expert BLAS calls."""
    if request.param == "large":
        monkeypatch.setattr(experts_module, "SMALL_WEIGHT_SPACE", 0)
    return request.param


@pytest.mark.parametrize("case", sorted(ROUTES))
@pytest.mark.parametrize("permuted", [False, True])
def test_mixed_expert_ffn_gradcheck(case, permuted, weight_space):
    routes, counts = ROUTES[case]
    n = sum(counts)
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    gates = torch.rand(len(routes), len(routes[0]), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(2)).requires_grad_()
    params = _params()
    order, inverse = _permutation(n) if permuted else (None, None)

    def fn(x, gates, *params):
        return mixed_expert_ffn(x, gates, routes, counts, *params, order=order, inverse=inverse)

    assert torch.autograd.gradcheck(fn, (x, gates, *params))
    # and the same values / gradients as the autograd reference
    y = fn(x, gates, *params)
    ref = _reference(x, gates, routes, counts, params, order, inverse)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    probe = torch.randn_like(y)
    inputs = (x, gates, *params)
    for got, want in zip(torch.autograd.grad(y, inputs, probe), torch.autograd.grad(ref, inputs, probe)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_mixed_expert_ffn_gradcheck_dropout(weight_space):
    routes, counts = ROUTES["top2"]
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    gates = torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    order, inverse = _permutation(7)

    def fn(x, gates, *params):
        torch.manual_seed(3)  # the same dropout masks at every evaluation
        return mixed_expert_ffn(x, gates, routes, counts, *params, order=order, inverse=inverse, dropout=0.3,
                                training=True)

    params = _params()
    assert torch.autograd.gradcheck(fn, (x, gates, *params))
    y = fn(x, gates, *params)
    assert (y == 0).any()  # output dropout is on
    with torch.no_grad():  # eval mode: no dropout
        assert torch.equal(mixed_expert_ffn(x, gates, routes, counts, *params, order=order, inverse=inverse,
                                            dropout=0.3, training=False),
                           _reference(x, gates, routes, counts, params, order, inverse))


def test_mixed_expert_ffn_partial_gradients(weight_space):
    """Only the requested gradients are computed; unselected experts get exact zeros."""
    routes, counts = ROUTES["top2"]  # expert 3 only in routing 1, all four used
    x = torch.randn(7, 3, dtype=torch.float64)
    gates = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    params = _params(num_experts=6)  # experts 4 and 5 unused
    y = mixed_expert_ffn(x, gates, routes, counts, *params)
    y.square().sum().backward()
    for p in params:
        per_expert = p.grad.flatten(1).abs().sum(1)
        assert (per_expert[:4] > 0).all() and (per_expert[4:] == 0).all()
    assert gates.grad is not None and x.grad is None
    frozen = [p.detach() for p in params]
    x.requires_grad_()
    gates.grad = None
    mixed_expert_ffn(x, gates, routes, counts, *frozen).sum().backward()
    assert x.grad is not None and gates.grad is not None


def test_mixed_expert_ffn_bad_arguments():
    routes, counts = ROUTES["top2"]
    x, gates, params = torch.randn(7, 3, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64), _params()
    order, _ = _permutation(7)
    with pytest.raises(ValueError, match="order and inverse"):
        mixed_expert_ffn(x, gates, routes, counts, *params, order=order)
    with pytest.raises(ValueError, match="do not match"):
        mixed_expert_ffn(x, gates, routes, [2, 4, 2], *params)


def test_span():
    t = torch.arange(24.0).view(6, 4)
    for indices in ([4, 1], [3], [0, 2, 4], [5, 4]):
        span = _span(indices)
        assert torch.equal(t[span], t[sorted(indices)]) and t[span].data_ptr() >= t.data_ptr()
    for indices in ([0, 1, 3], [2, 2]):  # unequal spacing, repeated: everything
        assert _span(indices) == slice(None)


def test_new_buffer_large_and_small():
    like = torch.zeros(1)
    big = _new_buffer((HUGEPAGE_MIN_BYTES // 4 + 5,), like)
    big.fill_(2.0)
    assert big.dtype == like.dtype and big.shape == (HUGEPAGE_MIN_BYTES // 4 + 5,)
    assert float(big.sum()) == 2.0 * big.numel()
    small = _new_buffer((3, 2), like.double())
    assert small.shape == (3, 2) and small.dtype == torch.float64


def _layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = ConditionalMoEFFN(D, HIDDEN, **kwargs).double()
    with torch.no_grad():
        for p in layer.gate.parameters():
            p.normal_(0, 1.0)
    return layer


def _layer_reference(layer, x, plan):
    """The layer computed with autograd ops only (dense gates, merged experts, grouped_ffn)."""
    gates, _, _ = layer.route(plan.attributes)
    w1, b1, w2, b2 = layer.experts.merged(gates)
    return grouped_ffn(x.reshape(-1, D)[plan.order], plan.counts, w1, b1, w2, b2)[plan.inverse].view_as(x)


@pytest.mark.parametrize("contiguous", [False, True])
def test_layer_gradients_equal_autograd_reference(contiguous, weight_space):
    layer = _layer(balance_loss_weight=0.3)
    if contiguous:  # one sequence, each segment routed differently: no permutation needed
        attrs = torch.tensor([[CAP_IMG, CAP_TXT, CLS_TGT]])
        seg = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2]])
    else:
        attrs = torch.tensor([[CAP_IMG, CAP_TXT], [CAP_TXT, CLS_TGT]])
        seg = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 0, 1, 1]])
    plan = build_routing_plan(attrs, seg)
    assert plan.contiguous == contiguous
    x = torch.randn(*seg.shape, D, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(*seg.shape, D, dtype=torch.float64)
    params = [x, *layer.parameters()]
    y, aux = layer(x, plan=plan)
    got = torch.autograd.grad((y * probe).sum() + aux, params, retain_graph=True)
    ref = _layer_reference(layer, x, plan)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    want = torch.autograd.grad((ref * probe).sum() + aux, params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=0, atol=1e-12)


def test_routing_plan_order_of_first_token():
    attrs = torch.tensor([[CLS_TGT, CAP_IMG], [CAP_IMG, CLS_TGT]])
    seg = torch.tensor([[0, 0, 1], [0, 1, 1]])
    plan = build_routing_plan(attrs, seg)
    # routing 0 = the attributes of the first token, whatever their sort order
    assert plan.attributes.tolist() == [list(CLS_TGT), list(CAP_IMG)] and plan.counts == [4, 2]
    assert not plan.contiguous
    assert plan.order.tolist() == [0, 1, 4, 5, 2, 3] and torch.equal(plan.order[plan.inverse], torch.arange(6))
    single = build_routing_plan(attrs[:1, :1], torch.zeros(1, 5, dtype=torch.long))
    assert single.contiguous and single.counts == [5]


def test_layer_mixed_dtypes():
    layer = _layer()
    attrs = torch.tensor([[CAP_IMG, CAP_TXT]])
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    x = torch.randn(1, 5, D, dtype=torch.float64)
    ref, _ = layer(x, attrs, seg)
    y, _ = layer(x.float(), attrs, seg)  # float32 tokens, float64 experts
    assert y.dtype == torch.float32 and torch.allclose(y.double(), ref, atol=1e-5)
    layer32 = _layer().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer32(x.float().requires_grad_(), attrs, seg)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), ref, atol=0.05)
    y.float().sum().backward()
    assert layer32.experts.w1.grad.dtype == torch.float32


def test_layer_dropout_matches_dense_ffn_statistics():
    """Dropout placement (after the activation and after the output projection) as in the dense FFN."""
    layer = _layer(dropout=0.5).train()
    attrs = torch.tensor([[CAP_IMG]])
    seg = torch.zeros(1, 400, dtype=torch.long)
    x = torch.randn(1, 400, D, dtype=torch.float64)
    y, _ = layer(x, attrs, seg)
    zero = (y == 0).double().mean()
    assert 0.4 < float(zero) < 0.6
    layer.eval()
    y_eval, _ = layer(x, attrs, seg)
    indices, gates, _ = layer.gate(torch.tensor(CAP_IMG))
    e = layer.experts
    mix = [sum(g * p[i] for g, i in zip(gates, indices)) for p in (e.w1, e.b1, e.w2, e.b2)]
    assert torch.allclose(y_eval, F.linear(F.gelu(F.linear(x, mix[0], mix[1])), mix[2], mix[3]), atol=1e-12)
