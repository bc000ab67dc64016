"""Exact ``--resume`` (up2.engine.resume): a multi-task run of the tiny UniPerceiverV2 stopped after k
iterations and resumed ends bitwise equal to an uninterrupted run of 2k iterations; the resumable
loaders continue their streams (batches and augmentations) whatever the number of workers; the
per-iteration seeding does not depend on the past."""
import random
import shutil

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler

from up2.engine import UP2Trainer
from up2.engine.resume import IterationSeedHook, ResumableTaskLoader, build_map_style_batches
from up2.engine.task_sampling import build_task_sampler


def _augmenting_mapper(d):
    """A mapper whose output depends on the global RNGs (as Detectron2's augmentations do)."""
    return {"id": d["id"], "np": float(np.random.rand()), "py": random.random(), "torch": float(torch.rand(()))}


def _loader(num_workers: int, group_ids=None, batch_size: int = 3):
    dicts = [{"id": i} for i in range(10)]
    make = build_map_style_batches(dicts, _augmenting_mapper, lambda seed: TrainingSampler(len(dicts), seed=seed),
                                   batch_size=batch_size, num_workers=num_workers, group_ids=group_ids)
    return ResumableTaskLoader("toy", make, seed=5, exact=True)


def _take(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("group_ids", [None, [i % 2 for i in range(10)]])
def test_resumed_loader_continues_the_stream_whatever_the_workers(group_ids):
    reference = _take(_loader(0, group_ids), 7)
    assert len({d["np"] for batch in reference for d in batch}) == 21  # every sample drew its own numbers
    if group_ids is not None:
        assert all(len({d["id"] % 2 for d in batch}) == 1 for batch in reference)
    with_workers = _take(_loader(2, group_ids), 7)
    assert with_workers == reference

    first = _loader(0, group_ids)
    _take(first, 4)
    assert first.state_dict() == {"seed": 5, "position": 4}
    for num_workers in (0, 2):
        resumed = _loader(num_workers, group_ids)
        resumed.load_state_dict(first.state_dict())
        assert _take(resumed, 3) == reference[4:]
        assert resumed.position == 7


def test_loader_leaves_the_global_rngs_alone_and_starts_once():
    loader = _loader(0)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = torch.rand(()), np.random.rand(), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    _take(loader, 2)  # (a DataLoader draws its workers' base seed from torch's RNG when given no generator)
    assert (torch.rand(()), np.random.rand(), random.random()) == expected
    with pytest.raises(RuntimeError, match="iterated only once"):
        iter(loader).__next__()
    with pytest.raises(RuntimeError, match="already started"):
        loader.load_state_dict({"seed": 5, "position": 0})


def test_iteration_seed_depends_only_on_seed_rank_and_iteration():
    class Trainer:
        iter = 7

    def draws(hook):
        hook.trainer = Trainer()
        hook.before_step()
        return float(torch.rand(())), float(np.random.rand()), random.random()

    first = draws(IterationSeedHook(3))
    torch.rand(100), np.random.rand(100), random.random()  # whatever happened before the step
    assert draws(IterationSeedHook(3)) == first
    assert draws(IterationSeedHook(4)) != first
    Trainer.iter = 8
    assert draws(IterationSeedHook(3)) != first


def _record_batches(trainer):
    """Records (task, per-sample fingerprint) of every training batch the model receives."""
    seen = []

    def fingerprint(x):
        return x["text"] if "text" in x else float(x["image"].float().sum())

    def pre_hook(module, args):
        if module.training:
            seen.append((args[0][0]["task"], [fingerprint(x) for x in args[0]]))

    trainer.model.register_forward_pre_hook(pre_hook)
    return seen


def _assert_same(a, b, where):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_resume_after_k_iterations_is_bitwise_equal_to_an_uninterrupted_run(tiny_multitask_cfg, tmp_path):
    k = 3
    full_cfg = tiny_multitask_cfg(tmp_path / "full", max_iter=2 * k)
    full_cfg.SOLVER.CHECKPOINT_PERIOD = k
    from up2.config import get_task_entries

    tasks = [build_task_sampler(full_cfg, get_task_entries(full_cfg)).task_for_iteration(i).name for i in range(2 * k)]
    # the test is meaningful: some task runs in both halves (its loader must continue, not restart)
    assert set(tasks[:k]) & set(tasks[k:]), tasks

    full = UP2Trainer(full_cfg)
    full_batches = _record_batches(full)
    full.resume_or_load(resume=False)
    full.train()

    # the stopped run: its checkpoint after iteration k, alone in a new output directory
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / f"model_{k - 1:07d}.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text(f"model_{k - 1:07d}.pth")
    torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)  # a new process has other RNG states
    resumed = UP2Trainer(tiny_multitask_cfg(resumed_dir, max_iter=2 * k))
    resumed_batches = _record_batches(resumed)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == k
    resumed.train()

    assert [task for task, _ in full_batches] == _task_types(full_cfg, tasks)
    assert resumed_batches == full_batches[k:]  # same samples, same augmentations
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert list(full_state) == list(resumed_state)
    for name in full_state:
        assert torch.equal(full_state[name], resumed_state[name]), name
    full_optimizer, resumed_optimizer = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert len(full_optimizer["state"]) > 0
    _assert_same(full_optimizer, resumed_optimizer, "optimizer")
    _assert_same(full.scheduler.state_dict(), resumed.scheduler.state_dict(), "scheduler")


def _task_types(cfg, names):
    from up2.config import get_task_entries

    types = {e.name: e.type for e in get_task_entries(cfg)}
    return [types[name] for name in names]
