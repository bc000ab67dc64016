"""Image-text pairs stored as WebDataset tar shards, read as a stream with the ``webdataset`` library.

Layouts (up2's ``shards.json`` index, or the output directory of img2dataset used as it is) and dataset
sizes: :mod:`up2.data.shard_layouts`. The members of one sample are consecutive in the tar and share
their KEY (the member path up to the first dot of its base name, WebDataset's convention). The caption:
``KEY.txt`` (UTF-8); with the up2 index one caption per line, with img2dataset the whole text is one
caption (line breaks become spaces). Other members (img2dataset's ``KEY.json``) are not read.

Sample dicts (what :meth:`ImageTextShards.stream` yields, with the sample's position in the dataset):
``{"image_bytes": bytes (the encoded image), "source": "<shard path>:<KEY>.<ext>", "image_id": int
(offset of the shard + position of the sample in it, in ``[0, len)``), "captions": [str]}``. There is no
``file_name``: the mapper decodes ``image_bytes`` like an image file (EXIF orientation, ``INPUT.FORMAT``).

What webdataset does here: tar iteration and grouping of members into samples
(``webdataset.tariterators``: ``tar_file_expander``, ``group_by_keys``), caption decoding
(``webdataset.autodecode.Decoder``), the shuffle buffer (``webdataset.shuffle``) and error handling
(a handler that records the error and goes on). What up2 keeps of its own, because webdataset does not
give it:

* **splitting** (:func:`worker_shard_slices`): webdataset's ``split_by_node`` / ``split_by_worker`` slice
  the shard list, so with fewer shards than workers some workers get none (an endless stream then never
  yields), and with unequal shares some samples are drawn more often than others for the whole run
  (``benchmarks/shard_split_coverage.py``: 2 ranks x 2 workers, 5 equal shards, 40 epochs' worth of
  draws: most/least drawn sample 1.23 with webdataset's splitters, 1.00 here; 3 shards: one of the 4
  workers gets no shard with webdataset). In
  epoch ``e`` the shards are permuted with ``seed`` and ``e`` (the same permutation on every rank and
  worker); the global worker ``g = rank * num_workers + worker_id`` of ``W`` workers plays slot
  ``(g + e) % W`` (over epochs every worker visits every slot) and the shard at position ``i`` goes to
  slot ``i % W``. With fewer shards than workers (``S < W``), the ``k`` slots mapped to one shard each
  read the whole shard and keep every ``k``-th sample: still every sample once per epoch, but the shard
  is read ``k`` times; write at least ``W`` shards.
* **skip-and-count** (:mod:`up2.data.bad_samples`): webdataset's handlers see an exception, not the
  dataset, the sample or how many samples a cut-off shard loses. A sample without image or caption, an
  undecodable caption or image (the mapper's :class:`~up2.data.mappers.ImageReadError`), a missing,
  unreadable or truncated shard (the samples it still declared are lost) is skipped, logged with the
  shard and member, and counted.

Resume: a stream does not save its position; a resumed run restarts it with a new seed
(:mod:`up2.engine.resume`), as with the previous reader. webdataset has no stream state either.
"""
import logging
import os
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import webdataset as wds
from webdataset.autodecode import Decoder, DecodingError
from webdataset.tariterators import group_by_keys, tar_file_expander

from up2.data.catalog import DatasetNotFoundError
from up2.data.shard_layouts import IMG2DATASET, UP2_INDEX, ShardInfo, resolve_shards

__all__ = ["ImageTextShards", "iter_tar_samples", "worker_shard_slices", "IMAGE_MEMBER_EXTENSIONS"]

logger = logging.getLogger(__name__)

IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_MEMBER_EXTENSION = "txt"

# skip(reason, message, items): records skipped samples (items: their positions in the dataset).
SkipFn = Callable[[str, str, Sequence[int]], None]


def _describe(error: Exception) -> str:
    # webdataset appends the stream and url to an exception's args; the first arg is the message
    message = error.args[0] if error.args else ""
    return f"{type(error).__name__}: {message}"


def iter_tar_samples(path: str, on_error: Callable[[str, str, int], None],
                     is_complete: Callable[[dict], bool] = lambda sample: True) -> Iterator[Tuple[int, dict]]:
    """Streams the samples of one tar shard (sequential read) with webdataset.

    Args:
        path: the ``.tar`` file.
        on_error: called once with ``(reason, message, samples yielded)`` when the shard is missing
            (``"missing_shard"``) or cannot be read to its end (``"corrupt_shard"``).
        is_complete: whether the sample being read when the error happened has the members it needs
            (each member present was read whole); if not, it is not yielded.

    Yields:
        ``(ordinal, {"__key__": KEY, "__url__": path, extension: bytes, ...})``, ordinal counting the
        samples from 0 in file order.
    """
    if not os.path.isfile(path):
        on_error("missing_shard", f"shard {path} does not exist", 0)
        return
    errors: List[Exception] = []

    def record_and_continue(error: Exception) -> bool:
        errors.append(error)
        return True

    ordinal = 0
    with open(path, "rb") as stream:
        files = tar_file_expander([{"url": path, "stream": stream}], handler=record_and_continue)
        samples = group_by_keys(files, handler=record_and_continue)
        for sample in samples:
            # after an error, the iteration stops; the sample emitted then may lack members
            if errors and not is_complete(sample):
                break
            yield ordinal, sample
            ordinal += 1
            if errors:
                break
        samples.close()
        files.close()
    if errors:
        on_error("corrupt_shard", f"shard {path} is unreadable after {ordinal} samples: {_describe(errors[0])}; "
                                  "its remaining samples are skipped", ordinal)


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


