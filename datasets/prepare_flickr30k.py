#!/usr/bin/env python
"""Flickr30k Karpathy splits -> up2's caption json (the retrieval test set ``flickr30k_test``).

Input: Karpathy's ``dataset_flickr30k.json`` (from ``caption_datasets.zip``) and the Flickr30k images
(``flickr30k-images/*.jpg``); neither has a published checksum. Output (registered as
``flickr30k_{train,val,test}``)::

    OUT/captions_test.json  (and captions_train.json, captions_val.json with --splits)

in the COCO-captions format read by ``register_caption_dataset``: ``images`` ({"id": the numeric
Flickr id from the file name, "file_name": "1007129816.jpg"}) and ``annotations`` ({"id": sentid,
"image_id", "caption": raw sentence}). The standard splits have 29,000 / 1,014 / 1,000 images with
5 captions each.

Resumable: existing split files are kept (written atomically) unless ``--overwrite``.

Example::

    python datasets/prepare_flickr30k.py --karpathy-json datasets/flickr30k/dataset_flickr30k.json \\
        --out datasets/flickr30k
"""
import argparse
import os
import sys

from _prepare_common import (add_common_arguments, karpathy_to_caption_splits, write_caption_splits,
                             load_karpathy_json, outputs_complete, setup_logging)

EXPECTED_IMAGES = {"train": 29000, "val": 1014, "test": 1000}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--karpathy-json", required=True, help="Karpathy's dataset_flickr30k.json")
    parser.add_argument("--out", required=True, help="output directory (e.g. datasets/flickr30k)")
    parser.add_argument("--image-dir", default=None,
                        help="directory of the Flickr30k images, checked (default OUT/flickr30k-images)")
    parser.add_argument("--splits", nargs="+", choices=sorted(EXPECTED_IMAGES), default=["train", "val", "test"],
                        help="splits to write")
    parser.add_argument("--skip-image-check", action="store_true", help="do not check that the images exist")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def flickr_image_id(image: dict) -> int:
    """The numeric Flickr photo id of the file name (``1007129816.jpg`` -> 1007129816), else Karpathy's
    ``imgid``."""
    stem = os.path.splitext(image["filename"])[0]
    if stem.isdigit():
        return int(stem)
    if "imgid" not in image:
        raise ValueError(f"Flickr30k image {image['filename']} has neither a numeric name nor an 'imgid'")
    return int(image["imgid"])


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    outputs = [os.path.join(args.out, f"captions_{split}.json") for split in args.splits]
    if outputs_complete(outputs, args.overwrite):
        return 0
    images = load_karpathy_json(args.karpathy_json)
    splits = karpathy_to_caption_splits(images, {s: s for s in args.splits}, lambda im: im["filename"],
                                        flickr_image_id, args.karpathy_json)
    if not args.skip_image_check:
        image_dir = args.image_dir or os.path.join(args.out, "flickr30k-images")
        missing = [im["file_name"] for data in splits.values() for im in data["images"]
                   if not os.path.isfile(os.path.join(image_dir, im["file_name"]))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {args.karpathy_json} are missing under {image_dir}, "
                                    f"e.g. {missing[:3]}; extract flickr30k-images there or pass --skip-image-check")
    write_caption_splits(splits, dict(zip(args.splits, outputs)), EXPECTED_IMAGES, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
