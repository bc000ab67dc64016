"""Unmixed task sampling: a pure function of (seed, iteration), frequencies s_k, exact resume, the
rank-agreement check, per-task iteration counts in EventStorage, and two gloo ranks agreeing."""
import json
import textwrap

import numpy as np
import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from up2.config import TaskEntry
from up2.data.build import MultiTaskDataLoader
from up2.engine import task_sampling
from up2.engine.task_sampling import TaskSampler, TaskSamplingHook

RATIOS = {"detection": 0.25, "classification": 0.1, "mlm": 0.05, "captioning": 0.3, "retrieval": 0.3}


def entries():
    return [TaskEntry(name=name, type=name, train_datasets=("x",), train_dataset_weights=(), test_datasets=(),
                      sampling_ratio=ratio, loss_weight=0.5 if name == "mlm" else 1.0, batch_size=2)
            for name, ratio in RATIOS.items()]


def sequence(sampler, start, stop):
    return [sampler.task_for_iteration(i).name for i in range(start, stop)]


def test_sequence_is_a_pure_function_of_seed_and_iteration():
    a, b = TaskSampler(entries(), seed=7), TaskSampler(entries(), seed=7)
    assert sequence(a, 0, 300) == sequence(b, 0, 300)
    assert sequence(a, 0, 300) != sequence(TaskSampler(entries(), seed=8), 0, 300)
    assert [a.task_for_iteration(i).name for i in (250, 3, 120)] == [sequence(b, 0, 300)[i] for i in (250, 3, 120)]


def test_frequencies_match_sampling_ratios():
    names = sequence(TaskSampler(entries(), seed=0), 0, 5000)
    for name, ratio in RATIOS.items():
        sigma = np.sqrt(ratio * (1 - ratio) / 5000)
        assert abs(names.count(name) / 5000 - ratio) < 4 * sigma, name


def test_zero_ratio_never_drawn_and_mixed_mode_returns_all():
    es = entries()
    es[0] = TaskEntry(**{**es[0].__dict__, "sampling_ratio": 0.0})
    assert "detection" not in sequence(TaskSampler(es, seed=1), 0, 2000)
    mixed = TaskSampler(es, seed=1, mode="mixed")
    assert [e.name for e in mixed.tasks_for_iteration(5)] == list(RATIOS)[1:]
    with pytest.raises(RuntimeError, match="unmixed"):
        mixed.task_for_iteration(5)
    with pytest.raises(ValueError, match="sometimes"):
        TaskSampler(es, seed=1, mode="sometimes")


class FakeOptimizer:
    def __init__(self):
        self.calls = []

    def set_task(self, sampling_ratio, loss_weight):
        self.calls.append((sampling_ratio, loss_weight))


class FakeTrainer:
    def __init__(self, storage):
        self.storage, self.optimizer, self.iter = storage, FakeOptimizer(), 0


def run_hook(hook, start, stop):
    """Runs hook.before_step for iterations [start, stop); returns (task names, optimizer calls, storage)."""
    names = []
    with EventStorage(start) as storage:
        trainer = FakeTrainer(storage)
        hook.trainer = trainer
        for it in range(start, stop):
            trainer.iter = storage.iter = it
            hook.before_step()
            names.append(trainer.current_task.name)
            assert trainer.current_tasks == [trainer.current_task]
    return names, trainer.optimizer.calls, storage


def test_hook_sets_task_optimizer_and_counts_in_storage():
    hook = TaskSamplingHook(TaskSampler(entries(), seed=3))
    names, calls, storage = run_hook(hook, 0, 40)
    assert names == sequence(TaskSampler(entries(), seed=3), 0, 40)
    by_name = {e.name: e for e in entries()}
    assert calls == [(by_name[n].sampling_ratio, by_name[n].loss_weight) for n in names]
    latest = storage.latest()
    for name in RATIOS:
        assert latest[f"task_iters/{name}"][0] == names.count(name) == hook.counts[name]
        assert storage.smoothing_hints()[f"task_iters/{name}"] is False


