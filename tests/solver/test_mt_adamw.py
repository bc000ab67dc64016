"""MTAdamW against an explicit per-tensor reference, torch.optim.AdamW, and resume semantics."""
import copy
import math
import random

import pytest
import torch

import up2  # noqa: F401
from up2.solver import MTAdamW

BETAS = (0.9, 0.999)
EPS = 1e-8


class ReferenceMTAdamW:
    """Straightforward per-tensor MT-AdamW: plain Python loop, the formulas as written in §4.4."""

    def __init__(self, groups, betas, eps, normalize, compensate, unused):
        self.groups = groups  # list of (params, lr, wd)
        self.b1, self.b2 = betas
        self.eps, self.normalize, self.compensate, self.unused = eps, normalize, compensate, unused
        self.m, self.v, self.t = {}, {}, 0

    def step(self, grads, s, w):
        """grads: {param index: tensor or None}, indexed over all params of all groups."""
        self.t += 1
        present = [g for g in grads.values() if g is not None]
        norm = math.sqrt(sum(float((g * g).sum()) for g in present))
        idx = 0
        for params, lr, wd in self.groups:
            for p in params:
                grad = grads[idx]
                key = idx
                idx += 1
                if grad is None:
                    if self.unused == "skip":
                        continue
                    grad = torch.zeros_like(p)
                g = w * grad / norm if (self.normalize and norm > 0) else w * grad
                c = 1.0 / s if self.compensate else 1.0
                m = self.m.get(key, torch.zeros_like(p))
                v = self.v.get(key, torch.zeros_like(p))
                m = self.b1 * m + (1 - self.b1) * c * g
                v = self.b2 * v + (1 - self.b2) * c * g * g
                self.m[key], self.v[key] = m, v
                m_hat = m / (1 - self.b1 ** self.t)
                v_hat = v / (1 - self.b2 ** self.t)
                p.mul_(1 - lr * wd)
                p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))


def _make_params(gen, dtype=torch.float64):
    shapes = [[(4, 3), (5,), (2, 3, 3)], [(7,), (3, 3)], [(6, 2), (1,)]]
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in g] for g in shapes]


GROUP_HP = [(1e-2, 0.1), (3e-3, 0.0), (5e-2, 0.05)]  # (lr, wd) per group


def _clone_groups(params):
    return [[p.clone().requires_grad_(True) for p in g] for g in params]


def _random_schedule(seed, n_params, steps):
    rng = random.Random(seed)
    tasks = [(0.5, 1.0), (0.2, 2.0), (0.3, 0.5)]
    schedule = []
    for _ in range(steps):
        s, w = rng.choice(tasks)
        unused = {i for i in range(n_params) if rng.random() < 0.3}
        schedule.append((s, w, unused))
    return schedule


