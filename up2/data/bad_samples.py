"""Unusable training samples, skipped and counted the same way in every dataset format.

A sample is unusable when its image file is missing, truncated or not an image (the mapper raises
:class:`~up2.data.mappers.ImageReadError`), or, in tar shards, when it has no image or caption member or
its shard is missing or cut short (:mod:`up2.data.shards`). Every loader of a task holds one
:class:`BadSampleTracker` for the task's datasets and calls :meth:`BadSampleTracker.skip` for each such
sample: the sample is logged with its file, counted per dataset and reason (:data:`SKIP_REASONS`) and
marked bad, and the loader takes another sample instead, so every batch keeps its size:

* map-style datasets (JSON / COCO, class folders): :class:`SkippingMapDataset` maps another item of the
  same dataset (and the same aspect-ratio group), drawn from the generator it is given — in up2's
  resumable loaders one seeded by the sample's position, so a resumed run replaces it identically;
* streams (tar shards and datasets mixed with them, :mod:`up2.data.streams`): the next sample.

Which task runs at an iteration never depends on data loading (:mod:`up2.engine.task_sampling`), and
every rank gets full batches whatever it skipped, so ranks keep stepping together.

Limit: when more than ``max_fraction`` (``DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION``) of a dataset's
samples (distinct samples, not skip events) are bad, :class:`BadDataError` names the dataset. It is
checked by the process that skips (its own bad samples are a lower bound of the total) and, over all
ranks, by :func:`gather_skipped_samples`, which the trainer calls on every rank at the same steps.

Counts live in shared memory: DataLoader workers write their own rows and the main process reads them.
"""
import logging
import weakref
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.utils import comm

from up2.data.mappers import ImageReadError

__all__ = ["SKIP_REASONS", "BadDataError", "BadSampleTracker", "SkippingMapDataset", "skipped_sample_counts",
           "gather_skipped_samples"]

logger = logging.getLogger(__name__)

# Why a sample was skipped. Image files: missing_image (no such file), unreadable_image (truncated,
# empty, not an image). Tar shards: missing_image / missing_caption (member absent or empty),
# unreadable_image, unreadable_caption (not UTF-8), corrupt_shard / missing_shard (the samples lost).
SKIP_REASONS = ("missing_image", "unreadable_image", "missing_caption", "unreadable_caption", "corrupt_shard",
                "missing_shard")

# Replacement draws for one sample before giving up (a dataset with almost no readable image).
MAX_REPLACEMENT_DRAWS = 1000


class BadDataError(RuntimeError):
    """Too many samples of a dataset cannot be used; the message names the dataset."""


def _limit_error(name: str, bad: int, size: int, max_fraction: float, scope: str, last: str = "") -> BadDataError:
    last = f" Last one: {last}." if last else ""
    return BadDataError(
        f"Dataset '{name}': {bad} of its {size} samples cannot be used ({bad / max(size, 1):.2%}, {scope}), more "
        f"than DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION = {max_fraction:g}.{last} Fix or remove the files named in "
        "the warnings above, or raise DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION.")


