#!/usr/bin/env python
"""ImageNet-1k (ILSVRC 2012) -> class folders and a class-name JSON (``imagenet_train``, ``imagenet_val``).

Output::

    OUT/train/<wnid>/*.JPEG       from ILSVRC2012_img_train.tar (a tar of one tar per class)
    OUT/val/<wnid>/*.JPEG         the 50,000 validation images, sorted by their ground-truth class
    OUT/class_names.json          {"n01440764": "tench", ...}: one readable name per class

Labels and names come from the official devkit (``--devkit ILSVRC2012_devkit_t12.tar.gz`` or its
extracted directory: ``data/meta.mat`` and ``data/ILSVRC2012_validation_ground_truth.txt``) or from
Kaggle's files (``--loc-synset-mapping LOC_synset_mapping.txt --loc-val-solution
LOC_val_solution.csv``). A readable name is the first synonym of the class's WordNet words; names
used by several classes get the second synonym, or else the wnid, in brackets (``crane (n02012849)``).
``--class-names FILE`` (JSON wnid -> name) overrides any of them, e.g. with a curated list.

Checksums: the three ILSVRC2012 archives have published MD5s (``_prepare_common.KNOWN_CHECKSUMS``),
verified once (remembered in ``OUT/.verified_checksums.json``) unless ``--no-verify``.

Resumable: a validation image already in place with the right size is not rewritten; a training
class whose folder has its ``.complete`` marker is skipped; files are written atomically.

Example::

    python datasets/prepare_imagenet.py --out datasets/imagenet --devkit ILSVRC2012_devkit_t12.tar.gz \\
        --val-images ILSVRC2012_img_val.tar --train-images ILSVRC2012_img_train.tar
"""
import argparse
import csv
import io
import json
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from typing import Dict, List, Tuple

from _prepare_common import (add_common_arguments, atomic_write_bytes, atomic_write_json, logger, progress,
                             setup_logging, verify_known_checksum)

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
COMPLETE_MARKER = ".complete"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (e.g. datasets/imagenet)")
    parser.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz or its extracted directory")
    parser.add_argument("--loc-synset-mapping", help="Kaggle LOC_synset_mapping.txt (instead of --devkit)")
    parser.add_argument("--loc-val-solution", help="Kaggle LOC_val_solution.csv (instead of --devkit)")
    parser.add_argument("--val-images", help="ILSVRC2012_img_val.tar or a directory of the flat validation JPEGs")
    parser.add_argument("--train-images",
                        help="ILSVRC2012_img_train.tar (a tar of per-class tars) or a directory of per-class tars")
    parser.add_argument("--class-names", help="JSON wnid -> readable name overriding the derived names")
    parser.add_argument("--no-verify", action="store_true", help="skip the MD5 check of the official archives")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if not args.devkit and not args.loc_synset_mapping:
        parser.error("give --devkit or --loc-synset-mapping (and --loc-val-solution for the validation set)")
    if args.val_images and not (args.devkit or args.loc_val_solution):
        parser.error("--val-images needs the validation labels: --devkit or --loc-val-solution")
    return args


# Labels and names -----------------------------------------------------------------------------------

def _read_devkit_files(devkit: str) -> Tuple[bytes, bytes]:
    """(meta.mat bytes, validation ground-truth bytes) from the devkit archive or directory."""
    wanted = {"meta.mat": None, "ILSVRC2012_validation_ground_truth.txt": None}
    if os.path.isdir(devkit):
        for directory, _, files in os.walk(devkit):
            for name in files:
                if name in wanted and wanted[name] is None:
                    with open(os.path.join(directory, name), "rb") as f:
                        wanted[name] = f.read()
    else:
        with tarfile.open(devkit) as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if member.isfile() and name in wanted and wanted[name] is None:
                    wanted[name] = tar.extractfile(member).read()
    missing = [name for name, data in wanted.items() if data is None]
    if missing:
        raise FileNotFoundError(f"devkit {devkit} has no {missing}")
    return wanted["meta.mat"], wanted["ILSVRC2012_validation_ground_truth.txt"]


