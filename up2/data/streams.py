"""Streaming loaders: tasks whose training datasets include tar shards (:mod:`up2.data.shards`).

A task with at least one shard dataset is loaded by :class:`TaskStream`, an ``IterableDataset``
that runs in each DataLoader worker of each rank: for every sample it draws a dataset with the
task's probabilities (``TRAIN_DATASET_WEIGHTS``, or size ** ``DATASETS.UP2.SIZE_WEIGHT_POWER`` where
the size of a shard dataset is the number of samples declared by its ``shards.json``), takes that
dataset's next sample for this worker and maps it. Shard datasets are split over workers by shard
(see :mod:`up2.data.shards`); map-style datasets (dataset dicts, e.g. COCO Karpathy) by position in
a shared stream of shuffled epochs (global worker ``g`` of ``W`` keeps positions ``g, g + W, ...``,
like Detectron2's ``TrainingSampler``). A sample that cannot be used is skipped, counted and replaced by
the next one drawn (:mod:`up2.data.bad_samples`).
"""
import logging
from typing import List, Optional, Sequence, Union

import numpy as np
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog, DatasetFromList
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.utils import comm

from up2.data.bad_samples import BadSampleTracker
from up2.data.catalog import is_streaming_dataset, load_task_dataset_dicts
from up2.data.mappers import ImageReadError
from up2.data.samplers import dataset_sampling_weights
from up2.data.shards import ImageTextShards

__all__ = ["TaskStream", "ListStream", "build_streaming_train_loader", "build_streaming_test_loader"]

logger = logging.getLogger(__name__)

class ListStream:
    """Dataset dicts held in memory (Detectron2's serialised ``DatasetFromList``), streamed per worker."""

    def __init__(self, name: str, dicts: List[dict]):
        self.name = name
        self._dicts = DatasetFromList(dicts, copy=False)

    def __len__(self) -> int:
        return len(self._dicts)

    def stream(self, seed: int, worker: int, num_workers: int, infinite: bool, skip=None):
        """Positions ``worker, worker + num_workers, ...`` of the shared index stream: shuffled epochs
        (``seed``, epoch) when ``infinite``, else ``range(len)`` once. Yields ``(index, dataset dict)``."""
        n = len(self._dicts)
        if not infinite:
            for i in range(worker, n, num_workers):
                yield i, self._dicts[i]
            return
        position, epoch = 0, 0
        while True:
            order = np.random.default_rng([int(seed), epoch, 2]).permutation(n)
            first = (worker - position) % num_workers
            for i in order[first::num_workers]:
                yield int(i), self._dicts[int(i)]
            position, epoch = position + n, epoch + 1


Source = Union[ListStream, ImageTextShards]


class TaskStream(torchdata.IterableDataset):
    """Mapped samples of one task's datasets for the current rank and DataLoader worker (see the
    module doc). Iterating in the main process (``num_workers=0``) acts as worker 0 of 1."""

    def __init__(self, sources: Sequence[Source], probs: Sequence[float], mapper, seed: int, infinite: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None, num_workers: int = 0,
                 max_bad_fraction: float = 0.01):
        """
        Args:
            sources: the datasets (each has ``name``, ``len()`` and ``stream(seed, worker, num_workers,
                infinite, skip)`` yielding ``(index in the dataset, sample)``).
            probs: probability of drawing each source (training); ignored when not ``infinite``.
            mapper: callable dict -> dict (a task mapper), or None to yield the raw dicts.
            seed: identical on every rank.
            infinite: training (endless, shuffled, sources mixed) or one pass over each source in turn.
            rank, world_size: default to the process group's.
            num_workers: DataLoader workers per rank (sizes the skip counters).
            max_bad_fraction: ``DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION`` (see :mod:`up2.data.bad_samples`).
        """
        if len(sources) != len(probs) or not sources:
            raise ValueError(f"TaskStream: {len(sources)} sources for {len(probs)} probabilities")
        self.sources = list(sources)
        self.probs = np.asarray(probs, dtype=np.float64) / float(np.sum(probs))
        self.mapper = mapper
        self.seed = int(seed)
        self.infinite = bool(infinite)
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)
        self.tracker = BadSampleTracker([s.name for s in self.sources], [len(s) for s in self.sources],
                                        max_bad_fraction, num_slots=max(1, num_workers))

    def _worker(self):
        info = torchdata.get_worker_info()
        worker_id, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker_id, self.rank * workers + worker_id, self.world_size * workers

    def __iter__(self):
        slot, worker, num_workers = self._worker()

        def skipper(dataset: int):
            return lambda reason, message, items=(): self.tracker.skip(dataset, reason, message, items, slot)

        streams = [s.stream(self.seed, worker, num_workers, self.infinite, skipper(d))
                   for d, s in enumerate(self.sources)]
        if not self.infinite:
            for d, samples in enumerate(streams):
                for item, sample in samples:
                    out = self._map(sample, d, item, slot)
                    if out is not None:
                        yield out
            return
        rng = np.random.default_rng([self.seed, worker, 3])
        cdf = np.cumsum(self.probs)
        while True:
            d = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
            item, sample = next(streams[d])
            out = self._map(sample, d, item, slot)
            if out is not None:
                yield out

    def _map(self, sample: dict, dataset: int, item: int, slot: int):
        if self.mapper is None:
            return sample
        try:
            return self.mapper(sample)
        except ImageReadError as e:
            self.tracker.skip(dataset, e.reason, str(e), [item], slot)
            return None


