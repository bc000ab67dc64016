"""python -m up2.data.shapes --out DIR [--seed S] [--num-train N --num-val M] [--image-size 128]

Generates the synthetic multi-task dataset `shapes` (COCO instances + captions, ImageNet-style
class folders, a text corpus and a BPE tokenizer). The same seed gives byte-identical files."""
import argparse
import logging
import sys
import time

from up2.data.shapes import generate_shapes

logger = logging.getLogger("up2.data.shapes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m up2.data.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True,
                        help="output directory: new, empty, or a previous shapes output (which is replaced)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative random seed (default 0)")
    parser.add_argument("--num-train", type=int, default=1000,
                        help="train scene images, and train classification images (default 1000)")
    parser.add_argument("--num-val", type=int, default=200,
                        help="val scene images, and val classification images (default 200)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--vocab-size", type=int, default=2000, help="max BPE vocabulary size (default 2000)")
    parser.add_argument("--workers", type=int, default=None,
                        help="rendering processes (default: up to 2); the output does not depend on it")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        info = generate_shapes(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                               image_size=args.image_size, vocab_size=args.vocab_size, workers=args.workers)
    except (FileExistsError, NotADirectoryError, ValueError) as error:
        logger.error("%s", error)
        return 2
    train, val = info["counts"]["train"], info["counts"]["val"]
    logger.info("shapes (seed %d) written to %s in %.1f s: %d+%d scenes, %d+%d instances, %d+%d captions, "
                "%d+%d classification images, %d+%d text lines, tokenizer of %d tokens",
                args.seed, args.out, time.perf_counter() - start, train["images"], val["images"],
                train["instances"], val["instances"], train["captions"], val["captions"],
                train["classification_images"], val["classification_images"], train["text_lines"],
                val["text_lines"], info["tokenizer_vocab_size"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
