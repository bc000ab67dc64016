"""Task sampling for multi-task training (paper §4.4, Table 4).

* ``"unmixed"`` (the paper's default): every iteration ONE task k, drawn with probability s_k, is
  trained by every GPU. The draw is a pure function of ``(seed, iteration)``
  (``numpy.random.default_rng([seed, iteration])``), so all ranks draw the same task without
  communication and ``--resume`` continues the same sequence.
* ``"mixed"`` (Table 4's baseline): every iteration uses every task with s_k > 0; each GPU's batch
  holds ``max(1, round(s_k * BATCH_SIZE_k))`` samples of task k (:func:`up2.data.build.mixed_batch_sizes`)
  and the loss is the sum of the tasks' weighted losses, so the optimizer is told s = 1, omega = 1.

:class:`TaskSamplingHook` applies the draw before each step.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.engine import HookBase
from detectron2.utils import comm

from up2.config import TaskEntry

__all__ = ["TaskSampler", "TaskSamplingHook", "build_task_sampler", "SAMPLING_MODES"]

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("unmixed", "mixed")


class TaskSampler:
    """Draws the task(s) of each iteration (see module doc)."""

    def __init__(self, entries: Sequence[TaskEntry], seed: int, mode: str = "unmixed"):
        """
        Args:
            entries: the tasks (``up2.config.get_task_entries``); s_k are renormalised here.
            seed: seed of the task sequence; must be identical on every rank (>= 0).
            mode: ``"unmixed"`` or ``"mixed"``.
        """
        if mode not in SAMPLING_MODES:
            raise ValueError(f"Task sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
        if not entries:
            raise ValueError("TaskSampler needs at least one task entry")
        ratios = np.asarray([e.sampling_ratio for e in entries], dtype=np.float64)
        if (ratios < 0).any() or ratios.sum() <= 0:
            raise ValueError(f"Invalid sampling ratios {dict((e.name, e.sampling_ratio) for e in entries)}")
        self.entries = list(entries)
        self.mode = mode
        self.seed = int(seed)
        self._cdf = np.cumsum(ratios / ratios.sum())
        self._cdf /= self._cdf[-1]

    @property
    def probabilities(self) -> Dict[str, float]:
        """Normalised s_k of each task."""
        return OrderedDict((e.name, float(p)) for e, p in zip(self.entries, np.diff(self._cdf, prepend=0.0)))

    def task_for_iteration(self, iteration: int) -> TaskEntry:
        """The task trained at ``iteration`` in unmixed sampling; a pure function of (seed, iteration)."""
        if self.mode != "unmixed":
            raise RuntimeError("task_for_iteration() is for unmixed sampling; use tasks_for_iteration()")
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        u = np.random.default_rng([self.seed, int(iteration)]).random()
        return self.entries[int(np.searchsorted(self._cdf, u, side="right"))]

    def tasks_for_iteration(self, iteration: int) -> List[TaskEntry]:
        """``[task_for_iteration(iteration)]`` in unmixed mode; every task with s_k > 0 in mixed mode."""
        if self.mode == "unmixed":
            return [self.task_for_iteration(iteration)]
        return [e for e in self.entries if e.sampling_ratio > 0]


class TaskSamplingHook(HookBase):
    """Chooses the task(s) of each training step.

    ``before_step`` sets ``trainer.current_tasks`` (list of :class:`TaskEntry`) and
    ``trainer.current_task`` (the entry in unmixed mode, ``None`` in mixed mode), calls
    ``trainer.optimizer.set_task(s_k, omega_k)`` when the optimizer has it (``(1, 1)`` in mixed mode),
    selects the task on ``data_loader`` (a :class:`~up2.data.build.MultiTaskDataLoader`) when given,
    counts iterations per task and writes the counts to the trainer's EventStorage as
    ``task_iters/<name>`` (so they reach ``metrics.json``). The counts and the seed are part of
    :meth:`state_dict`, saved with the trainer's checkpoint: a resumed run keeps both.
    """

    def __init__(self, sampler: TaskSampler, check_agreement: bool = False, data_loader=None):
        """
        Args:
            sampler: the task sampler.
            check_agreement: all-gather the drawn task names every step and raise if ranks disagree.
            data_loader: optional object with ``select(task_names)``.
        """
        self.sampler = sampler
        self.check_agreement = check_agreement
        self.data_loader = data_loader
        self.counts = OrderedDict((e.name, 0) for e in sampler.entries)

    def before_step(self):
        iteration = self.trainer.iter
        tasks = self.sampler.tasks_for_iteration(iteration)
        names = [t.name for t in tasks]
        if self.check_agreement:
            self._check_agreement(iteration, names)
        self.trainer.current_tasks = tasks
        self.trainer.current_task = tasks[0] if self.sampler.mode == "unmixed" else None
        set_task = getattr(getattr(self.trainer, "optimizer", None), "set_task", None)
        if set_task is not None:
            if self.sampler.mode == "unmixed":
                set_task(sampling_ratio=tasks[0].sampling_ratio, loss_weight=tasks[0].loss_weight)
            else:
                set_task(sampling_ratio=1.0, loss_weight=1.0)
        if self.data_loader is not None:
            self.data_loader.select(names)
        for name in names:
            self.counts[name] += 1
        storage = self.trainer.storage
        for name, count in self.counts.items():
            storage.put_scalar(f"task_iters/{name}", count, smoothing_hint=False)

    def after_step(self):
        """Logs the step's total loss under its task (``task_loss/<name>`` in metrics.json / TensorBoard):
        Detectron2 logs a single-loss dict only as ``total_loss``, mixing the tasks."""
        storage = self.trainer.storage
        tasks = getattr(self.trainer, "current_tasks", None)
        if not tasks or "total_loss" not in storage.histories():
            return
        value, iteration = storage.history("total_loss").values()[-1]
        if iteration == storage.iter:  # written by this step (main process)
            storage.put_scalar(f"task_loss/{'+'.join(t.name for t in tasks)}", value)

    @staticmethod
    def _check_agreement(iteration: int, names: List[str]):
        gathered = comm.all_gather(list(names))
        if any(g != gathered[0] for g in gathered):
            per_rank = ", ".join(f"rank {r}: {g}" for r, g in enumerate(gathered))
            raise RuntimeError(f"Ranks drew different tasks at iteration {iteration} ({per_rank}); every rank "
                               "must build the TaskSampler with the same seed and task entries")

    def state_dict(self):
        return {"seed": self.sampler.seed, "counts": dict(self.counts)}

    def load_state_dict(self, state_dict):
        seed = int(state_dict["seed"])
        if seed != self.sampler.seed:
            logger.info("Task sampling: resuming the checkpoint's task sequence (seed %d, config gave %d)",
                        seed, self.sampler.seed)
            self.sampler.seed = seed
        unknown = sorted(set(state_dict["counts"]) - set(self.counts))
        if unknown:
            logger.warning("Task sampling: the checkpoint counts iterations of tasks %s that are not "
                           "configured any more; their counts are dropped", unknown)
        for name in self.counts:
            self.counts[name] = int(state_dict["counts"].get(name, 0))


def build_task_sampler(cfg, entries: Sequence[TaskEntry], seed: Optional[int] = None) -> TaskSampler:
    """``TaskSampler`` from ``SOLVER.UP2.SAMPLING``; seed ``cfg.SEED`` when >= 0, else one random seed
    shared by all ranks (saved in the checkpoint by :class:`TaskSamplingHook`)."""
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    return TaskSampler(entries, seed=seed, mode=cfg.SOLVER.UP2.SAMPLING)
