"""SOLVER.AMP.ENABLED: UP2Trainer trains under torch.autocast with SOLVER.UP2.AMP_DTYPE on CPU (bfloat16:
no grad scaler; float16: a GradScaler that is checkpointed)."""
import math

import pytest
import torch
from detectron2.config import get_cfg

from up2.config import add_up2_config
from up2.engine import UP2Trainer
from up2.engine.trainer import AutocastTrainer, amp_dtype


class LinearModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        with torch.no_grad():  # small outputs: float16 gradients scaled by GradScaler's 2**16 stay finite
            self.linear.weight.fill_(0.1), self.linear.bias.zero_()
        self.output_dtypes = []

    def forward(self, batch):
        out = self.linear(torch.stack([x["x"] for x in batch]))
        self.output_dtypes.append(out.dtype)
        return {"loss": out.float().pow(2).mean()}


def _batches():
    while True:
        yield [{"x": torch.full((4,), 0.01)}, {"x": torch.full((4,), 0.02)}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_trainer_runs_the_forward_in_the_dtype(dtype):
    from detectron2.utils.events import EventStorage

    model = LinearModel()
    before = model.linear.weight.detach().clone()
    trainer = AutocastTrainer(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.1), dtype)
    with EventStorage(0):
        trainer.run_step()
    assert model.output_dtypes == [dtype]
    assert not torch.equal(model.linear.weight, before)
    assert (trainer.grad_scaler is None) == (dtype == torch.bfloat16)
    assert ("grad_scaler" in trainer.state_dict()) == (dtype == torch.float16)


def test_amp_dtype_is_validated():
    cfg = get_cfg()
    add_up2_config(cfg)
    assert amp_dtype(cfg) == torch.bfloat16
    cfg.SOLVER.UP2.AMP_DTYPE = "float8"
    with pytest.raises(ValueError, match="SOLVER.UP2.AMP_DTYPE.*float8"):
        amp_dtype(cfg)


@pytest.mark.slow
def test_tiny_up2_trains_under_bfloat16_autocast_on_cpu(tiny_multitask_cfg, tmp_path):
    cfg = tiny_multitask_cfg(tmp_path, tasks=("detection", "mlm"), max_iter=2)
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.UP2.AMP_DTYPE = "bfloat16"
    trainer = UP2Trainer(cfg)
    assert isinstance(trainer._trainer, AutocastTrainer) and trainer._trainer.grad_scaler is None
    tasks, losses, autocast_dtypes = [], [], []

    def record(module, inputs, outputs):
        tasks.append(inputs[0][0]["task"])
        autocast_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        losses.append({name: float(value.detach()) for name, value in outputs.items()})

    trainer.model.register_forward_hook(record)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert "detection" in tasks and autocast_dtypes == [torch.bfloat16, torch.bfloat16]
    assert len(losses) == 2 and all(math.isfinite(v) for step in losses for v in step.values())
    after = list(trainer.model.parameters())
    assert all(bool(p.isfinite().all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
