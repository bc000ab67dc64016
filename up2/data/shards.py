"""Image-text pairs stored as WebDataset-style tar shards, read as a stream.

On-disk format (written by ``datasets/prepare_image_text_shards.py``, documented in
``datasets/README.md``)::

    DIR/000000.tar, 000001.tar, ...   members KEY.jpg (or .jpeg/.png/.webp) and KEY.txt
    DIR/shards.json                   {"format": "up2-image-text-shards", "version": 1,
                                       "num_samples": N,
                                       "shards": [{"file": "000000.tar", "num_samples": n,
                                                   "sha256": "..."}, ...]}

The members of one sample are consecutive in the tar and share their KEY (the member path up to the
first dot of its base name, WebDataset's convention). ``KEY.txt`` holds the caption(s), UTF-8, one per
line. The index gives the number of samples of each shard, which is the dataset's size for the
size-based sampling weights of :mod:`up2.data.samplers`, without opening any tar.

Sample dicts (what :class:`ImageTextShards` streams; the captioning and retrieval mappers consume
them): ``{"image_bytes": bytes (the encoded image), "source": "<shard path>:<member>", "image_id":
int (index offset of the shard + position of the sample in it, unique over the dataset),
"captions": [str]}``. There is no ``file_name``: the image is decoded from ``image_bytes``.

Splitting (no duplicates within an epoch, every sample once per epoch): in epoch ``e`` the shards are
permuted with ``seed`` and ``e`` (the same permutation on every rank and worker); the global worker
``g = rank * num_workers + worker_id`` of ``W = world_size * num_workers`` workers plays slot
``(g + e) % W`` (so, over epochs, every worker visits every slot) and the shard at position ``i`` of
the permutation goes to slot ``i % W``. With fewer shards than workers (``S < W``), the ``k`` slots
mapped to one shard each read the whole shard and keep every ``k``-th sample (offsets differ): still
no duplicates and full coverage, but the shard is read ``k`` times; write at least ``W`` shards.

Bad data never stops a run: a sample without image or caption, an undecodable image (reported by the
mapper as :class:`~up2.data.mappers.ImageReadError`), a missing, unreadable or truncated shard (its
remaining samples are lost) is skipped, logged with the shard and member, and counted; the counts of
the current process's loaders (DataLoader workers included) are returned by :func:`skipped_samples`.
"""
import glob
import json
import logging
import os
import tarfile
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "INDEX_FILE_NAME", "SKIP_REASONS", "ShardInfo", "ImageTextShards",
           "SkipCounter", "skipped_samples", "read_shard_index", "iter_tar_samples", "worker_shard_slices"]

logger = logging.getLogger(__name__)

INDEX_FORMAT = "up2-image-text-shards"
INDEX_VERSION = 1
INDEX_FILE_NAME = "shards.json"
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_MEMBER_EXTENSION = "txt"

# Why a sample was skipped (keys of the counts of skipped_samples()).
SKIP_REASONS = ("unreadable_image", "missing_image", "missing_caption", "corrupt_shard", "missing_shard")

_GLOB_CHARS = ("*", "?", "[")


class SkipCounter:
    """Counts skipped samples per (dataset, reason), shared by a loader's DataLoader workers.

    The counts live in a shared-memory tensor created in the main process (workers inherit it with
    ``fork`` and receive it through torch's shared-memory pickling with ``spawn``); each worker writes
    its own row, so no lock is needed. Every counter is listed (weakly) for :func:`skipped_samples`.
    """

    def __init__(self, dataset_names: Sequence[str], num_slots: int = 1):
        """
        Args:
            dataset_names: the datasets whose samples are counted.
            num_slots: number of writer rows (one per DataLoader worker; 1 without workers).
        """
        self.dataset_names = list(dataset_names)
        self._index = {name: i for i, name in enumerate(self.dataset_names)}
        self._counts = torch.zeros((max(1, int(num_slots)), len(self.dataset_names), len(SKIP_REASONS)),
                                   dtype=torch.int64).share_memory_()
        _COUNTERS.append(weakref.ref(self))

    def add(self, dataset_name: str, reason: str, slot: int = 0, count: int = 1):
        """Adds ``count`` skipped samples of ``dataset_name`` for ``reason`` (one of SKIP_REASONS)."""
        self._counts[slot % self._counts.shape[0], self._index[dataset_name], SKIP_REASONS.index(reason)] += count

    def counts(self) -> Dict[str, Dict[str, int]]:
        """``{dataset: {reason: count}}`` summed over workers, nonzero counts only."""
        totals = self._counts.sum(dim=0).tolist()
        return {name: {reason: n for reason, n in zip(SKIP_REASONS, row) if n}
                for name, row in zip(self.dataset_names, totals) if any(row)}