def devkit_labels(devkit: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(wnid -> WordNet words, validation file name -> wnid) from the official devkit."""
    import scipy.io

    meta, ground_truth = _read_devkit_files(devkit)
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    id_to_wnid, words = {}, {}
    for synset in synsets:
        if int(synset["num_children"]) != 0:
            continue  # inner WordNet nodes; the 1000 classes are the leaves
        id_to_wnid[int(synset["ILSVRC2012_ID"])] = str(synset["WNID"])
        words[str(synset["WNID"])] = str(synset["words"])
    val = {}
    for i, line in enumerate(ground_truth.decode().split(), start=1):
        if int(line) not in id_to_wnid:
            raise ValueError(f"{devkit}: validation image {i} has class id {line}, not a leaf synset of meta.mat")
        val[f"ILSVRC2012_val_{i:08d}.JPEG"] = id_to_wnid[int(line)]
    return words, val


def kaggle_labels(synset_mapping: str, val_solution: str = None) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(wnid -> WordNet words, validation file name -> wnid) from Kaggle's LOC files."""
    words = {}
    with open(synset_mapping, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                wnid, _, text = line.strip().partition(" ")
                if not re.fullmatch(r"n\d{8}", wnid):
                    raise ValueError(f"{synset_mapping}:{n}: expected 'nXXXXXXXX words', got {line.strip()!r}")
                words[wnid] = text
    val = {}
    if val_solution:
        with open(val_solution, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    wnid = row["PredictionString"].split()[0]
                    val[f"{row['ImageId']}.JPEG"] = wnid
                except (KeyError, IndexError) as e:
                    raise ValueError(f"{val_solution}: expected columns ImageId,PredictionString, got {row}") from e
                if wnid not in words:
                    raise ValueError(f"{val_solution}: image {row['ImageId']} has class {wnid}, absent from "
                                     f"{synset_mapping}")
    return words, val


def readable_class_names(words: Dict[str, str]) -> Dict[str, str]:
    """One unique readable name per wnid from its WordNet words (see the module doc)."""
    synonyms = {wnid: [w.strip() for w in text.split(",") if w.strip()] or [wnid] for wnid, text in words.items()}
    names = {wnid: syn[0] for wnid, syn in synonyms.items()}
    for _ in range(2):
        counts = Counter(names.values())
        for wnid, name in names.items():
            if counts[name] > 1:
                second = synonyms[wnid][1] if len(synonyms[wnid]) > 1 else None
                candidate = f"{synonyms[wnid][0]} ({second})" if second and "(" not in name else None
                names[wnid] = candidate or f"{synonyms[wnid][0]} ({wnid})"
    return dict(sorted(names.items()))


# Images ---------------------------------------------------------------------------------------------

def _place(data_or_src, dest: str, size: int, overwrite: bool = False) -> bool:
    """Writes ``dest`` (bytes, or a file object copied) unless it exists with ``size`` bytes."""
    if not overwrite and os.path.isfile(dest) and os.path.getsize(dest) == size:
        return False
    if isinstance(data_or_src, bytes):
        atomic_write_bytes(dest, data_or_src)
    else:
        tmp = f"{dest}.tmp{os.getpid()}"
        with open(tmp, "wb") as out:
            shutil.copyfileobj(data_or_src, out)
        os.replace(tmp, dest)
    return True


def prepare_val(val_images: str, labels: Dict[str, str], out: str, overwrite: bool = False) -> int:
    """Places each validation image in ``out/val/<wnid>/``; returns the number written."""
    for wnid in sorted(set(labels.values())):
        os.makedirs(os.path.join(out, "val", wnid), exist_ok=True)
    written, placed = 0, set()
    if os.path.isdir(val_images):
        for name in progress(sorted(labels), total=len(labels), desc="val images", unit="img"):
            src = os.path.join(val_images, name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    written += _place(f, os.path.join(out, "val", labels[name], name), os.path.getsize(src),
                                      overwrite)
                placed.add(name)
    else:
        with tarfile.open(val_images, mode="r|*") as tar:
            for member in progress(tar, total=len(labels), desc="val images", unit="img"):
                name = os.path.basename(member.name)
                if member.isfile() and name in labels:
                    written += _place(tar.extractfile(member), os.path.join(out, "val", labels[name], name),
                                      member.size, overwrite)
                    placed.add(name)
    missing = sorted(set(labels) - placed)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(labels)} validation images are not in {val_images}, "
                                f"e.g. {missing[:3]}")
    logger.info("Validation: %d images in %d classes (%d written, %d already in place)", len(labels),
                len(set(labels.values())), written, len(labels) - written)
    return written


def _extract_class_tar(fileobj, wnid: str, out: str, overwrite: bool = False) -> int:
    class_dir = os.path.join(out, "train", wnid)
    os.makedirs(class_dir, exist_ok=True)
    count = 0
    with tarfile.open(fileobj=fileobj, mode="r|*") as inner:
        for member in inner:
            if member.isfile():
                _place(inner.extractfile(member), os.path.join(class_dir, os.path.basename(member.name)),
                       member.size, overwrite)
                count += 1
    atomic_write_bytes(os.path.join(class_dir, COMPLETE_MARKER), str(count).encode())
    return count


def prepare_train(train_images: str, classes: List[str], out: str, overwrite: bool = False) -> int:
    """Extracts each per-class tar into ``out/train/<wnid>/``; returns the number of classes extracted."""
    known, done = set(classes), 0

    def needed(name: str):
        wnid = os.path.splitext(os.path.basename(name))[0]
        if not name.endswith(".tar"):
            return None
        if wnid not in known:
            raise ValueError(f"{train_images}: per-class archive {name} is not a known class")
        if not overwrite and os.path.isfile(os.path.join(out, "train", wnid, COMPLETE_MARKER)):
            return None
        return wnid

    if os.path.isdir(train_images):
        for name in progress(sorted(os.listdir(train_images)), desc="train classes", unit="class"):
            wnid = needed(name)
            if wnid:
                with open(os.path.join(train_images, name), "rb") as f:
                    _extract_class_tar(f, wnid, out, overwrite)
                done += 1
    else:
        with tarfile.open(train_images, mode="r|*") as tar:
            for member in progress(tar, total=len(classes), desc="train classes", unit="class"):
                wnid = needed(member.name) if member.isfile() else None
                if wnid:
                    _extract_class_tar(tar.extractfile(member), wnid, out, overwrite)
                    done += 1
    present = [c for c in classes if os.path.isfile(os.path.join(out, "train", c, COMPLETE_MARKER))]
    logger.info("Train: %d classes extracted now, %d of %d complete", done, len(present), len(classes))
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    os.makedirs(args.out, exist_ok=True)
    if not args.no_verify:
        for path in (args.devkit, args.val_images, args.train_images):
            if path and os.path.isfile(path):
                verify_known_checksum(path, args.out)
    if args.devkit:
        words, val_labels = devkit_labels(args.devkit)
    else:
        words, val_labels = kaggle_labels(args.loc_synset_mapping, args.loc_val_solution)
    names = readable_class_names(words)
    if args.class_names:
        with open(args.class_names, encoding="utf-8") as f:
            override = json.load(f)
        unknown = sorted(set(override) - set(names))
        if unknown:
            raise ValueError(f"{args.class_names}: unknown wnids {unknown[:5]}")
        names.update(override)
    duplicated = sorted(n for n, c in Counter(names.values()).items() if c > 1)
    if duplicated:
        raise ValueError(f"class names are not unique: {duplicated[:5]}")
    names_file = os.path.join(args.out, "class_names.json")
    atomic_write_json(names_file, names)
    logger.info("Wrote %s (%d classes)", names_file, len(names))
    if args.val_images:
        prepare_val(args.val_images, val_labels, args.out, args.overwrite)
    if args.train_images:
        prepare_train(args.train_images, sorted(names), args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