def _sources(cfg, task_type: str, dataset_names: Sequence[str]) -> List[Source]:
    if task_type not in ("captioning", "retrieval"):
        raise ValueError(f"Tar-shard datasets hold image-text pairs: they can train captioning or retrieval "
                         f"tasks, not a {task_type} task ({list(dataset_names)})")
    sources = []
    for name in dataset_names:
        if is_streaming_dataset(name):
            sources.append(DatasetCatalog.get(name))
        else:
            dicts, _ = load_task_dataset_dicts(cfg, task_type, [name])
            sources.append(ListStream(name, dicts))
    return sources


def build_streaming_train_loader(cfg, entry, batch_size: int, mapper, seed: Optional[int]):
    """Infinite train loader of a task with shard datasets (see
    :func:`up2.data.build.build_task_train_loader` for the arguments); yields ``list[dict]`` of
    ``batch_size`` mapped dicts."""
    sources = _sources(cfg, entry.type, entry.train_datasets)
    sizes = [len(s) for s in sources]
    probs = dataset_sampling_weights(sizes, entry.train_dataset_weights, cfg.DATASETS.UP2.SIZE_WEIGHT_POWER,
                                     entry.train_datasets)
    seed = comm.shared_random_seed() if seed is None else seed
    num_workers = cfg.DATALOADER.NUM_WORKERS
    total_workers = comm.get_world_size() * max(1, num_workers)
    for source in sources:
        if isinstance(source, ImageTextShards) and len(source.shards) < total_workers:
            logger.warning("Dataset '%s' has %d shards for %d loader workers (%d ranks x %d): workers sharing a "
                           "shard each read all of it and keep every k-th sample; write more shards to avoid "
                           "the repeated reads", source.name, len(source.shards), total_workers,
                           comm.get_world_size(), max(1, num_workers))
    logger.info("Task '%s' (%s): streaming %s with sizes %s, sampling probabilities %s, %d per GPU, %d workers",
                entry.name, entry.type, list(entry.train_datasets), sizes, [round(float(p), 5) for p in probs],
                batch_size, num_workers)
    dataset = TaskStream(sources, probs, mapper, seed, infinite=True, num_workers=num_workers,
                         max_bad_fraction=cfg.DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION)
    return torchdata.DataLoader(dataset, batch_size=batch_size, drop_last=True, num_workers=num_workers,
                                collate_fn=trivial_batch_collator, worker_init_fn=worker_init_reset_seed)


def build_streaming_test_loader(cfg, dataset_name: str, task_type: str, batch_size: int, mapper):
    """One pass over a shard dataset, split over ranks and workers (every sample once in all);
    yields ``list[dict]`` of at most ``batch_size`` mapped dicts."""
    sources = _sources(cfg, task_type, [dataset_name])
    num_workers = cfg.DATALOADER.NUM_WORKERS
    dataset = TaskStream(sources, [1.0], mapper, seed=0, infinite=False, num_workers=num_workers,
                         max_bad_fraction=cfg.DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION)
    return torchdata.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                collate_fn=trivial_batch_collator)
