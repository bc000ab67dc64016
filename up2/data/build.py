"""Per-task train and test loaders, and the multi-task loader the trainer pulls batches from.

Every task entry of ``DATASETS.UP2.TASKS`` gets its own Detectron2 train loader: its mapper
(:func:`up2.data.mappers.build_mapper`), its per-GPU batch size, its own DataLoader workers
(``DATALOADER.NUM_WORKERS`` each, so a slow task never blocks another's workers) and, when it has
several training datasets, a :class:`~up2.data.samplers.WeightedDatasetSampler` (weights
``TRAIN_DATASET_WEIGHTS`` or size ** ``DATASETS.UP2.SIZE_WEIGHT_POWER``). Loader iterators are
created on first use and kept (:class:`MultiTaskDataLoader`): a task that is never sampled never
starts its workers. A task with a tar-shard training dataset (``register_image_text_shards``) is
streamed instead (:mod:`up2.data.streams`), with the same weighting of its datasets. Either way, a
sample whose image cannot be read is skipped, counted and replaced (:mod:`up2.data.bad_samples`).
"""
import logging
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch.utils.data as torchdata
from detectron2.data import (DatasetCatalog, DatasetFromList, MapDataset, build_detection_test_loader,
                             build_detection_train_loader)
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler, RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

from up2.config import TaskEntry, get_task_entries
from up2.data.bad_samples import BadSampleTracker, SkippingMapDataset
from up2.data.catalog import is_streaming_dataset, load_task_dataset_dicts
from up2.data.mappers import build_mapper
from up2.data.samplers import WeightedDatasetSampler, dataset_sampling_weights
from up2.data.streams import build_streaming_test_loader, build_streaming_train_loader

__all__ = ["build_task_train_loader", "build_task_test_loader", "build_task_train_loaders", "task_bad_sample_tracker",
           "mixed_batch_sizes", "sampled_task_batch_sizes", "task_loader_seed", "MultiTaskDataLoader"]

logger = logging.getLogger(__name__)


def task_loader_seed(cfg, task_name: str) -> Optional[int]:
    """Seed of a task's sampler: derived from ``cfg.SEED`` and the task name when ``SEED >= 0``
    (tasks get different streams), else ``None`` (one random seed shared by all ranks)."""
    if cfg.SEED < 0:
        return None
    return (int(cfg.SEED) + zlib.crc32(task_name.encode())) % 2 ** 31


def task_bad_sample_tracker(cfg, entry: TaskEntry, sizes: Sequence[int]) -> BadSampleTracker:
    """The tracker of skipped samples of a task's training datasets (``sizes``: their lengths), with
    ``DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION`` and one row per DataLoader worker."""
    return BadSampleTracker(list(entry.train_datasets), sizes, cfg.DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION,
                            num_slots=max(1, cfg.DATALOADER.NUM_WORKERS))