_COUNTERS: List["weakref.ref[SkipCounter]"] = []


def skipped_samples() -> Dict[str, int]:
    """Samples skipped so far by the streaming loaders of this process (their workers included):
    ``{"<dataset>/<reason>": count}`` with the reasons of :data:`SKIP_REASONS`, nonzero counts only.
    Each rank counts its own samples."""
    totals: Dict[str, int] = {}
    alive = []
    for ref in _COUNTERS:
        counter = ref()
        if counter is None:
            continue
        alive.append(ref)
        for name, reasons in counter.counts().items():
            for reason, n in reasons.items():
                totals[f"{name}/{reason}"] = totals.get(f"{name}/{reason}", 0) + n
    _COUNTERS[:] = alive
    return dict(sorted(totals.items()))


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its path, its number of samples (from the index) and the image id of its first
    sample."""

    path: str
    num_samples: int
    offset: int


def _index_error(index_file: str, message: str) -> ValueError:
    return ValueError(f"Shard index {index_file}: {message} (re-create it with "
                      "datasets/prepare_image_text_shards.py, see datasets/README.md)")


def read_shard_index(index_file: str) -> List[Tuple[str, int]]:
    """Reads a ``shards.json`` index.

    Returns:
        list of (absolute shard path, number of samples), in index order.
    """
    with open(index_file, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise _index_error(index_file, f"not valid JSON ({e})") from e
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise _index_error(index_file, f"key 'format' must be {INDEX_FORMAT!r}, got {got!r}")
    if index.get("version") != INDEX_VERSION:
        raise _index_error(index_file, f"key 'version' must be {INDEX_VERSION}, got {index.get('version')!r}")
    entries = index.get("shards")
    if not isinstance(entries, list):
        raise _index_error(index_file, f"key 'shards' must be a list, got {type(entries).__name__}")
    root = os.path.dirname(os.path.abspath(index_file))
    shards = []
    for i, entry in enumerate(entries):
        file = entry.get("file") if isinstance(entry, dict) else None
        count = entry.get("num_samples") if isinstance(entry, dict) else None
        if not isinstance(file, str) or not file:
            raise _index_error(index_file, f"shards[{i}] needs a non-empty 'file', got {entry!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise _index_error(index_file, f"shards[{i}] ({file}): 'num_samples' must be an int >= 0, got {count!r}")
        shards.append((os.path.normpath(os.path.join(root, file)), count))
    return shards


def iter_tar_samples(path: str, on_error: Callable[[str, str], None]) -> Iterator[Tuple[int, str, Dict[str, bytes]]]:
    """Streams the samples of one tar shard (sequential read, no seeking).

    Args:
        path: the ``.tar`` file.
        on_error: called with ``(reason, message)`` when the shard is missing (``"missing_shard"``) or
            cannot be read to its end (``"corrupt_shard"``); the samples read so far were yielded.

    Yields:
        ``(ordinal, key, {extension: bytes})`` for each group of consecutive members with the same
        key; ``ordinal`` counts the groups from 0 in file order.
    """
    if not os.path.isfile(path):
        on_error("missing_shard", f"shard {path} does not exist")
        return
    ordinal, key, files = 0, None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                stem, _, extension = base.partition(".")
                member_key = os.path.join(directory, stem)
                if key is not None and member_key != key:
                    yield ordinal, key, files
                    ordinal, files = ordinal + 1, {}
                key = member_key
                files[extension.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield ordinal, key, files
    except (tarfile.TarError, OSError, EOFError) as e:
        on_error("corrupt_shard", f"shard {path} is unreadable after {ordinal} samples "
                                  f"(member key {key!r}): {type(e).__name__}: {e}; its remaining samples are skipped")


def worker_shard_slices(order: Sequence[int], slot: int, num_slots: int) -> List[Tuple[int, int, int]]:
    """The shards read by one worker slot in one epoch (see the module doc).

    Args:
        order: the epoch's permutation of the shard indices (length S).
        slot: the worker's slot in ``[0, num_slots)``.
        num_slots: number of workers over all ranks (W).

    Returns:
        list of ``(shard index, k, r)``: read the shard and keep its samples of ordinal ``% k == r``.
    """
    num_shards = len(order)
    if num_shards == 0:
        return []
    if num_shards >= num_slots:
        return [(int(s), 1, 0) for s in order[slot::num_slots]]
    position = slot % num_shards
    sharing = len(range(position, num_slots, num_shards))
    return [(int(order[position]), sharing, slot // num_shards)]


class ImageTextShards:
    """A registered tar-shard dataset (what ``DatasetCatalog.get`` returns for it): the shards and
    their sizes from the index. ``len()`` is the declared number of samples; iterating reads every
    sample once in file order (a single-process convenience; loaders use :meth:`stream`)."""

    def __init__(self, name: str, shards: Sequence[ShardInfo], shuffle_buffer: int = 0):
        """
        Args:
            name: dataset name (in logs and skip counts).
            shards: the shards, in index order.
            shuffle_buffer: samples held per worker to shuffle the stream in training (0: none).
        """
        self.name = name
        self.shards = list(shards)
        self.shuffle_buffer = int(shuffle_buffer)

    @classmethod
    def from_path(cls, name: str, shard_glob_or_dir: str, index_file: Optional[str] = None,
                  shuffle_buffer: int = 0, prepare_hint: str = "") -> "ImageTextShards":
        """Resolves a shard directory (every shard of its ``shards.json``) or a glob of ``.tar`` files
        (those shards only; their sizes come from ``index_file``, default ``shards.json`` beside them).

        Raises:
            DatasetNotFoundError: the index, a listed shard or every globbed shard is missing.
            ValueError: the index is malformed or does not list a globbed shard.
        """
        from up2.data.datasets.register import DatasetNotFoundError  # the registration module imports this one

        def missing(path: str, what: str):
            return DatasetNotFoundError(f"Dataset '{name}': {what} {path} does not exist. {prepare_hint} "
                                        "(datasets are looked up under $DETECTRON2_DATASETS, default ./datasets)")

        is_glob = any(c in shard_glob_or_dir for c in _GLOB_CHARS)
        if index_file is None:
            index_dir = os.path.dirname(shard_glob_or_dir) if is_glob else shard_glob_or_dir
            if any(c in index_dir for c in _GLOB_CHARS):
                raise ValueError(f"Dataset '{name}': cannot locate the shard index of {shard_glob_or_dir}; "
                                 "pass index_file")
            index_file = os.path.join(index_dir, INDEX_FILE_NAME)
        if not os.path.isfile(index_file):
            raise missing(index_file, "shard index")
        listed = read_shard_index(index_file)
        if is_glob:
            sizes = dict(listed)
            matched = sorted(os.path.normpath(os.path.abspath(p)) for p in glob.glob(shard_glob_or_dir))
            if not matched:
                raise missing(shard_glob_or_dir, "no shard matches")
            unknown = [p for p in matched if p not in sizes]
            if unknown:
                raise _index_error(index_file, f"does not list shard(s) {unknown[:5]} matched by {shard_glob_or_dir}")
            selected = [(p, sizes[p]) for p in matched]
        else:
            for path, _ in listed:
                if not os.path.isfile(path):
                    raise missing(path, f"shard listed in {index_file}:")
            selected = listed
        shards, offset = [], 0
        for path, count in selected:
            shards.append(ShardInfo(path, count, offset))
            offset += count
        logger.info("Dataset '%s': %d shards, %d samples (index %s)", name, len(shards), offset, index_file)
        return cls(name, shards, shuffle_buffer)

    def __len__(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def __iter__(self):
        counter = SkipCounter([self.name])
        return self.stream(seed=0, worker=0, num_workers=1, infinite=False,
                           skip=lambda reason, message: _log_skip(counter, self.name, reason, message, 0))

    def _shard_samples(self, shard: ShardInfo, k: int, r: int, skip: Callable[[str, str], None]):
        for ordinal, key, files in iter_tar_samples(shard.path, skip):
            if ordinal % k != r:
                continue
            source = f"{shard.path}:{key}"
            image_ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in files), None)
            if image_ext is None:
                skip("missing_image", f"sample {source} has no image member (members: {sorted(files)})")
                continue
            try:
                text = files[CAPTION_MEMBER_EXTENSION].decode("utf-8")
            except KeyError:
                skip("missing_caption", f"sample {source} has no {CAPTION_MEMBER_EXTENSION} member")
                continue
            except UnicodeDecodeError as e:
                skip("missing_caption", f"caption {source}.{CAPTION_MEMBER_EXTENSION} is not UTF-8: {e}")
                continue
            captions = [line.strip() for line in text.splitlines() if line.strip()]
            if not captions:
                skip("missing_caption", f"caption {source}.{CAPTION_MEMBER_EXTENSION} is empty")
                continue
            yield {"image_bytes": files[image_ext], "source": f"{source}.{image_ext}",
                   "image_id": shard.offset + ordinal, "captions": captions}

    def _shuffled(self, samples, rng: np.random.Generator):
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of the shards in ``epoch`` (identical on every rank and worker)."""
        return np.random.default_rng([int(seed), int(epoch)]).permutation(len(self.shards))

    def stream(self, seed: int, worker: int, num_workers: int, infinite: bool,
               skip: Optional[Callable[[str, str], None]] = None) -> Iterator[dict]:
        """The samples of one global worker.

        Args:
            seed: shared by every rank and worker (shard permutations and shuffling).
            worker: global worker index ``rank * workers_per_rank + worker_id``.
            num_workers: number of workers over all ranks.
            infinite: training: shuffled epochs forever, the worker's slot rotating each epoch;
                otherwise one pass in index order without shuffling.
            skip: called with ``(reason, message)`` for each skipped sample or shard (default: log).
        """
        if skip is None:
            def skip(reason, message):
                logger.warning("Dataset '%s': skipped (%s): %s", self.name, reason, message)
        if not infinite:
            for shard_index, k, r in worker_shard_slices(np.arange(len(self.shards)), worker, num_workers):
                yield from self._shard_samples(self.shards[shard_index], k, r, skip)
            return
        epoch, empty_epochs, read_since_sample = 0, 0, set()
        while True:
            slot = (worker + epoch) % num_workers
            slices = worker_shard_slices(self.epoch_order(seed, epoch), slot, num_workers)
            samples = (s for i, k, r in slices for s in self._shard_samples(self.shards[i], k, r, skip))
            produced = 0
            for sample in self._shuffled(samples, np.random.default_rng([int(seed), epoch, worker, 1])):
                produced += 1
                yield sample
            if produced:
                empty_epochs = 0
                read_since_sample.clear()
            else:
                empty_epochs += 1
                read_since_sample.update(i for i, _, _ in slices)
            # Nothing usable: every shard read whole since the last sample (or, when workers share
            # shards, many rotations of the slots without a sample): fail instead of spinning.
            if (len(read_since_sample) == len(self.shards) if len(self.shards) >= num_workers
                    else empty_epochs >= 50 * num_workers):
                raise RuntimeError(f"Dataset '{self.name}': worker {worker} of {num_workers} read no usable sample "
                                   f"in {empty_epochs} epochs over its {len(self.shards)} shards (first: "
                                   f"{self.shards[0].path if self.shards else 'none'}); see the warnings above")
            epoch += 1


def _log_skip(counter: SkipCounter, dataset_name: str, reason: str, message: str, slot: int):
    counter.add(dataset_name, reason, slot)
    logger.warning("Dataset '%s': skipped (%s): %s", dataset_name, reason, message)
