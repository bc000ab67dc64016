"""Parameter groups, the config-driven optimizer builder, and Detectron2's LR scheduler on top."""
import pytest
import torch
from torch import nn

import up2  # noqa: F401  (before detectron2)
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.solver import build_lr_scheduler

from up2.config import add_up2_config
from up2.solver import MTAdamW, TaskAdamW, build_optimizer, build_param_groups

LR, WD = 1e-3, 0.05


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
        self.proj = nn.Linear(6, 8)  # not under "text_encoder.encoder." → not an encoder param


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), FrozenBatchNorm2d(4),
                                      nn.BatchNorm2d(4))
        self.text_encoder = TextEncoder()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.embed.weight  # tied: must appear once
        self.logit_scale = nn.Parameter(torch.ones(()))
        self.query_embed = nn.Parameter(torch.zeros(5, 8))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


ENC_LR = LR * 0.1
EXPECTED = {  # name → (lr, weight_decay) with weight_decay_norm=0.0, bias=0.01, embed=0.02
    "backbone.0.weight": (ENC_LR, WD),
    "backbone.0.bias": (ENC_LR, 0.01),
    "backbone.1.weight": (ENC_LR, 0.0),
    "backbone.1.bias": (ENC_LR, 0.0),
    "backbone.3.weight": (ENC_LR, 0.0),
    "backbone.3.bias": (ENC_LR, 0.0),
    "text_encoder.encoder.0.weight": (ENC_LR, WD),
    "text_encoder.encoder.0.bias": (ENC_LR, 0.01),
    "text_encoder.encoder.1.weight": (ENC_LR, 0.0),
    "text_encoder.encoder.1.bias": (ENC_LR, 0.0),
    "text_encoder.proj.weight": (LR, WD),
    "text_encoder.proj.bias": (LR, 0.01),
    "embed.weight": (LR, 0.02),
    "head.weight": (LR, WD),
    "head.bias": (LR, 0.01),
    "norm.weight": (LR, 0.0),
    "norm.bias": (LR, 0.0),
    "logit_scale": (LR, 0.0),
    "query_embed": (LR, 0.02),
}


def _groups(model, **kwargs):
    defaults = dict(base_lr=LR, weight_decay=WD, weight_decay_norm=0.0, weight_decay_bias=0.01,
                    weight_decay_embed=0.02)
    defaults.update(kwargs)
    return build_param_groups(model, **defaults)


def test_each_parameter_lr_and_weight_decay():
    model = Small()
    groups = _groups(model)
    where = {}
    for gi, group in enumerate(groups):
        for p in group["params"]:
            assert id(p) not in where, "parameter in two groups"
            where[id(p)] = gi
    names = dict(model.named_parameters())  # deduplicated: the tied weight once
    trainable = {n: p for n, p in names.items() if p.requires_grad}
    assert set(where) == {id(p) for p in trainable.values()}
    assert set(trainable) == set(EXPECTED)
    for name, p in trainable.items():
        group = groups[where[id(p)]]
        assert (group["lr"], group["weight_decay"]) == pytest.approx(EXPECTED[name]), name


def test_groups_are_merged_and_named():
    groups = _groups(Small())
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys)) == len(set(EXPECTED.values())) == 7
    by_key = {(g["lr"], g["weight_decay"]): g["name"] for g in groups}
    assert by_key[(LR, 0.0)] == "other.norm,other.temperature"
    assert by_key[(ENC_LR, 0.0)] == "encoder.norm"
    assert by_key[(LR, 0.02)] == "other.embed"
    # with equal weight decays, bias / norm / embed / temperature merge into one group per lr
    merged = _groups(Small(), weight_decay_norm=0.0, weight_decay_bias=0.0, weight_decay_embed=0.0)
    assert len(merged) == 4
    none_means_wd = _groups(Small(), weight_decay_norm=None, weight_decay_bias=None,
                            weight_decay_embed=None)
    # None → WEIGHT_DECAY: only the temperature keeps 0 (encoder has none)
    assert sorted(g["weight_decay"] for g in none_means_wd) == [0.0, WD, WD]
    assert [g["name"] for g in none_means_wd if g["weight_decay"] == 0.0] == ["other.temperature"]


def test_no_encoder_prefixes_and_string_rejected():
    groups = _groups(Small(), encoder_prefixes=())
    assert {g["lr"] for g in groups} == {LR}
    with pytest.raises(ValueError, match="encoder_prefixes"):
        _groups(Small(), encoder_prefixes="backbone.")


def test_one_multiplier_per_prefix():
    """ENCODER_LR_MULTIPLIERS: the backbone at 0.1x, the text encoder at 0.5x, the rest at base lr."""
    model = Small()
    groups = _groups(model, encoder_prefixes=("backbone.", "text_encoder.encoder."), encoder_lr_multiplier=[0.1, 0.5])
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expected = LR * 0.1 if name.startswith("backbone.") else LR * 0.5 if name.startswith(
            "text_encoder.encoder.") else LR
        assert lr_of[id(param)] == pytest.approx(expected), name
    with pytest.raises(ValueError, match="ENCODER_LR_MULTIPLIERS has 1 values.*2 SOLVER.UP2.ENCODER_PARAM_PREFIXES"):
        _groups(Small(), encoder_prefixes=("backbone.", "text_encoder.encoder."), encoder_lr_multiplier=[0.1])
    cfg = _cfg(**{"UP2.ENCODER_PARAM_PREFIXES": ["backbone.", "text_encoder.encoder."],
                  "UP2.ENCODER_LR_MULTIPLIERS": [0.1, 0.5]})
    lrs = sorted({g["lr"] for g in build_optimizer(cfg, Small()).param_groups})
    assert lrs == pytest.approx([0.01, 0.05, 0.1])


