"""Exact ``--resume`` of multi-task runs: a run stopped after iteration k and resumed continues with
the same batches, the same augmentations and the same random numbers as a run that never stopped
(bitwise on CPU; on GPU up to the non-determinism of the kernels).

Three things make the state after step k a pure function of the checkpoint:

* **Random numbers of the step.** :class:`IterationSeedHook` reseeds python's, numpy's and torch's
  global RNGs before every step from ``(seed, rank, iteration)`` (the approach of fairseq's
  ``set_torch_seed(seed + num_updates)``), so dropout, drop-path, DN noise, MLM masking and point
  sampling need no RNG state in the checkpoint, on any rank. Only the seed is saved.
* **Which samples each task's batches hold.** A :class:`ResumableTaskLoader` counts the batches it
  has handed out (its *position*), which :class:`~up2.engine.trainer.UP2Trainer` saves in the
  checkpoint. Map-style tasks (:func:`build_map_style_batches`) form batches of ``(position, index)``
  pairs from the task's sampler in the main process: batch b of a rank is a pure function of
  ``(seed, rank, world size, b)`` whatever the number of DataLoader workers, and a resumed loader
  skips the first ``position`` batches by drawing indices only (no image is read).
* **The augmentation of each sample.** Every sample is mapped with the global RNGs seeded from
  ``(seed, rank, position of the sample in the rank's stream)``, in a worker or in the main process
  (where the RNG states are restored afterwards), so the worker that maps it does not matter. An item
  whose image cannot be read is replaced by one drawn from the same seed
  (:class:`~up2.data.bad_samples.SkippingMapDataset`): a resumed run replaces it identically.

The rest of the state is in Detectron2's checkpoint: model, iteration, LR scheduler, task-sampling
counts, and (added by :class:`~up2.engine.trainer.UP2Trainer`) the optimizer and grad scaler.

Not exact: tasks streamed from tar shards (:mod:`up2.data.streams`) restart on resume with a stream
seeded by ``(seed, position)``: fresh data rather than a replay of the samples already trained on.
Single-task runs (``DATASETS.TRAIN``, Detectron2's loader) also get a fresh data order, as in Detectron2.
"""
import contextlib
import itertools
import logging
import random
from collections import defaultdict
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data import DatasetFromList
from detectron2.data.build import trivial_batch_collator
from detectron2.engine import HookBase
from detectron2.utils import comm

from up2.config import TaskEntry
from up2.engine.checkpoint_hooks import ignore_preemption_signals