def _train_sampler(cfg, entry: TaskEntry, dicts: List[dict], sizes: List[int], seed: Optional[int]):
    name = cfg.DATALOADER.SAMPLER_TRAIN if entry.type == "detection" else "TrainingSampler"
    if len(sizes) > 1:
        if name != "TrainingSampler":
            logger.warning("Task '%s': DATALOADER.SAMPLER_TRAIN=%s is ignored, its %d datasets are sampled "
                           "by weight", entry.name, name, len(sizes))
        probs = dataset_sampling_weights(sizes, entry.train_dataset_weights, cfg.DATASETS.UP2.SIZE_WEIGHT_POWER,
                                         entry.train_datasets)
        logger.info("Task '%s': dataset sampling probabilities %s", entry.name,
                    {n: round(float(p), 5) for n, p in zip(entry.train_datasets, probs)})
        return WeightedDatasetSampler(sizes, probs, seed=seed)
    if name == "TrainingSampler":
        return TrainingSampler(len(dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD)
        return RepeatFactorTrainingSampler(factors, seed=seed)
    raise ValueError(f"DATALOADER.SAMPLER_TRAIN={name!r} is not supported by up2's task loaders; "
                     "use TrainingSampler or RepeatFactorTrainingSampler")


def log_task_loader(cfg, entry: TaskEntry, num_items: int, batch_size: int):
    logger.info("Task '%s' (%s): %d training items from %s, %d per GPU, %d workers", entry.name, entry.type,
                num_items, list(entry.train_datasets), batch_size, cfg.DATALOADER.NUM_WORKERS)


def build_task_train_loader(cfg, entry: TaskEntry, batch_size: Optional[int] = None, mapper=None,
                            seed: Optional[int] = None):
    """Infinite training loader of one task.

    Args:
        cfg (CfgNode): config with up2's keys.
        entry: the task (``get_task_entries(cfg)``).
        batch_size: per-GPU batch size; default ``entry.batch_size``.
        mapper: default ``build_mapper(cfg, entry.type, is_train=True)``.
        seed: sampler seed; default :func:`task_loader_seed`.

    Returns:
        iterable of ``list[dict]`` of ``batch_size`` mapped dicts (each with ``"task"``). Detection
        groups images by aspect ratio when ``DATALOADER.ASPECT_RATIO_GROUPING``; the other tasks
        produce square images, so they do not group.
    """
    batch_size = entry.batch_size if batch_size is None else int(batch_size)
    if any(is_streaming_dataset(name) for name in entry.train_datasets):
        mapper = build_mapper(cfg, entry.type, is_train=True) if mapper is None else mapper
        seed = task_loader_seed(cfg, entry.name) if seed is None else seed
        return build_streaming_train_loader(cfg, entry, batch_size, mapper, seed)
    dicts, sizes = load_task_dataset_dicts(cfg, entry.type, entry.train_datasets)
    seed = task_loader_seed(cfg, entry.name) if seed is None else seed
    sampler = _train_sampler(cfg, entry, dicts, sizes, seed)
    mapper = build_mapper(cfg, entry.type, is_train=True) if mapper is None else mapper
    log_task_loader(cfg, entry, len(dicts), batch_size)
    dataset = SkippingMapDataset(DatasetFromList(dicts, copy=False), mapper, task_bad_sample_tracker(cfg, entry, sizes))
    return build_detection_train_loader(
        dataset, mapper=None, sampler=sampler, total_batch_size=batch_size * comm.get_world_size(),
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING and entry.type == "detection",
        num_workers=cfg.DATALOADER.NUM_WORKERS)


def build_task_test_loader(cfg, dataset_name: str, task_type: str, batch_size: Optional[int] = None):
    """Test loader of one dataset with the test mapper of ``task_type``; every image once over all
    ranks (``InferenceSampler``).

    Detection uses Detectron2's batch size 1; the other tasks ``batch_size`` (default
    ``DATASETS.UP2.TEST_BATCH_SIZE``) per GPU. Yields ``list[dict]``. A tar-shard dataset is read
    once, split over ranks and workers by shard.
    """
    mapper = build_mapper(cfg, task_type, is_train=False)
    if task_type == "detection":
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
    batch_size = cfg.DATASETS.UP2.TEST_BATCH_SIZE if batch_size is None else int(batch_size)
    if is_streaming_dataset(dataset_name):
        return build_streaming_test_loader(cfg, dataset_name, task_type, batch_size, mapper)
    dataset = MapDataset(DatasetFromList(DatasetCatalog.get(dataset_name), copy=False), mapper)
    return torchdata.DataLoader(dataset, batch_size=batch_size, sampler=InferenceSampler(len(dataset)),
                                num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator)


def mixed_batch_sizes(entries: Sequence[TaskEntry]) -> Dict[str, int]:
    """Per-GPU batch size of each task under ``SOLVER.UP2.SAMPLING: "mixed"``.

    In mixed sampling every iteration carries every task; task k contributes
    ``max(1, round(s_k * BATCH_SIZE_k))`` samples, the number of samples unmixed sampling gives it per
    iteration on average (so both strategies see each task's data at the same rate; a task whose
    ``s_k * BATCH_SIZE_k`` is below 0.5 still contributes one sample). Tasks with ``s_k = 0`` are left out.
    """
    return {e.name: max(1, int(round(e.sampling_ratio * e.batch_size))) for e in entries if e.sampling_ratio > 0}


def sampled_task_batch_sizes(cfg) -> List[Tuple[TaskEntry, int]]:
    """``(entry, per-GPU batch size)`` of every entry of ``DATASETS.UP2.TASKS`` that is ever sampled
    (``SAMPLING_RATIO > 0``): ``BATCH_SIZE``, or the batch sizes of :func:`mixed_batch_sizes` when
    ``SOLVER.UP2.SAMPLING == "mixed"``."""
    entries = get_task_entries(cfg)
    mode = cfg.SOLVER.UP2.SAMPLING
    if mode not in ("unmixed", "mixed"):
        raise ValueError(f"SOLVER.UP2.SAMPLING must be 'unmixed' or 'mixed', got {mode!r}")
    sizes = mixed_batch_sizes(entries) if mode == "mixed" else {e.name: e.batch_size for e in entries}
    return [(e, sizes[e.name]) for e in entries if e.sampling_ratio > 0]


def build_task_train_loaders(cfg) -> Dict[str, Iterable]:
    """``{task_name: train loader}`` for every task of :func:`sampled_task_batch_sizes` (tasks with
    ``SAMPLING_RATIO`` 0 are never sampled and get no loader)."""
    return {e.name: build_task_train_loader(cfg, e, batch_size=size) for e, size in sampled_task_batch_sizes(cfg)}


class MultiTaskDataLoader:
    """Holds one train loader per task and hands out batches of the selected task(s).

    ``iter(loader)`` (what Detectron2's ``SimpleTrainer`` calls once) is a lazy generator: each
    ``next()`` returns the concatenated batches of the tasks last given to :meth:`select` (one task in
    unmixed sampling, all in mixed), so a hook can choose the task in ``before_step`` and the trainer's
    ``next(data_loader_iter)`` in ``run_step`` gets that task's batch. Each task's iterator is created
    on its first use and kept.
    """

    def __init__(self, loaders: Dict[str, Iterable]):
        """
        Args:
            loaders: ``{task_name: iterable of list[dict]}`` (e.g. :func:`build_task_train_loaders`).
        """
        if not loaders:
            raise ValueError("MultiTaskDataLoader needs at least one task loader")
        self.loaders = dict(loaders)
        self._iterators = {}
        self._selected: List[str] = []

    @property
    def started_tasks(self) -> List[str]:
        """Tasks whose iterator (and workers) exist."""
        return list(self._iterators)

    def select(self, task_names: Sequence[str]):
        """Tasks whose batches the next ``next()`` of ``iter(self)`` returns."""
        unknown = [n for n in task_names if n not in self.loaders]
        if unknown:
            raise KeyError(f"No train loader for task(s) {unknown}; known tasks: {sorted(self.loaders)}")
        self._selected = list(task_names)

    def next_batch(self, task_name: str) -> list:
        """The next batch (``list[dict]``) of ``task_name``'s loader."""
        if task_name not in self.loaders:
            raise KeyError(f"No train loader for task '{task_name}'; known tasks: {sorted(self.loaders)}")
        if task_name not in self._iterators:
            logger.info("Starting the train loader of task '%s'", task_name)
            self._iterators[task_name] = iter(self.loaders[task_name])
        return next(self._iterators[task_name])

    def __iter__(self):
        while True:
            if not self._selected:
                raise RuntimeError("MultiTaskDataLoader: no task selected; register a TaskSamplingHook "
                                   "(up2.engine.task_sampling) or call select() before each step")
            batch = []
            for name in self._selected:
                batch.extend(self.next_batch(name))
            yield batch
