"""Helpers shared by the ``datasets/prepare_*.py`` scripts: logging and progress, atomic writes,
checksums of the source archives whose publishers give one, and the Karpathy caption-split conversion.

Standard library only (``tqdm`` for progress bars when it is installed), so that preparing data does
not import torch or Detectron2.
"""
import argparse
import hashlib
import json
import logging
import os
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence

logger = logging.getLogger("up2.datasets")

# Checksums published for source archives, by file name: (algorithm, hex digest). Only files whose
# publisher (or the reference loader, torchvision for ImageNet) gives a checksum are listed; COCO,
# the Karpathy split files, Flickr30k, CC3M/CC12M/SBU/VG/YFCC (URL lists) and the text corpora have
# none published.
KNOWN_CHECKSUMS: Dict[str, tuple] = {
    "ILSVRC2012_img_train.tar": ("md5", "1d675b47d978889d74fa0da5fadfb00e"),
    "ILSVRC2012_img_val.tar": ("md5", "29b22e2961454d5413ddabcf34fc5622"),
    "ILSVRC2012_devkit_t12.tar.gz": ("md5", "fa75699e90414af021442c21a62c3abf"),
}

_CHECKSUM_CACHE = ".verified_checksums.json"


class ChecksumError(ValueError):
    """A source archive does not have its published checksum."""


def setup_logging(verbose: bool = False):
    """INFO (DEBUG with ``verbose``) logging to stderr, once."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="[%(asctime)s %(name)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")


def add_common_arguments(parser: argparse.ArgumentParser):
    """``--overwrite`` and ``--verbose``, shared by every script."""
    parser.add_argument("--overwrite", action="store_true",
                        help="redo outputs that already exist (default: keep complete outputs, resume the rest)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", unit: str = "it"):
    """``tqdm(iterable)`` when tqdm is installed, else the iterable with a log line every ~10%
    (every 10,000 items when the total is unknown)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=2.0)
        return
    step = max(1, total // 10) if total else 10000
    done = 0
    for item in iterable:
        yield item
        done += 1
        if done % step == 0:
            logger.info("%s: %d%s %s", desc, done, f"/{total}" if total else "", unit)


def atomic_write_bytes(path: str, data: bytes):
    """Writes ``data`` to ``path`` through a temporary file and a rename: ``path`` is complete or absent."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_json(path: str, obj):
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=None).encode("utf-8"))


def file_digest(path: str, algorithm: str = "md5", chunk: int = 1 << 22) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_known_checksum(path: str, cache_dir: str) -> bool:
    """Checks ``path`` against :data:`KNOWN_CHECKSUMS` (by file name).

    A verified file is remembered in ``cache_dir/.verified_checksums.json`` (with its size and mtime),
    so a resumed run does not hash it again.

    Returns:
        True when verified, False when no checksum is published for this file name.

    Raises:
        ChecksumError: the digest differs from the published one.
    """
    name = os.path.basename(path)
    if name not in KNOWN_CHECKSUMS:
        logger.info("No published checksum for %s: not verified", name)
        return False
    algorithm, expected = KNOWN_CHECKSUMS[name]
    stat = os.stat(path)
    key = os.path.realpath(path)
    cache_file = os.path.join(cache_dir, _CHECKSUM_CACHE)
    cache = {}
    if os.path.isfile(cache_file):
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    entry = cache.get(key)
    if entry == {"size": stat.st_size, "mtime": stat.st_mtime, algorithm: expected}:
        logger.info("%s: %s already verified", name, algorithm)
        return True
    logger.info("Verifying the %s of %s (%.1f GB)...", algorithm, path, stat.st_size / 1e9)
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise ChecksumError(f"{path}: {algorithm} is {actual}, the published value is {expected}; "
                            "the file is corrupt or incomplete, download it again")
    cache[key] = {"size": stat.st_size, "mtime": stat.st_mtime, algorithm: expected}
    atomic_write_json(cache_file, cache)
    return True


def outputs_complete(paths: Sequence[str], overwrite: bool) -> bool:
    """True (and logged) when every output exists and ``overwrite`` is off. Outputs are written
    atomically, so an existing one is complete."""
    if overwrite or not all(os.path.exists(p) for p in paths):
        return False
    logger.info("Outputs exist, nothing to do (pass --overwrite to redo): %s", ", ".join(paths))
    return True


# Karpathy caption splits ---------------------------------------------------------------------------

def load_karpathy_json(path: str) -> List[dict]:
    """The ``images`` of a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``),
    checked for the keys the conversion needs."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: expected a Karpathy split file with an 'images' list")
    for i, image in enumerate(images):
        missing = [k for k in ("filename", "split", "sentences") if k not in image]
        if missing:
            raise ValueError(f"{path}: images[{i}] has no key(s) {missing} (keys: {sorted(image)})")
    return images


def karpathy_to_caption_splits(images: List[dict], split_of: Dict[str, str], file_name: Callable[[dict], str],
                               image_id: Callable[[dict], int], source: str) -> Dict[str, dict]:
    """Converts Karpathy entries to up2's caption json (COCO-captions format) per output split.

    Args:
        images: Karpathy ``images`` entries.
        split_of: Karpathy split ("train", "restval", "val", "test") -> output split; splits not
            listed are dropped.
        file_name: image path relative to the dataset's image root.
        image_id: integer id of an image.
        source: name of the source file (in errors).

    Returns:
        ``{split: {"info", "images": [{"id", "file_name"}], "annotations": [{"id", "image_id",
        "caption"}]}}``.
    """
    out = {split: {"info": {"description": f"Karpathy {split} split converted from {os.path.basename(source)}"},
                   "images": [], "annotations": []} for split in sorted(set(split_of.values()))}
    seen_images, seen_sentences = set(), set()
    for image in images:
        split = split_of.get(image["split"])
        if split is None:
            continue
        iid = int(image_id(image))
        if iid in seen_images:
            raise ValueError(f"{source}: image id {iid} ({image['filename']}) appears twice")
        seen_images.add(iid)
        out[split]["images"].append({"id": iid, "file_name": file_name(image)})
        for sentence in image["sentences"]:
            sid = int(sentence["sentid"])
            if sid in seen_sentences:
                raise ValueError(f"{source}: sentence id {sid} of {image['filename']} appears twice")
            seen_sentences.add(sid)
            caption = sentence.get("raw") or " ".join(sentence.get("tokens", []))
            out[split]["annotations"].append({"id": sid, "image_id": iid, "caption": caption.strip()})
    counts = Counter(image["split"] for image in images)
    logger.info("%s: Karpathy splits %s -> %s", os.path.basename(source), dict(counts),
                {s: len(d["images"]) for s, d in out.items()})
    return out


def write_caption_splits(splits: Dict[str, dict], outputs: Dict[str, str], expected_images: Dict[str, int],
                         overwrite: bool):
    """Writes each split's caption json to ``outputs[split]`` (kept if it exists, unless ``overwrite``),
    warning when a split's image count differs from ``expected_images[split]`` (the standard split)."""
    for split, path in outputs.items():
        count = len(splits[split]["images"])
        if count != expected_images[split]:
            logger.warning("Split %s has %d images; the standard Karpathy split has %d", split, count,
                           expected_images[split])
        if os.path.exists(path) and not overwrite:
            logger.info("%s exists, kept", path)
            continue
        atomic_write_json(path, splits[split])
        logger.info("Wrote %s: %d images, %d captions", path, count, len(splits[split]["annotations"]))
