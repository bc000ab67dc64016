#!/usr/bin/env python
"""COCO Karpathy caption splits -> up2's caption json, one file per split.

Input: Karpathy's ``dataset_coco.json`` (from ``caption_datasets.zip``, no published checksum) and the
COCO images. Output (registered as ``coco_caption_karpathy_{train,val,test}``)::

    OUT/captions_train.json  captions_val.json  captions_test.json

in the COCO-captions format read by ``register_caption_dataset``: ``images`` ({"id": cocoid,
"file_name": path relative to the COCO root}) and ``annotations`` ({"id": sentid, "image_id",
"caption": raw sentence}). ``train`` holds Karpathy's train + restval (113,287 images) unless
``--no-restval``; val and test hold 5,000 images each.

``--image-layout 2014`` (default) keeps Karpathy's paths (``val2014/COCO_val2014_000000391895.jpg``);
``2017`` points at the COCO 2017 files (``train2017/000000391895.jpg`` or ``val2017/...``, whichever
exists under ``--coco-root``), for a machine that only has the 2017 images Detectron2 uses.

Resumable: existing split files are kept (written atomically) unless ``--overwrite``.

Example::

    python datasets/prepare_coco_karpathy.py --karpathy-json datasets/coco_karpathy/dataset_coco.json \\
        --coco-root datasets/coco --out datasets/coco_karpathy
"""
import argparse
import os
import sys

from _prepare_common import (add_common_arguments, karpathy_to_caption_splits, load_karpathy_json,
                             outputs_complete, setup_logging, write_caption_splits)

SPLITS = ("train", "val", "test")
# Number of images of each split of the standard Karpathy COCO file (train includes restval).
EXPECTED_IMAGES = {"train": 113287, "val": 5000, "test": 5000}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--karpathy-json", required=True, help="Karpathy's dataset_coco.json")
    parser.add_argument("--coco-root", required=True, help="directory holding the COCO image folders")
    parser.add_argument("--out", required=True, help="output directory (e.g. datasets/coco_karpathy)")
    parser.add_argument("--image-layout", choices=("2014", "2017"), default="2014",
                        help="image file names of COCO 2014 (Karpathy's) or COCO 2017")
    parser.add_argument("--no-restval", action="store_true", help="train = Karpathy train only (82,783 images)")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="do not check that every image exists under --coco-root (2014 layout only)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def _file_name_fn(coco_root: str, layout: str):
    if layout == "2014":
        def file_name(image):
            return f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
        return file_name

    def file_name_2017(image):
        name = f"{int(image['cocoid']):012d}.jpg"
        for folder in ("train2017", "val2017"):
            if os.path.isfile(os.path.join(coco_root, folder, name)):
                return f"{folder}/{name}"
        raise FileNotFoundError(f"COCO image {name} (cocoid {image['cocoid']}, Karpathy {image['filename']}) is in "
                                f"neither {coco_root}/train2017 nor {coco_root}/val2017")
    return file_name_2017


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    outputs = [os.path.join(args.out, f"captions_{split}.json") for split in SPLITS]
    if outputs_complete(outputs, args.overwrite):
        return 0
    images = load_karpathy_json(args.karpathy_json)
    missing_id = [im["filename"] for im in images if "cocoid" not in im]
    if missing_id:
        raise ValueError(f"{args.karpathy_json}: {len(missing_id)} images have no 'cocoid' (e.g. {missing_id[0]}); "
                         "is this dataset_coco.json?")
    split_of = {"train": "train", "val": "val", "test": "test"}
    if not args.no_restval:
        split_of["restval"] = "train"
    file_name = _file_name_fn(args.coco_root, args.image_layout)
    splits = karpathy_to_caption_splits(images, split_of, file_name, lambda im: im["cocoid"], args.karpathy_json)
    if args.image_layout == "2014" and not args.skip_image_check:
        missing = [im["file_name"] for data in splits.values() for im in data["images"]
                   if not os.path.isfile(os.path.join(args.coco_root, im["file_name"]))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {args.karpathy_json} are missing under "
                                    f"{args.coco_root}, e.g. {missing[:3]}; download COCO 2014 train/val images, "
                                    "use --image-layout 2017, or pass --skip-image-check")
    expected = dict(EXPECTED_IMAGES, train=82783) if args.no_restval else EXPECTED_IMAGES
    write_caption_splits(splits, dict(zip(SPLITS, outputs)), expected, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