class BadSampleTracker:
    """Skip counts and bad samples of a loader's datasets (see the module doc)."""

    def __init__(self, dataset_names: Sequence[str], dataset_sizes: Sequence[int], max_fraction: float = 0.01,
                 num_slots: int = 1):
        """
        Args:
            dataset_names: the datasets, in the loader's order (item indices are per dataset).
            dataset_sizes: number of samples of each dataset (shards: as declared by their index).
            max_fraction: largest tolerated fraction of bad samples of one dataset, in [0, 1].
            num_slots: writers (one per DataLoader worker; 1 without workers).
        """
        if len(dataset_names) != len(dataset_sizes):
            raise ValueError(f"BadSampleTracker: {len(dataset_names)} names for {len(dataset_sizes)} sizes")
        if not 0 <= float(max_fraction) <= 1:
            raise ValueError(f"DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION must be in [0, 1], got {max_fraction!r}")
        self.dataset_names = list(dataset_names)
        self.dataset_sizes = [int(s) for s in dataset_sizes]
        self.max_fraction = float(max_fraction)
        self._offsets = np.concatenate([[0], np.cumsum(self.dataset_sizes)]).astype(np.int64)
        slots, num_datasets = max(1, int(num_slots)), len(self.dataset_names)
        self._counts = torch.zeros((slots, num_datasets, len(SKIP_REASONS)), dtype=torch.int64).share_memory_()
        self._distinct = torch.zeros((slots, num_datasets), dtype=torch.int64).share_memory_()
        self._bad = torch.zeros(int(self._offsets[-1]), dtype=torch.bool).share_memory_()
        _TRACKERS.append(weakref.ref(self))

    def index(self, dataset_name: str) -> int:
        """Position of ``dataset_name`` in the tracker."""
        return self.dataset_names.index(dataset_name)

    def skip(self, dataset: int, reason: str, message: str, items: Sequence[int] = (), slot: int = 0):
        """Records skipped samples: logs ``message`` (which names the file), counts them and marks them bad.

        Args:
            dataset: position of the dataset in the tracker.
            reason: one of :data:`SKIP_REASONS`.
            message: what happened, naming the file (and member).
            items: indices (within the dataset) of the samples skipped; their number is counted.
            slot: the writer (DataLoader worker id).

        Raises:
            BadDataError: more than ``max_fraction`` of the dataset's samples are now bad.
        """
        if reason not in SKIP_REASONS:
            raise ValueError(f"Unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        name, size = self.dataset_names[dataset], self.dataset_sizes[dataset]
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        items = torch.from_numpy(items[(items >= 0) & (items < size)] + self._offsets[dataset])
        slot %= self._counts.shape[0]
        self._counts[slot, dataset, SKIP_REASONS.index(reason)] += len(items)
        self._distinct[slot, dataset] += int((~self._bad[items]).sum())
        self._bad[items] = True
        logger.warning("Dataset '%s': skipped %d sample(s) (%s): %s", name, len(items), reason, message)
        bad = int(self._distinct[:, dataset].sum())
        if bad > self.max_fraction * size:
            raise _limit_error(name, bad, size, self.max_fraction, f"rank {comm.get_rank()}", message)

    def counts(self) -> Dict[str, Dict[str, int]]:
        """``{dataset: {reason: samples skipped}}`` summed over writers, nonzero counts only."""
        totals = self._counts.sum(dim=0).tolist()
        return {name: {reason: n for reason, n in zip(SKIP_REASONS, row) if n}
                for name, row in zip(self.dataset_names, totals) if any(row)}

    def bad_items(self, dataset: int) -> np.ndarray:
        """Sorted indices (within the dataset) of its samples marked bad, shape (K,)."""
        start, end = self._offsets[dataset], self._offsets[dataset + 1]
        return self._bad[start:end].nonzero().flatten().numpy()


_TRACKERS: List["weakref.ref[BadSampleTracker]"] = []


def _live_trackers() -> List[BadSampleTracker]:
    alive = [ref for ref in _TRACKERS if ref() is not None]
    _TRACKERS[:] = alive
    return [ref() for ref in alive]


def skipped_sample_counts() -> Dict[str, int]:
    """Samples skipped so far by the loaders of this process (their DataLoader workers included):
    ``{"<dataset>/<reason>": count}``, nonzero counts only."""
    totals: Dict[str, int] = {}
    for tracker in _live_trackers():
        for name, reasons in tracker.counts().items():
            for reason, n in reasons.items():
                totals[f"{name}/{reason}"] = totals.get(f"{name}/{reason}", 0) + n
    return dict(sorted(totals.items()))


def gather_skipped_samples() -> Dict[str, float]:
    """Skip counts and bad fractions over all ranks; every rank must call it at the same time.

    Returns:
        ``{"<dataset>/<reason>": samples skipped, "<dataset>/bad_fraction": distinct bad samples / size}``
        for the datasets with skips.

    Raises:
        BadDataError: on every rank, when a dataset's bad samples (union over ranks and loaders) exceed
            its ``max_fraction``.
    """
    local = {}
    for tracker in _live_trackers():
        counts = tracker.counts()
        for d, name in enumerate(tracker.dataset_names):
            if name not in counts:
                continue
            entry = local.setdefault(name, {"counts": {}, "bad": [], "size": tracker.dataset_sizes[d],
                                            "max_fraction": tracker.max_fraction})
            for reason, n in counts[name].items():
                entry["counts"][reason] = entry["counts"].get(reason, 0) + n
            entry["bad"].append(tracker.bad_items(d))
            entry["max_fraction"] = min(entry["max_fraction"], tracker.max_fraction)
    merged: Dict[str, dict] = {}
    for rank_report in comm.all_gather(local):
        for name, entry in rank_report.items():
            total = merged.setdefault(name, {"counts": {}, "bad": [], "size": entry["size"],
                                             "max_fraction": entry["max_fraction"]})
            for reason, n in entry["counts"].items():
                total["counts"][reason] = total["counts"].get(reason, 0) + n
            total["bad"].extend(entry["bad"])
            total["max_fraction"] = min(total["max_fraction"], entry["max_fraction"])
    results: Dict[str, float] = {}
    for name in sorted(merged):
        entry = merged[name]
        bad = len(np.unique(np.concatenate(entry["bad"]))) if entry["bad"] else 0
        if bad > entry["max_fraction"] * entry["size"]:
            raise _limit_error(name, bad, entry["size"], entry["max_fraction"], "all ranks")
        for reason, n in sorted(entry["counts"].items()):
            results[f"{name}/{reason}"] = n
        results[f"{name}/bad_fraction"] = bad / max(entry["size"], 1)
    return results


class SkippingMapDataset(torchdata.Dataset):
    """Dataset dicts of several datasets (concatenated in the tracker's order), mapped; an item whose image
    cannot be read is skipped (:meth:`BadSampleTracker.skip`) and replaced by another item of the same
    dataset and group.

    ``dataset[i]`` draws replacements from numpy's global RNG (seeded per DataLoader worker by
    Detectron2); :meth:`map_item` takes the generator, for reproducible replacements. Draws do not look
    at the samples already found bad (which depend on what other workers read): given the generator, the
    replacement does not depend on the number of workers or on a resume.
    """

    def __init__(self, dicts, mapper, tracker: BadSampleTracker, group_ids: Optional[Sequence[int]] = None):
        """
        Args:
            dicts: indexable dataset dicts (e.g. ``DatasetFromList``), ``sum(tracker.dataset_sizes)`` of them.
            mapper: callable dict -> dict; raises :class:`~up2.data.mappers.ImageReadError` for an unreadable
                image. A ``None`` result is retried too, without counting.
            tracker: the datasets' names and sizes, and where skips are recorded.
            group_ids: optional group of each item (aspect-ratio grouping); replacements keep the group.
        """
        if len(dicts) != sum(tracker.dataset_sizes):
            raise ValueError(f"SkippingMapDataset: {len(dicts)} dicts for datasets {tracker.dataset_names} of "
                             f"sizes {tracker.dataset_sizes}")
        self._dicts, self._mapper, self.tracker = dicts, mapper, tracker
        self._group_ids = None if group_ids is None else np.asarray(group_ids)
        self._ends = np.cumsum(tracker.dataset_sizes)
        self._pools: Dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, index: int) -> dict:
        return self.map_item(int(index), np.random.default_rng(np.random.randint(2 ** 31)))

    def _pool(self, dataset: int, group: int) -> np.ndarray:
        key = (dataset, group)
        if key not in self._pools:
            start, end = int(self._ends[dataset] - self.tracker.dataset_sizes[dataset]), int(self._ends[dataset])
            pool = np.arange(start, end)
            if self._group_ids is not None:
                pool = pool[self._group_ids[start:end] == group]
            self._pools[key] = pool
        return self._pools[key]

    def map_item(self, index: int, rng: np.random.Generator, slot: Optional[int] = None) -> dict:
        """Maps item ``index``, or replacements drawn with ``rng`` while items cannot be read.

        Args:
            index: item of the concatenation.
            rng: draws the replacements.
            slot: the tracker row to write (default: the DataLoader worker id).
        """
        if slot is None:
            info = torchdata.get_worker_info()
            slot = info.id if info is not None else 0
        dataset = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[dataset] - self.tracker.dataset_sizes[dataset])
        for _ in range(MAX_REPLACEMENT_DRAWS):
            try:
                out = self._mapper(self._dicts[index])
            except ImageReadError as e:
                self.tracker.skip(dataset, e.reason, str(e), [index - start], slot)
                out = None
            if out is not None:
                return out
            group = 0 if self._group_ids is None else int(self._group_ids[index])
            index = int(rng.choice(self._pool(dataset, group)))
        raise BadDataError(f"Dataset '{self.tracker.dataset_names[dataset]}': no usable item in "
                           f"{MAX_REPLACEMENT_DRAWS} draws (last index {index}); see the warnings above")