def test_resume_continues_the_same_sequence_and_counts():
    full_names, _, _ = run_hook(TaskSamplingHook(TaskSampler(entries(), seed=11)), 0, 100)
    first = TaskSamplingHook(TaskSampler(entries(), seed=11))
    run_hook(first, 0, 60)
    state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
    resumed = TaskSamplingHook(TaskSampler(entries(), seed=999))  # a fresh random seed: the checkpoint wins
    resumed.load_state_dict(state)
    names, _, storage = run_hook(resumed, 60, 100)
    assert names == full_names[60:]
    assert resumed.counts == {name: full_names.count(name) for name in RATIOS}
    assert storage.latest()["task_iters/captioning"][0] == full_names.count("captioning")


def test_check_agreement(monkeypatch):
    hook = TaskSamplingHook(TaskSampler(entries(), seed=3), check_agreement=True)
    monkeypatch.setattr(task_sampling.comm, "all_gather", lambda names: [names, names])
    run_hook(hook, 0, 5)
    monkeypatch.setattr(task_sampling.comm, "all_gather", lambda names: [["detection"], ["mlm"]])
    with pytest.raises(RuntimeError, match=r"rank 0: \['detection'\], rank 1: \['mlm'\]"):
        run_hook(hook, 5, 6)


def test_mixed_hook_uses_every_task():
    hook = TaskSamplingHook(TaskSampler(entries(), seed=3, mode="mixed"))
    with EventStorage(0) as storage:
        trainer = FakeTrainer(storage)
        hook.trainer = trainer
        hook.before_step()
    assert trainer.current_task is None and [t.name for t in trainer.current_tasks] == list(RATIOS)
    assert trainer.optimizer.calls == [(1.0, 1.0)]
    assert all(storage.latest()[f"task_iters/{n}"][0] == 1 for n in RATIOS)


class RecordingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, batch):
        self.seen.append(sorted({d["task"] for d in batch}))
        return {"loss": self.weight.sum() * 0 + float(len(batch))}


def test_detectron2_trainer_gets_the_sampled_task_batches():
    def fake_loader(name, size):
        while True:
            yield [{"task": name}] * size

    loader = MultiTaskDataLoader({name: fake_loader(name, 2) for name in RATIOS})
    model = RecordingModel()
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1))
    hook = TaskSamplingHook(TaskSampler(entries(), seed=5), data_loader=loader)
    trainer.register_hooks([hook])
    trainer.train(0, 30)
    assert model.seen == [[name] for name in sequence(TaskSampler(entries(), seed=5), 0, 30)]
    assert sum(hook.counts.values()) == 30


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import up2
    from detectron2.config import get_cfg
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage
    from up2.config import add_up2_config, get_task_entries
    from up2.engine import launch
    from up2.engine.task_sampling import TaskSamplingHook, build_task_sampler

    class Trainer:
        pass

    def worker(out_dir):
        cfg = get_cfg()
        add_up2_config(cfg)
        cfg.SEED = -1  # a random seed, shared by the ranks
        cfg.DATASETS.UP2.TASKS = [{"NAME": n, "TYPE": n, "TRAIN_DATASETS": ["x"], "SAMPLING_RATIO": r}
                                  for n, r in [("detection", 0.4), ("mlm", 0.3), ("retrieval", 0.3)]]
        hook = TaskSamplingHook(build_task_sampler(cfg, get_task_entries(cfg)), check_agreement=True)
        names = []
        with EventStorage(0) as storage:
            trainer = Trainer()
            trainer.storage = storage
            hook.trainer = trainer
            for it in range(20):
                trainer.iter = storage.iter = it
                hook.before_step()
                names.append(trainer.current_task.name)
        with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
            json.dump({"names": names, "seed": hook.sampler.seed}, f)

    if __name__ == "__main__":
        launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
""")


@pytest.mark.slow  # two spawned processes importing torch + Detectron2: about 30 s on 2 cores
def test_two_gloo_ranks_draw_the_same_tasks(run_two_ranks):
    rank0, rank1 = run_two_ranks(SCRIPT)
    assert rank0 == rank1 and len(rank0["names"]) == 20 and len(set(rank0["names"])) > 1
