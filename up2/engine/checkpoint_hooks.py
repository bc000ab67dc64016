"""Checkpoint hooks of :class:`~up2.engine.trainer.UP2Trainer`: bounded periodic checkpoints and preemption.

* :class:`BoundedPeriodicCheckpointer`: Detectron2's periodic checkpointer that keeps the newest
  ``SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP`` periodic checkpoints in ``OUTPUT_DIR`` (those of earlier runs in
  the same directory included); ``model_final.pth`` is always kept.
* :class:`PreemptionHook`: a signal of ``SOLVER.UP2.PREEMPTION_SIGNALS`` (SIGTERM and SIGUSR1, as cluster
  schedulers send before they stop a job) lets the current iteration finish; then every rank stops at
  the same iteration, the main process writes ``model_NNNNNNN.pth`` atomically, and the run exits with
  status 128 + the signal number (143 for SIGTERM) and a message saying how to continue. ``--resume``
  continues from that checkpoint exactly as from a periodic one (:mod:`up2.engine.resume`).
"""
import logging
import os
import signal
import threading
from typing import List, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from up2.checkpoint.checkpointer import prune_periodic_checkpoints

__all__ = ["BoundedPeriodicCheckpointer", "PreemptionHook", "TrainingPreempted", "parse_signals",
           "max_checkpoints_to_keep", "ignore_preemption_signals", "PREEMPTION_EXIT_BASE"]

logger = logging.getLogger(__name__)

# A run stopped by signal N exits with status PREEMPTION_EXIT_BASE + N (the shell's convention).
PREEMPTION_EXIT_BASE = 128
# Signals that DataLoader workers ignore: the main process handles them and shuts the workers down.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def parse_signals(names: Sequence[str], key: str = "SOLVER.UP2.PREEMPTION_SIGNALS") -> List[signal.Signals]:
    """Signal names (``"SIGTERM"``) -> ``signal.Signals``; an unknown name is an error naming ``key``."""
    if isinstance(names, str):
        raise ValueError(f"{key} must be a list of signal names, e.g. ['SIGTERM', 'SIGUSR1'], got {names!r}")
    known = {s.name: s for s in signal.Signals}
    unknown = [name for name in names if name not in known or name in ("SIGKILL", "SIGSTOP")]
    if unknown:
        raise ValueError(f"{key}: {unknown} cannot be handled; expected signal names such as 'SIGTERM', "
                         "'SIGUSR1', 'SIGUSR2', 'SIGINT' (SIGKILL and SIGSTOP cannot be caught)")
    return [known[name] for name in dict.fromkeys(names)]


def max_checkpoints_to_keep(cfg) -> int:
    """``SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP`` (>= 0; 0 keeps every periodic checkpoint)."""
    value = cfg.SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP must be an integer >= 0 (0 keeps every periodic "
                         f"checkpoint), got {value!r}")
    return value


def ignore_preemption_signals(worker_id: int = 0):
    """DataLoader ``worker_init_fn``: the worker ignores the preemption signals, which a scheduler sends to
    every process of the job; the main process handles them and ends its workers."""
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class TrainingPreempted(SystemExit):
    """Raised (on every rank) once the checkpoint of a preempted run is written. A ``SystemExit`` whose
    code is 128 + the signal number: uncaught, the process exits with that status and no traceback."""

    def __init__(self, signum: int, iteration: int, checkpoint: str):
        super().__init__(PREEMPTION_EXIT_BASE + int(signum))
        self.signal_name = signal.Signals(signum).name
        self.iteration = int(iteration)
        self.checkpoint = checkpoint

    def __str__(self):
        return (f"Training stopped by {self.signal_name} after iteration {self.iteration}; checkpoint "
                f"{self.checkpoint}. Run the same command with --resume to continue from iteration "
                f"{self.iteration + 1}.")


class BoundedPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """``hooks.PeriodicCheckpointer`` that, after each periodic save, keeps only the newest
    ``max_to_keep`` periodic checkpoints of the save directory (:func:`prune_periodic_checkpoints`;
    Detectron2's own ``max_to_keep`` forgets the files of earlier runs)."""

    def __init__(self, checkpointer, period: int, max_to_keep: int, file_prefix: str = "model"):
        """
        Args:
            checkpointer: the trainer's checkpointer.
            period: ``SOLVER.CHECKPOINT_PERIOD``.
            max_to_keep: periodic checkpoints kept (0: all).
            file_prefix: checkpoint name prefix.
        """
        super().__init__(checkpointer, period, file_prefix=file_prefix)
        self.max_to_keep = int(max_to_keep)

    def step(self, iteration: int, **kwargs):
        super().step(iteration, **kwargs)
        if self.max_to_keep and (int(iteration) + 1) % self.period == 0 and self.checkpointer.save_to_disk:
            prune_periodic_checkpoints(self.checkpointer.save_dir, self.max_to_keep, self.file_prefix)


class PreemptionHook(HookBase):
    """Stops training at the end of the iteration during which one of ``signals`` arrived (see the module
    doc). Register it last, so that the checkpoint holds the state after every other hook's ``after_step``
    (the LR scheduler's step), as a periodic checkpoint does.

    The handlers are installed in ``before_train`` (main thread only) and the previous ones restored in
    ``after_train``. With several ranks, the ranks agree every iteration (one all-reduce of an integer) so
    that all of them stop at the same one, whichever received the signal.
    """

    def __init__(self, signals: Sequence[str], max_checkpoints_to_keep: int = 0, file_prefix: str = "model"):
        """
        Args:
            signals: signal names (``SOLVER.UP2.PREEMPTION_SIGNALS``).
            max_checkpoints_to_keep: periodic checkpoints kept after the preemption checkpoint (0: all).
            file_prefix: checkpoint name prefix (``{file_prefix}_NNNNNNN.pth``).
        """
        self.signals = parse_signals(signals)
        self.max_checkpoints_to_keep = int(max_checkpoints_to_keep)
        self.file_prefix = file_prefix
        self.received = 0  # number of the first signal received, 0 if none
        self._previous_handlers = {}

    def _on_signal(self, signum, frame):
        if not self.received:
            self.received = int(signum)

    def before_train(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: %s keep their default action",
                           [s.name for s in self.signals])
            return
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        logger.info("On %s, training stops after the current iteration with a checkpoint",
                    " or ".join(s.name for s in self.signals))

    def after_train(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _agreed_signal(self) -> int:
        """The signal received by any rank (the largest number if several), identical on every rank."""
        if comm.get_world_size() == 1:
            return self.received
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def after_step(self):
        signum = self._agreed_signal()
        if not signum:
            return
        trainer, name = self.trainer, signal.Signals(signum).name
        if trainer.iter + 1 >= trainer.max_iter:
            logger.info("%s arrived during the last iteration: training completes normally", name)
            return
        checkpointer = trainer.checkpointer
        basename = f"{self.file_prefix}_{trainer.iter:07d}"
        path = os.path.join(checkpointer.save_dir, basename + ".pth")
        if checkpointer.save_to_disk:
            if os.path.basename(checkpointer.get_checkpoint_file()) != basename + ".pth":  # not saved yet
                checkpointer.save(basename, iteration=trainer.iter)
            prune_periodic_checkpoints(checkpointer.save_dir, self.max_checkpoints_to_keep, self.file_prefix)
        comm.synchronize()  # the checkpoint is complete before any rank exits
        stop = TrainingPreempted(signum, trainer.iter, path)
        logger.warning("%s", stop)
        raise stop
