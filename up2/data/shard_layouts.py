"""Where the tar shards of an image-text dataset are and how many samples each holds, from one of two
on-disk layouts, without opening any tar:

* **up2 index** (written by ``datasets/prepare_image_text_shards.py``)::

      DIR/000000.tar, 000001.tar, ...   members KEY.jpg (or .jpeg/.png/.webp) and KEY.txt (captions, one per line)
      DIR/shards.json                   {"format": "up2-image-text-shards", "version": 1, "num_samples": N,
                                         "shards": [{"file": "000000.tar", "num_samples": n, "sha256": "..."}, ...]}

* **img2dataset output** (``img2dataset --output_format webdataset``), used as it is::

      DIR/00000.tar, 00001.tar, ...     members KEY.jpg (or .png/.webp, per --encode_format), KEY.json
                                        (metadata), KEY.txt (the caption) with KEY = 9 digits
      DIR/00000_stats.json, ...         {"count": ..., "successes": n, "failed_to_download": ..., ...}
      DIR/00000.parquet, ...            (per-row metadata; not read)

  ``successes`` is the number of samples in the tar beside it. img2dataset writes the stats file when
  the shard is complete, so a tar without one is an unfinished download: it is left out, with a warning.

A dataset is a directory (every shard of it) or a glob of ``.tar`` files (those shards; their sizes come
from the ``shards.json`` beside them, else from their ``*_stats.json``).
"""
import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "INDEX_FILE_NAME", "STATS_SUFFIX", "UP2_INDEX", "IMG2DATASET",
           "ShardInfo", "read_shard_index", "read_img2dataset_stats", "resolve_shards"]

logger = logging.getLogger(__name__)

INDEX_FORMAT = "up2-image-text-shards"
INDEX_VERSION = 1
INDEX_FILE_NAME = "shards.json"
STATS_SUFFIX = "_stats.json"

# Layout names (ImageTextShards.layout).
UP2_INDEX = "up2_index"
IMG2DATASET = "img2dataset"

_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its path, its number of samples (declared by the index or stats file) and the
    position of its first sample in the dataset."""

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


def read_img2dataset_stats(stats_file: str) -> int:
    """The number of samples (``"successes"``) of an img2dataset ``NNNNN_stats.json``."""
    try:
        with open(stats_file, encoding="utf-8") as f:
            stats = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"img2dataset stats file {stats_file} is not valid JSON ({e})") from e
    count = stats.get("successes") if isinstance(stats, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"img2dataset stats file {stats_file}: key 'successes' (samples in the tar) must be an "
                         f"int >= 0, got {count!r}")
    return count


def _stats_file(tar_path: str) -> str:
    return tar_path[:-len(".tar")] + STATS_SUFFIX


def _img2dataset_shards(name: str, tars: List[str]) -> List[Tuple[str, int]]:
    """(tar, size) of the tars with a stats file; the others are left out with a warning."""
    shards, unfinished = [], []
    for tar in tars:
        stats = _stats_file(tar)
        if os.path.isfile(stats):
            shards.append((tar, read_img2dataset_stats(stats)))
        else:
            unfinished.append(os.path.basename(tar))
    if unfinished:
        logger.warning("Dataset '%s': %d tar(s) have no %s beside them (unfinished img2dataset shards) and are "
                       "left out: %s", name, len(unfinished), "NNNNN" + STATS_SUFFIX, unfinished[:10])
    return shards


def resolve_shards(name: str, shard_glob_or_dir: str, index_file: Optional[str] = None,
                   missing_error=FileNotFoundError) -> Tuple[List[ShardInfo], str]:
    """The shards of a dataset and its layout (:data:`UP2_INDEX` or :data:`IMG2DATASET`).

    Args:
        name: dataset name (messages).
        shard_glob_or_dir: a shard directory, or a glob of ``.tar`` files.
        index_file: a ``shards.json`` to use instead of the one beside the shards.
        missing_error: ``callable(path, what) -> Exception`` for a missing file (``"<what> <path> does not
            exist"``).

    Raises:
        missing_error: no shard, or a shard listed by the index or by a stats file is missing.
        ValueError: a malformed index or stats file, or an index that does not list a globbed shard.
    """
    is_glob = any(c in shard_glob_or_dir for c in _GLOB_CHARS)
    directory = os.path.dirname(shard_glob_or_dir) if is_glob else shard_glob_or_dir
    if index_file is None and not any(c in directory for c in _GLOB_CHARS):
        beside = os.path.join(directory, INDEX_FILE_NAME)
        index_file = beside if os.path.isfile(beside) else None
    if index_file is not None and not os.path.isfile(index_file):
        raise missing_error(index_file, "shard index")
    if is_glob:
        matched = sorted(os.path.normpath(os.path.abspath(p)) for p in glob.glob(shard_glob_or_dir))
        if not matched:
            raise missing_error(shard_glob_or_dir, "no shard matches")
    elif os.path.isdir(directory):
        matched = sorted(os.path.normpath(os.path.abspath(p)) for p in glob.glob(os.path.join(directory, "*.tar")))
    else:
        raise missing_error(os.path.join(directory, INDEX_FILE_NAME), "shard index")

    if index_file is not None:
        listed = read_shard_index(index_file)
        if is_glob:
            sizes = dict(listed)
            unknown = [p for p in matched if p not in sizes]
            if unknown:
                raise _index_error(index_file, f"does not list shard(s) {unknown[:5]} matched by {shard_glob_or_dir}")
            selected = [(p, sizes[p]) for p in matched]
        else:
            selected = listed
        layout, source = UP2_INDEX, index_file
    else:
        if not is_glob:  # a stats file whose tar is gone: the dataset is incomplete
            for stats in sorted(glob.glob(os.path.join(directory, "*" + STATS_SUFFIX))):
                tar = stats[:-len(STATS_SUFFIX)] + ".tar"
                if not os.path.isfile(tar):
                    raise missing_error(tar, f"shard of img2dataset's {os.path.basename(stats)}:")
        selected = _img2dataset_shards(name, matched)
        if not matched:
            raise missing_error(os.path.join(directory, INDEX_FILE_NAME),
                                "shard index (or img2dataset shards NNNNN.tar + NNNNN" + STATS_SUFFIX + ")")
        if not selected:
            raise missing_error(_stats_file(matched[0]), "img2dataset stats file")
        layout, source = IMG2DATASET, f"img2dataset stats in {directory}"
    for path, _ in selected:
        if not os.path.isfile(path):
            raise missing_error(path, f"shard listed in {source}:")
    shards, offset = [], 0
    for path, count in selected:
        shards.append(ShardInfo(path, count, offset))
        offset += count
    logger.info("Dataset '%s': %d shards, %d samples (%s)", name, len(shards), offset, source)
    return shards, layout