@pytest.mark.parametrize("unused", ["decay", "skip"])
@pytest.mark.parametrize("normalize,compensate", [(True, True), (False, True), (True, False)])
def test_matches_reference(unused, normalize, compensate):
    gen = torch.Generator().manual_seed(0)
    init = _make_params(gen)
    ours, theirs = _clone_groups(init), _clone_groups(init)
    opt = MTAdamW([{"params": g, "lr": lr, "weight_decay": wd}
                   for g, (lr, wd) in zip(ours, GROUP_HP)], lr=1.0, betas=BETAS, eps=EPS,
                  weight_decay=0.0, normalize_gradient=normalize, compensate_sampling=compensate,
                  unused_params=unused)
    ref = ReferenceMTAdamW([(g, lr, wd) for g, (lr, wd) in zip(theirs, GROUP_HP)], BETAS, EPS,
                           normalize, compensate, unused)
    flat_ours = [p for g in ours for p in g]
    flat_ref = [p for g in theirs for p in g]
    # parameter 0 gets no gradient at the first 3 steps: exercises "never seen" state creation
    schedule = _random_schedule(1, len(flat_ours), 25)
    for step, (s, w, unused_idx) in enumerate(schedule):
        if step < 3:
            unused_idx = unused_idx | {0}
        grads = {i: None if i in unused_idx else torch.randn(p.shape, generator=gen,
                                                             dtype=torch.float64)
                 for i, p in enumerate(flat_ours)}
        for i, p in enumerate(flat_ours):
            p.grad = None if grads[i] is None else grads[i].clone()
        opt.set_task(s, w)
        opt.step()
        with torch.no_grad():
            ref.step(grads, s, w)
    assert opt.global_step == 25
    with torch.no_grad():
        for a, b in zip(flat_ours, flat_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(flat_ours[0].detach(), init[0][0])  # updated once it got gradients


def _run_against_adamw(mt_kwargs, task_fn, steps=8):
    gen = torch.Generator().manual_seed(3)
    init = _make_params(gen)
    ours, theirs = _clone_groups(init), _clone_groups(init)
    opt = MTAdamW([{"params": g, "lr": lr, "weight_decay": wd}
                   for g, (lr, wd) in zip(ours, GROUP_HP)], betas=BETAS, eps=EPS, **mt_kwargs)
    ref = torch.optim.AdamW([{"params": g, "lr": lr, "weight_decay": wd}
                             for g, (lr, wd) in zip(theirs, GROUP_HP)], betas=BETAS, eps=EPS,
                            foreach=False)
    flat_ours = [p for g in ours for p in g]
    flat_ref = [p for g in theirs for p in g]
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in flat_ours]
        for p, q, g in zip(flat_ours, flat_ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.set_task(*task_fn(grads))
        opt.step()
        ref.step()
    for a, b in zip(flat_ours, flat_ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


def test_single_task_with_true_norm_weight_equals_adamw():
    def task(grads):
        return 1.0, math.sqrt(sum(float((g * g).sum()) for g in grads))

    _run_against_adamw({}, task)


@pytest.mark.parametrize("unused", ["skip", "decay"])
def test_switches_off_equals_adamw(unused):
    _run_against_adamw(dict(normalize_gradient=False, compensate_sampling=False,
                            unused_params=unused), lambda grads: (1.0, 1.0))


def _train(opt, params, grads_seq, tasks):
    for grads, (s, w) in zip(grads_seq, tasks):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.set_task(s, w)
        opt.step()


def test_state_dict_round_trip_is_bitwise():
    gen = torch.Generator().manual_seed(5)
    init = [p for g in _make_params(gen, torch.float32) for p in g]
    grads_seq = [[None if (i + k) % 4 == 0 else torch.randn(p.shape, generator=gen)
                  for i, p in enumerate(init)] for k in range(10)]
    tasks = [(0.25, 1.0), (0.5, 2.0)] * 5

    params_a = [p.clone().requires_grad_(True) for p in init]
    opt_a = MTAdamW([{"params": params_a[:4], "lr": 1e-2}, {"params": params_a[4:], "lr": 1e-3}],
                    weight_decay=0.1)
    _train(opt_a, params_a, grads_seq[:5], tasks[:5])
    snapshot = copy.deepcopy(opt_a.state_dict())
    params_b = [p.detach().clone().requires_grad_(True) for p in params_a]
    _train(opt_a, params_a, grads_seq[5:], tasks[5:])

    opt_b = MTAdamW([{"params": params_b[:4], "lr": 0.5}, {"params": params_b[4:], "lr": 0.5}],
                    weight_decay=0.0, unused_params="decay")
    opt_b.load_state_dict(snapshot)
    assert opt_b.global_step == 5 and opt_b.task == tasks[4]
    assert opt_b.param_groups[0]["lr"] == 1e-2
    _train(opt_b, params_b, grads_seq[5:], tasks[5:])
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_zero_gradient_norm_skips_normalisation():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = MTAdamW([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.set_task(0.5, 1.0)
    opt.step()  # no division by zero: moments stay zero, update is 0 / (0 + eps) = 0
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_norm_raises(bad):
    p = torch.nn.Parameter(torch.ones(3))
    opt = MTAdamW([p])
    opt.set_task(1.0, 1.0)
    p.grad = torch.tensor([1.0, bad, 0.0])
    with pytest.raises(FloatingPointError, match="non-finite global gradient norm"):
        opt.step()
    assert opt.global_step == 0


def test_bad_arguments():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="unused_params 'ignore'.*decay.*skip"):
        MTAdamW([p], unused_params="ignore")
    with pytest.raises(ValueError, match="lr -1"):
        MTAdamW([p], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        MTAdamW([p], betas=(0.9, 1.0))
    opt = MTAdamW([p])
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="set_task"):
        opt.step()
    with pytest.raises(ValueError, match="sampling_ratio.*0.0"):
        opt.set_task(0.0, 1.0)
    with pytest.raises(ValueError, match="sampling_ratio.*1.5"):
        opt.set_task(1.5, 1.0)
    with pytest.raises(ValueError, match="loss_weight.*-0.5"):
        opt.set_task(0.5, -0.5)


def test_unused_decay_moves_with_momentum_and_skip_does_not():
    p_decay = torch.nn.Parameter(torch.ones(2))
    p_skip = torch.nn.Parameter(torch.ones(2))
    opt_d = MTAdamW([p_decay], lr=0.1, weight_decay=0.5, unused_params="decay")
    opt_s = MTAdamW([p_skip], lr=0.1, weight_decay=0.5, unused_params="skip")
    for opt, p in ((opt_d, p_decay), (opt_s, p_skip)):
        opt.set_task(1.0, 1.0)
        p.grad = torch.tensor([1.0, -1.0])
        opt.step()
        p.grad = None
    before_d, before_s = p_decay.detach().clone(), p_skip.detach().clone()
    opt_d.step()
    opt_s.step()
    assert torch.equal(p_skip, before_s)
    assert opt_s.global_step == 2
    # decay: weight decay shrinks, momentum keeps pushing against the last gradient's sign
    assert p_decay[0] < before_d[0] * (1 - 0.1 * 0.5) + 1e-7
    assert p_decay[1] > before_d[1] * (1 - 0.1 * 0.5)
