#!/usr/bin/env python
"""Image-text pairs (a TSV/CSV of image path or URL, caption) -> WebDataset-style tar shards.

Used for CC3M, CC12M, SBU, Visual Genome and YFCC (``cc3m_train``, ..., see datasets/README.md). The
images must already be on disk: a path column is read relative to ``--image-root``; a URL column is
mapped to its downloaded file by ``--url-map`` (a TSV ``url<TAB>path``, as downloaders log them).
Output (read by ``up2.data.shards``)::

    OUT/000000.tar  000001.tar ...  members KEY.jpg + KEY.txt (caption, UTF-8), KEY = input row number
    OUT/000000.tar.json ...         per-shard record (samples, bytes, sha256, skipped rows)
    OUT/shards.json                 {"format": "up2-image-text-shards", "version": 1, "num_samples",
                                     "shards": [{"file", "num_samples", "sha256"}], "skipped": {...}}

Shard ``i`` holds input rows ``[i * N, (i + 1) * N)`` (N = ``--samples-per-shard``) minus the rows
skipped (missing or undecodable image, empty caption; counted in the index). Rerunning resumes by
shard: a shard whose tar and record exist with the recorded size is kept, so an interrupted run
redoes only its unfinished shards; members have fixed metadata, so a rebuilt shard is byte-identical.
JPEG images are copied as they are; other formats (and images over ``--max-side``) are re-encoded to
JPEG. No checksum is published for any of these corpora.

Example (CC3M's TSV is ``caption<TAB>url``, without header)::

    python datasets/prepare_image_text_shards.py --input Train_GCC-training.tsv --caption-column 0 \\
        --image-column 1 --url-map cc3m_downloaded.tsv --out datasets/cc3m/shards --workers 8
"""
import argparse
import csv
import io
import json
import os
import sys
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterator, List, Optional, Tuple

from _prepare_common import add_common_arguments, atomic_write_json, file_digest, logger, progress, setup_logging

