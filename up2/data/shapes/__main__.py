"""``python -m up2.data.shapes --out DIR --seed S``: generate the `shapes` dataset."""
import argparse
import logging
import sys
import time

from up2.data.shapes import generate_shapes


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m up2.data.shapes", description=__doc__)
    parser.add_argument("--out", required=True, help="output directory (new, empty, or a previous shapes output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1000, help="scene images (and classification images) in train")
    parser.add_argument("--num-val", type=int, default=200, help="scene images (and classification images) in val")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size of the tokenizer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("num_train", "num_val", "image_size", "vocab_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    start = time.time()
    try:
        info = generate_shapes(args.out, args.seed, args.num_train, args.num_val, args.image_size, args.vocab_size)
    except FileExistsError as error:
        sys.exit(f"error: {error}")
    logging.info("shapes: wrote %d train + %d val scenes and classification images, captions, text corpus and "
                 "tokenizer to %s (seed %d) in %.1f s", info["num_train"], info["num_val"], args.out, args.seed,
                 time.time() - start)


if __name__ == "__main__":
    main()