def test_module_lr_multipliers():
    """MODULE_PARAM_PREFIXES: a from-scratch module at 5x; an encoder prefix wins over a module prefix."""
    model = Small()
    groups = _groups(model, encoder_prefixes=("backbone.", "text_encoder.encoder."), encoder_lr_multiplier=0.1,
                     module_prefixes=("head.", "text_encoder."), module_lr_multipliers=[5.0, 2.0])
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    name_of = {id(p): g["name"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["head.weight"])] == pytest.approx(LR * 5.0)
    assert lr_of[id(params["text_encoder.proj.weight"])] == pytest.approx(LR * 2.0)
    assert lr_of[id(params["text_encoder.encoder.0.weight"])] == pytest.approx(LR * 0.1)
    assert lr_of[id(params["norm.weight"])] == pytest.approx(LR)
    assert name_of[id(params["head.weight"])] == "module.weight"
    with pytest.raises(ValueError, match="MODULE_LR_MULTIPLIERS has 1 values.*2 SOLVER.UP2.MODULE_PARAM_PREFIXES"):
        _groups(Small(), module_prefixes=("head.", "norm."), module_lr_multipliers=[5.0])
    cfg = _cfg(**{"UP2.MODULE_PARAM_PREFIXES": ["head."], "UP2.MODULE_LR_MULTIPLIERS": [5.0]})
    lrs = sorted({g["lr"] for g in build_optimizer(cfg, Small()).param_groups})
    assert lrs == pytest.approx([0.01, 0.1, 0.5])


def _cfg(**solver):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 0.01
    cfg.SOLVER.MAX_ITER = 10
    cfg.SOLVER.STEPS = (6,)
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.WARMUP_ITERS = 4
    cfg.SOLVER.WARMUP_FACTOR = 0.1
    cfg.SOLVER.WARMUP_METHOD = "linear"
    for key, value in solver.items():
        node, attr = cfg.SOLVER, key
        if "." in key:
            sub, attr = key.split(".")
            node = cfg.SOLVER[sub]
        node[attr] = value
    return cfg


def _multiplier(it):
    if it < 4:
        alpha = it / 4
        return 0.1 * (1 - alpha) + alpha
    return 1.0 if it < 6 else 0.1


@pytest.mark.parametrize("name,cls", [("MTAdamW", MTAdamW), ("AdamW", TaskAdamW)])
def test_build_optimizer_and_warmup_multistep(name, cls):
    model = Small()
    cfg = _cfg(**{"UP2.OPTIMIZER": name, "UP2.BETAS": [0.8, 0.99], "UP2.EPS": 1e-6})
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, cls)
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in opt.param_groups)
    wds = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wds["other.bias,other.weight"] == 0.01  # WEIGHT_DECAY_BIAS None → WEIGHT_DECAY
    assert wds["other.embed,other.norm,other.temperature"] == 0.0
    assert wds["encoder.norm"] == 0.0 and len(wds) == 4
    base = {g["name"]: g["lr"] for g in opt.param_groups}
    assert base["encoder.bias,encoder.weight"] == pytest.approx(0.01)
    assert base["other.bias,other.weight"] == 0.1
    scheduler = build_lr_scheduler(cfg, opt)
    for it in range(10):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base[g["name"]] * _multiplier(it)), (it, g["name"])
        model.zero_grad()
        model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
        opt.set_task(0.5, 1.0)  # AdamW accepts and ignores it
        opt.step()
        scheduler.step()


def test_build_optimizer_errors():
    with pytest.raises(ValueError, match="SOLVER.UP2.OPTIMIZER.*'SGD'.*MTAdamW.*AdamW"):
        build_optimizer(_cfg(**{"UP2.OPTIMIZER": "SGD"}), Small())
    with pytest.raises(ValueError, match="SOLVER.UP2.UNUSED_PARAMS.*'zero'"):
        build_optimizer(_cfg(**{"UP2.UNUSED_PARAMS": "zero"}), Small())
    opt = build_optimizer(_cfg(**{"UP2.OPTIMIZER": "AdamW"}), Small())
    with pytest.raises(ValueError, match="sampling_ratio"):
        opt.set_task(2.0, 1.0)


@pytest.mark.parametrize("name", ["MTAdamW", "AdamW"])
def test_gradient_clipping_by_value(name):
    """CLIP_GRADIENTS wraps both classes: a huge gradient clipped by value gives the update of the
    clipped gradient."""
    def run(clip, grad_values):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        cfg = _cfg(**{"UP2.OPTIMIZER": name, "UP2.NORMALIZE_GRADIENT": False})
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = clip
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
        opt = build_optimizer(cfg, model)
        assert ("WithGradientClip" in type(opt).__name__) == clip
        opt.set_task(1.0, 1.0)
        for value in grad_values:  # varying magnitudes: Adam is not invariant to clipping them
            for p in model.parameters():
                p.grad = torch.full_like(p, value)
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    clipped = run(True, [100.0, 0.2, -0.3])
    for a, b in zip(clipped, run(False, [0.5, 0.2, -0.3])):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(clipped[0], run(False, [100.0, 0.2, -0.3])[0])
    sd = build_optimizer(_cfg(**{"UP2.OPTIMIZER": name}), nn.Linear(3, 1)).state_dict()
    assert "param_groups" in sd