INDEX_FORMAT = "up2-image-text-shards"  # read by up2/data/shard_layouts.py
INDEX_VERSION = 1
INDEX_FILE_NAME = "shards.json"
SKIP_REASONS = ("missing_image", "unreadable_image", "empty_caption")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="TSV or CSV of (image path or URL, caption) rows")
    parser.add_argument("--out", required=True, help="output directory of the shards (e.g. datasets/cc3m/shards)")
    parser.add_argument("--delimiter", choices=("tab", "comma"), default=None,
                        help="field separator (default: comma for .csv, else tab)")
    parser.add_argument("--header", action="store_true", help="the first row names the columns")
    parser.add_argument("--image-column", default="0", help="0-based index, or name with --header (default 0)")
    parser.add_argument("--caption-column", default="1", help="0-based index, or name with --header (default 1)")
    parser.add_argument("--image-root", default=None, help="base of relative image paths (default: the input's dir)")
    parser.add_argument("--url-map", default=None, help="TSV url<TAB>downloaded path, for URL image columns")
    parser.add_argument("--samples-per-shard", type=int, default=2000, help="input rows per shard (default 2000)")
    parser.add_argument("--max-side", type=int, default=0, help="re-encode images whose longer side exceeds this")
    parser.add_argument("--no-verify-images", action="store_true",
                        help="do not decode images while writing (faster; corrupt images then surface at training)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    return args


def _column(spec: str, header: Optional[List[str]], source: str) -> int:
    if spec.isdigit():
        return int(spec)
    if header is None:
        raise ValueError(f"column {spec!r} is a name: pass --header (the first row of {source} names the columns)")
    if spec not in header:
        raise ValueError(f"{source} has no column {spec!r}; columns: {header}")
    return header.index(spec)


def read_rows(args) -> Iterator[Tuple[int, str, str]]:
    """Yields ``(row number, image reference, caption)`` for every data row of the input."""
    delimiter = {"tab": "\t", "comma": ","}.get(args.delimiter) or ("," if args.input.endswith(".csv") else "\t")
    with open(args.input, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        header = next(reader) if args.header else None
        image_col = _column(args.image_column, header, args.input)
        caption_col = _column(args.caption_column, header, args.input)
        for row_number, row in enumerate(row for row in reader if any(field.strip() for field in row)):
            if len(row) <= max(image_col, caption_col):
                raise ValueError(f"{args.input}: data row {row_number} has {len(row)} fields, expected the image in "
                                 f"column {image_col} and the caption in column {caption_col}: {row!r}")
            yield row_number, row[image_col], row[caption_col]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tar.addfile(info, io.BytesIO(data))


def _jpeg_bytes(path: str, max_side: int, verify: bool) -> bytes:
    """The image as JPEG bytes: the file itself when it is a JPEG within ``max_side``, else re-encoded."""
    with open(path, "rb") as f:
        data = f.read()
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    if is_jpeg and not verify and not max_side:
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        too_big = max_side and max(image.size) > max_side
        if is_jpeg and not too_big:
            return data
        image = image.convert("RGB")
        if too_big:
            image.thumbnail((max_side, max_side), Image.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=95)
        return out.getvalue()


def write_shard(task) -> dict:
    """Writes one shard from its rows; returns its record (also written as ``<shard>.json``)."""
    out_dir, shard_index, rows, max_side, verify = task
    name = f"{shard_index:06d}.tar"
    path = os.path.join(out_dir, name)
    skipped = {reason: 0 for reason in SKIP_REASONS}
    count = 0
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row_number, image_path, caption in rows:
            caption = " ".join(caption.split())
            if not caption:
                skipped["empty_caption"] += 1
                continue
            if image_path is None or not os.path.isfile(image_path):
                skipped["missing_image"] += 1
                logger.debug("row %d: image %s missing", row_number, image_path)
                continue
            try:
                image = _jpeg_bytes(image_path, max_side, verify)
            except (OSError, ValueError, SyntaxError) as e:
                skipped["unreadable_image"] += 1
                logger.warning("row %d: cannot read image %s (%s: %s), skipped", row_number, image_path,
                               type(e).__name__, e)
                continue
            key = f"{row_number:09d}"
            _tar_member(tar, f"{key}.jpg", image)
            _tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
            count += 1
    sha256 = file_digest(tmp, "sha256")
    os.replace(tmp, path)
    record = {"file": name, "num_samples": count, "bytes": os.path.getsize(path), "sha256": sha256,
              "rows": len(rows), "skipped": skipped}
    atomic_write_json(f"{path}.json", record)
    return record


def _complete_record(out_dir: str, shard_index: int) -> Optional[dict]:
    path = os.path.join(out_dir, f"{shard_index:06d}.tar")
    try:
        with open(f"{path}.json", encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(path) or os.path.getsize(path) != record.get("bytes"):
        return None
    return record


def _resolver(args):
    image_root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    url_map: Dict[str, str] = {}
    if args.url_map:
        with open(args.url_map, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    url, sep, local = line.rstrip("\n").partition("\t")
                    if not sep:
                        raise ValueError(f"{args.url_map}:{n}: expected 'url<TAB>path', got {line.strip()!r}")
                    url_map[url] = local
        map_root = os.path.dirname(os.path.abspath(args.url_map))

    def resolve(reference: str) -> Optional[str]:
        reference = reference.strip()
        if reference.startswith(("http://", "https://")):
            if not args.url_map:
                raise ValueError(f"{args.input} holds URLs ({reference}); pass --url-map to name the downloaded files")
            local = url_map.get(reference)
            return None if local is None else os.path.join(map_root, local)
        return os.path.join(image_root, reference)

    return resolve


def _shard_tasks(args, done: Dict[int, dict]):
    resolve = _resolver(args)
    rows, shard_index = [], 0
    for row_number, reference, caption in read_rows(args):
        rows.append((row_number, resolve(reference), caption))
        if len(rows) == args.samples_per_shard:
            if shard_index not in done:
                yield (args.out, shard_index, rows, args.max_side, not args.no_verify_images)
            rows, shard_index = [], shard_index + 1
    if rows and shard_index not in done:
        yield (args.out, shard_index, rows, args.max_side, not args.no_verify_images)


def _bounded_map(pool, tasks, window: int):
    """``pool.map`` holding at most ``window`` shards of rows in flight (the input can be large)."""
    pending = deque()
    for task in tasks:
        pending.append(pool.submit(write_shard, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    os.makedirs(args.out, exist_ok=True)
    num_rows = sum(1 for _ in read_rows(args))
    num_shards = (num_rows + args.samples_per_shard - 1) // args.samples_per_shard
    done = {} if args.overwrite else {i: r for i in range(num_shards) if (r := _complete_record(args.out, i))}
    logger.info("%s: %d rows -> %d shards of %d rows (%d already complete)", args.input, num_rows, num_shards,
                args.samples_per_shard, len(done))
    records = dict(done)
    tasks = _shard_tasks(args, done)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            for record in progress(_bounded_map(pool, tasks, 2 * args.workers), total=num_shards - len(done),
                                   desc="shards", unit="shard"):
                records[int(record["file"][:6])] = record
    else:
        for task in progress(tasks, total=num_shards - len(done), desc="shards", unit="shard"):
            records[task[1]] = write_shard(task)
    if sorted(records) != list(range(num_shards)):
        raise RuntimeError(f"{args.input} has {num_shards} shards of rows but {len(records)} were written; "
                           "did the input change while writing?")
    shards = [records[i] for i in range(num_shards)]
    skipped = {reason: sum(r["skipped"][reason] for r in shards) for reason in SKIP_REASONS}
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "num_samples": sum(r["num_samples"] for r in shards),
             "source": os.path.basename(args.input), "skipped": skipped,
             "shards": [{"file": r["file"], "num_samples": r["num_samples"], "sha256": r["sha256"]} for r in shards]}
    atomic_write_json(os.path.join(args.out, INDEX_FILE_NAME), index)
    logger.info("Wrote %s: %d samples in %d shards; skipped rows %s", os.path.join(args.out, INDEX_FILE_NAME),
                index["num_samples"], num_shards, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