__all__ = ["derive_seed", "seeded_global_rngs", "IterationSeedHook", "ResumableTaskLoader",
           "build_map_style_batches", "build_resumable_task_loaders"]

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of the non-negative integers ``keys``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_global_rngs(seed: int):
    """Seeds python's ``random``, numpy's global RNG and torch's generators (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Runs the block with python's, numpy's and torch's CPU global RNGs seeded with ``seed`` and
    restores their previous states afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class IterationSeedHook(HookBase):
    """Before every step, seeds the global RNGs with ``derive_seed(seed, rank, iteration)``.

    The random numbers of a step then depend on nothing that happened before it, so a resumed run
    draws the same ones as an uninterrupted run. ``seed`` is saved in the checkpoint and a resumed
    run keeps the checkpoint's.
    """

    def __init__(self, seed: int):
        """
        Args:
            seed: identical on every rank (>= 0); ranks get different streams through their rank.
        """
        self.seed = int(seed)

    def before_step(self):
        seed_global_rngs(derive_seed(self.seed, comm.get_rank(), self.trainer.iter))

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])


class ResumableTaskLoader:
    """A task's infinite train loader whose position (number of batches handed out) is checkpointed.

    ``make_batches(seed, start)`` returns the task's batches (``list[dict]``) from batch number
    ``start`` on; it is called once, on the first ``iter()``, after :meth:`load_state_dict` has
    restored ``seed`` and ``position`` in a resumed run. Iterator creation does not touch the global
    torch RNG (a DataLoader draws its workers' base seed from it).
    """

    def __init__(self, name: str, make_batches: Callable[[int, int], Iterable[list]], seed: int, exact: bool):
        """
        Args:
            name: the task's name (messages).
            make_batches: see the class doc.
            seed: seed of the stream, identical on every rank.
            exact: whether ``make_batches(seed, start)`` continues the stream of ``make_batches(seed, 0)``
                exactly (map-style datasets) or only starts a fresh one (tar-shard streams).
        """
        self.name = name
        self.seed = int(seed)
        self.position = 0
        self.exact = exact
        self._make_batches = make_batches
        self._started = False

    def __iter__(self) -> Iterator[list]:
        if self._started:
            raise RuntimeError(f"The train loader of task '{self.name}' can be iterated only once")
        self._started = True
        if self.position and not self.exact:
            logger.info("Task '%s': its streamed datasets restart with a fresh order after %d batches",
                        self.name, self.position)
        with torch.random.fork_rng(devices=[]):
            batches = iter(self._make_batches(self.seed, self.position))
        for batch in batches:
            self.position += 1  # before yielding: a checkpoint after this step counts this batch
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state_dict: Dict[str, int]):
        if self._started:
            raise RuntimeError(f"Cannot restore the position of task '{self.name}''s loader: it already started")
        self.seed, self.position = int(state_dict["seed"]), int(state_dict["position"])


class _PositionedBatches:
    """Batches of ``(position, index)`` pairs: ``index`` is the ``position``-th index of ``sampler``
    (this rank's stream). With ``group_ids`` a batch holds indices of one group only (Detectron2's
    aspect-ratio grouping, done on indices). The first ``start`` batches are skipped."""

    def __init__(self, sampler: Iterable[int], batch_size: int, start: int, group_ids: Optional[np.ndarray] = None):
        self.sampler, self.batch_size, self.start, self.group_ids = sampler, batch_size, start, group_ids

    def _batches(self):
        buffers = defaultdict(list)
        for position, index in enumerate(self.sampler):
            buffer = buffers[0 if self.group_ids is None else int(self.group_ids[index])]
            buffer.append((position, int(index)))
            if len(buffer) == self.batch_size:
                yield list(buffer)
                buffer.clear()

    def __iter__(self):
        return itertools.islice(self._batches(), self.start, None)


class _SeededMapDataset(torchdata.Dataset):
    """``dataset[(position, index)]`` maps item ``index`` with the global RNGs seeded from
    ``(seed, rank, position)``; an unreadable item (or a mapper result of None) is replaced by an item
    drawn from the same seed (:meth:`SkippingMapDataset.map_item`)."""

    def __init__(self, dataset, seed: int, rank: int):
        self._dataset, self._seed, self._rank = dataset, seed, rank

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key):
        position, index = key
        seed = derive_seed(self._seed, self._rank, position)
        with seeded_global_rngs(seed):
            return self._dataset.map_item(index, np.random.default_rng(seed))


def build_map_style_batches(dicts: List[dict], mapper, make_sampler: Callable[[int], Iterable[int]], batch_size: int,
                            num_workers: int, group_ids: Optional[Sequence[int]] = None, tracker=None):
    """``make_batches(seed, start)`` of a :class:`ResumableTaskLoader` over dataset dicts.

    Args:
        dicts: the task's dataset dicts.
        mapper: callable dict -> model input dict.
        make_sampler: ``seed -> `` this rank's infinite stream of indices into ``dicts``.
        batch_size: per-GPU batch size.
        num_workers: DataLoader workers.
        group_ids: optional group of each dict (batches hold one group).
        tracker (BadSampleTracker): the datasets of ``dicts`` (names, sizes) where unreadable items are
            counted; default one unnamed dataset.

    Returns:
        callable ``(seed, start) ->`` DataLoader of ``list[dict]`` batches from batch ``start`` on.
    """
    from up2.data.bad_samples import BadSampleTracker, SkippingMapDataset

    group_ids = None if group_ids is None else np.asarray(group_ids)
    tracker = BadSampleTracker(["<dataset dicts>"], [len(dicts)]) if tracker is None else tracker
    dataset = SkippingMapDataset(DatasetFromList(dicts, copy=False), mapper, tracker, group_ids)

    def make_batches(seed: int, start: int):
        rank = comm.get_rank()
        batches = _PositionedBatches(make_sampler(seed), batch_size, start, group_ids)
        return torchdata.DataLoader(_SeededMapDataset(dataset, seed, rank), batch_sampler=batches,
                                    num_workers=num_workers, collate_fn=trivial_batch_collator,
                                    worker_init_fn=ignore_preemption_signals if num_workers else None,
                                    generator=torch.Generator().manual_seed(derive_seed(seed, rank, start)))

    return make_batches


def _loader_seed(cfg, entry: TaskEntry) -> int:
    from up2.data.build import task_loader_seed

    seed = task_loader_seed(cfg, entry.name)
    return comm.shared_random_seed() if seed is None else seed


def _build_task_loader(cfg, entry: TaskEntry, batch_size: int) -> ResumableTaskLoader:
    from up2.data.build import _train_sampler, build_task_train_loader, log_task_loader, task_bad_sample_tracker
    from up2.data.catalog import is_streaming_dataset, load_task_dataset_dicts
    from up2.data.mappers import build_mapper

    seed = _loader_seed(cfg, entry)
    if any(is_streaming_dataset(name) for name in entry.train_datasets):
        first = build_task_train_loader(cfg, entry, batch_size=batch_size, seed=seed)  # checks the files now

        def make_stream(stream_seed: int, start: int):
            if (stream_seed, start) == (seed, 0):
                return first
            return build_task_train_loader(cfg, entry, batch_size=batch_size, seed=derive_seed(stream_seed, start))

        return ResumableTaskLoader(entry.name, make_stream, seed, exact=False)

    dicts, sizes = load_task_dataset_dicts(cfg, entry.type, entry.train_datasets)
    group_ids = None
    if entry.type == "detection" and cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        # Detectron2 groups mapped images by orientation; the original sizes give it before mapping
        group_ids = [0 if d.get("width", 0) > d.get("height", 0) else 1 for d in dicts]
    log_task_loader(cfg, entry, len(dicts), batch_size)
    make_batches = build_map_style_batches(
        dicts, build_mapper(cfg, entry.type, is_train=True),
        lambda sampler_seed: _train_sampler(cfg, entry, dicts, sizes, sampler_seed), batch_size,
        cfg.DATALOADER.NUM_WORKERS, group_ids, task_bad_sample_tracker(cfg, entry, sizes))
    return ResumableTaskLoader(entry.name, make_batches, seed, exact=True)


def build_resumable_task_loaders(cfg) -> Dict[str, ResumableTaskLoader]:
    """``{task_name: ResumableTaskLoader}`` for every entry of ``DATASETS.UP2.TASKS`` with
    ``SAMPLING_RATIO > 0``: the loaders of :func:`up2.data.build.build_task_train_loaders` (same
    samplers, mappers, batch sizes, mixed-mode batch sizes), made resumable (see the module doc)."""
    from up2.data.build import sampled_task_batch_sizes

    return {e.name: _build_task_loader(cfg, e, size) for e, size in sampled_task_batch_sizes(cfg)}