def _log_only(dataset_name: str) -> SkipFn:
    def skip(reason: str, message: str, items: Sequence[int] = ()):
        logger.warning("Dataset '%s': skipped %d sample(s) (%s): %s", dataset_name, len(items), reason, message)
    return skip


class ImageTextShards:
    """A registered tar-shard dataset (what ``DatasetCatalog.get`` returns for it): its shards and their
    sizes. ``len()`` is the declared number of samples; iterating yields every sample dict once in file
    order (a single-process convenience; loaders use :meth:`stream`)."""

    def __init__(self, name: str, shards: Sequence[ShardInfo], shuffle_buffer: int = 0, layout: str = UP2_INDEX):
        """
        Args:
            name: dataset name (in logs and skip counts).
            shards: the shards, in dataset order.
            shuffle_buffer: samples held per worker to shuffle the stream in training (0: none).
            layout: :data:`~up2.data.shard_layouts.UP2_INDEX` (captions one per line) or
                :data:`~up2.data.shard_layouts.IMG2DATASET` (the caption file is one caption).
        """
        if layout not in (UP2_INDEX, IMG2DATASET):
            raise ValueError(f"Dataset '{name}': unknown shard layout {layout!r}; expected {UP2_INDEX!r} or "
                             f"{IMG2DATASET!r}")
        self.name = name
        self.shards = list(shards)
        self.shuffle_buffer = int(shuffle_buffer)
        self.layout = layout
        self._decoder = Decoder([], only=[CAPTION_MEMBER_EXTENSION])

    @classmethod
    def from_path(cls, name: str, shard_glob_or_dir: str, index_file: Optional[str] = None,
                  shuffle_buffer: int = 0, prepare_hint: str = "") -> "ImageTextShards":
        """Resolves a shard directory or a glob of ``.tar`` files (see :mod:`up2.data.shard_layouts`).

        Raises:
            DatasetNotFoundError: no shard, or the index, a listed shard or a stats file is missing.
            ValueError: a malformed index or stats file.
        """
        def missing(path: str, what: str):
            return DatasetNotFoundError(f"Dataset '{name}': {what} {path} does not exist. {prepare_hint} "
                                        "(datasets are looked up under $DETECTRON2_DATASETS, default ./datasets)")

        shards, layout = resolve_shards(name, shard_glob_or_dir, index_file, missing)
        return cls(name, shards, shuffle_buffer, layout)

    def __len__(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def __iter__(self) -> Iterator[dict]:
        for _, sample in self.stream(seed=0, worker=0, num_workers=1, infinite=False, skip=_log_only(self.name)):
            yield sample

    def _captions(self, text: str) -> List[str]:
        if self.layout == IMG2DATASET:
            caption = " ".join(text.split())
            return [caption] if caption else []
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _shard_samples(self, shard: ShardInfo, k: int, r: int, skip: SkipFn) -> Iterator[Tuple[int, dict]]:
        def shard_error(reason: str, message: str, read: int):
            lost = [shard.offset + o for o in range(read, shard.num_samples) if o % k == r]
            skip(reason, message, lost)

        def has_image_and_caption(files: dict) -> bool:
            return CAPTION_MEMBER_EXTENSION in files and any(e in files for e in IMAGE_MEMBER_EXTENSIONS)

        for ordinal, files in iter_tar_samples(shard.path, shard_error, has_image_and_caption):
            if ordinal % k != r:
                continue
            item, source = shard.offset + ordinal, f"{shard.path}:{files['__key__']}"
            image_ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in files), None)
            if image_ext is None:
                members = sorted(k for k in files if not k.startswith("__"))
                skip("missing_image", f"sample {source} has no image member (members: {members})", [item])
                continue
            if CAPTION_MEMBER_EXTENSION not in files:
                skip("missing_caption", f"sample {source} has no {CAPTION_MEMBER_EXTENSION} member", [item])
                continue
            try:
                text = self._decoder(files)[CAPTION_MEMBER_EXTENSION]
            except DecodingError as e:
                skip("unreadable_caption", f"caption {source}.{CAPTION_MEMBER_EXTENSION} cannot be decoded: "
                                           f"{_describe(e.__cause__ or e)}", [item])
                continue
            captions = self._captions(text)
            if not captions:
                skip("missing_caption", f"caption {source}.{CAPTION_MEMBER_EXTENSION} is empty", [item])
                continue
            yield item, {"image_bytes": files[image_ext], "source": f"{source}.{image_ext}", "image_id": item,
                         "captions": captions}

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of the shards in ``epoch`` (identical on every rank and worker)."""
        return np.random.default_rng([int(seed), int(epoch)]).permutation(len(self.shards))

    def _shuffled(self, samples: Iterator, seed: Sequence[int]) -> Iterator:
        if self.shuffle_buffer <= 1:
            return samples
        rng = random.Random(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def stream(self, seed: int, worker: int, num_workers: int, infinite: bool,
               skip: Optional[SkipFn] = None) -> Iterator[Tuple[int, dict]]:
        """The samples of one global worker, with their positions in the dataset.

        Args:
            seed: shared by every rank and worker (shard permutations and shuffling).
            worker: global worker index ``rank * workers_per_rank + worker_id``.
            num_workers: number of workers over all ranks.
            infinite: training: shuffled epochs forever, the worker's slot rotating each epoch;
                otherwise one pass in dataset order without shuffling.
            skip: called as ``skip(reason, message, items)`` for skipped samples (default: log).

        Yields:
            ``(position in the dataset, sample dict)``.
        """
        skip = _log_only(self.name) if skip is None else skip
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
            for sample in self._shuffled(samples, (seed, epoch, worker, 1)):
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
