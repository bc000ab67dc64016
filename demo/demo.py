#!/usr/bin/env python
"""Draws UniPerceiverV2 predictions on images, one task at a time.

Examples::

    python demo/demo.py --config-file configs/X.yaml --input photos/*.jpg --output vis/ \\
        --task detection --vocabulary "person,dog,umbrella" --opts MODEL.WEIGHTS model_final.pth
    python demo/demo.py ... --task classification --vocabulary "cat,dog,car"
    python demo/demo.py ... --task captioning
    python demo/demo.py ... --task retrieval --texts "a dog on a beach" "a plate of food"

Every input gets ``OUTPUT/<file stem>.png`` (same size as the input): detection draws boxes, masks, class
names and scores with Detectron2's ``Visualizer``; classification the top-5 classes and probabilities;
captioning the caption; retrieval the texts ranked by similarity. The textual results are also logged.
An unreadable or missing input is reported by name and skipped; the exit status is non-zero only when
no input could be processed (or the arguments are invalid).
"""
import argparse
import glob
import logging
import os
import sys
import textwrap
from typing import Callable, List, Optional, Sequence

import up2  # noqa: F401  (applies the Detectron2 compatibility fixes; must precede detectron2 imports)
import numpy as np
from detectron2.data.catalog import Metadata
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from up2.config import load_config
from up2.data.mappers import ImageReadError, read_image  # Detectron2's read_image, naming the file on error
from up2.engine import UP2Predictor
from up2.engine.predictor import IMAGE_TASKS, VOCABULARY_TASKS

try:
    from tqdm import tqdm
except ImportError:  # progress is logged instead
    tqdm = None

logger = logging.getLogger("up2.demo")

TOP_K = 5


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Uni-Perceiver v2 demo: draw predictions on images")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files or glob patterns (quote them: 'photos/*.jpg')")
    parser.add_argument("--output", required=True, help="directory for the visualisations (<stem>.png)")
    parser.add_argument("--task", default="detection", choices=IMAGE_TASKS)
    parser.add_argument("--vocabulary", default=None,
                        help="comma-separated class names for detection / classification (open vocabulary); "
                             "default: the classes of the config's dataset")
    parser.add_argument("--texts", nargs="+", default=None, help="texts to rank against each image (retrieval)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the detections drawn")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="modify config options using the command-line 'KEY VALUE' pairs")
    return parser


def parse_vocabulary(text: Optional[str], parser: argparse.ArgumentParser) -> Optional[List[str]]:
    """'cat, dog' -> ['cat', 'dog']; an empty list, an empty name or a name given twice is a usage error."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not any(names):
        parser.error("--vocabulary is empty: give comma-separated class names, e.g. --vocabulary 'cat,dog'")
    empty = [i + 1 for i, name in enumerate(names) if not name]
    if empty:
        parser.error(f"--vocabulary {text!r} has an empty class name at position(s) {empty}")
    repeated = sorted({name for name in names if names.count(name) > 1}, key=names.index)
    if repeated:
        parser.error(f"--vocabulary {text!r} names {repeated} more than once: each class name must be unique")
    return names


def check_texts(texts: Optional[List[str]], parser: argparse.ArgumentParser):
    """Every ``--texts`` entry must hold some text (an empty one is a usage error naming its position)."""
    if texts is None:
        return
    empty = [i + 1 for i, text in enumerate(texts) if not text.strip()]
    if empty:
        parser.error(f"--texts has an empty text at position(s) {empty}: give each text to rank as a non-empty "
                     "quoted argument, e.g. --texts 'a dog on a beach' 'a plate of food'")


def check_args(args, parser: argparse.ArgumentParser) -> Optional[List[str]]:
    """Validates the task-specific options; returns the vocabulary."""
    vocabulary = parse_vocabulary(args.vocabulary, parser)
    check_texts(args.texts, parser)
    if vocabulary is not None and args.task not in VOCABULARY_TASKS:
        parser.error(f"--vocabulary applies to {list(VOCABULARY_TASKS)}, not --task {args.task}")
    if args.texts is not None and args.task != "retrieval":
        parser.error(f"--texts applies to --task retrieval, not --task {args.task}")
    if args.task == "retrieval" and not args.texts:
        parser.error("--task retrieval needs --texts: the texts to rank against each image")
    return vocabulary


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Glob patterns expanded (sorted); other paths kept as given, existing or not (checked when read)."""
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                logger.error("No file matches %s", pattern)
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths


def output_path(output_dir: str, path: str, used: set) -> str:
    """``output_dir/<stem>.png``; a stem seen before gets a ``_<n>`` suffix (nothing is overwritten)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:
        name, n = f"{stem}_{n}", n + 1
    if name != stem:
        logger.warning("%s: another input has the stem %r; writing %s.png", path, stem, name)
    used.add(name)
    return os.path.join(output_dir, name + ".png")


def draw_lines(visualizer: Visualizer, lines: Sequence[str], bottom: bool = False, min_font_size: float = 5):
    """Draws lines of text (wrapped to the image width) at the top-left (or bottom-left) corner, in the
    largest font size up to the Visualizer's default that fits the image; lines that still do not fit
    are left out (they are logged by the caller)."""
    height, width = visualizer.output.height, visualizer.output.width
    font_size = visualizer._default_font_size
    while True:
        font_px = font_size * visualizer.output.dpi / 72  # matplotlib sizes text in points
        chars = max(8, int(width / (0.6 * font_px)))
        wrapped = [part for line in lines for part in (textwrap.wrap(line, chars) or [""])]
        step, margin = 1.9 * font_px, 0.4 * font_px
        if margin + step * len(wrapped) <= height or font_size <= min_font_size:
            break
        font_size = max(min_font_size, font_size - 1)
    wrapped = wrapped[:max(1, int((height - margin) // step))]
    top = max(0.0, height - margin - step * len(wrapped)) if bottom else margin
    for i, line in enumerate(wrapped):
        visualizer.draw_text(line, (margin, top + i * step), font_size=font_size, color="white",
                             horizontal_alignment="left")


def visualize(image_rgb: np.ndarray, task: str, output: dict, class_names: Optional[List[str]],
              threshold: float):
    """Returns (RGB visualisation of the input's size, text lines of the result)."""
    visualizer = Visualizer(image_rgb, Metadata(thing_classes=class_names or []))
    if task == "detection":
        instances = output["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        vis = visualizer.draw_instance_predictions(instances)
        names = [class_names[int(c)] if class_names else str(int(c)) for c in instances.pred_classes]
        lines = [f"{n} {float(s):.2f}" for n, s in zip(names, instances.scores)]
        lines = lines[:10] + (["..."] if len(lines) > 10 else [])  # the best ones (sorted by score)
        return vis.get_image(), [f"{len(instances)} detection(s) with score >= {threshold}"] + lines
    if task == "classification":
        probs = output["class_scores"].float().cpu()
        top = probs.topk(min(TOP_K, probs.numel()))
        lines = [f"{class_names[int(i)]}: {float(p):.1%}" for p, i in zip(top.values, top.indices)]
        draw_lines(visualizer, lines)
    elif task == "captioning":
        lines = [output["caption"] or "(empty caption)"]
        draw_lines(visualizer, lines, bottom=True)
    else:
        lines = [f"{rank}. {text} ({score:.3f})" for rank, (text, score) in enumerate(output["ranked_texts"], 1)]
        draw_lines(visualizer, lines)
    return visualizer.output.get_image(), lines


def visualize_images(paths: Sequence[str], predict: Callable[[np.ndarray], dict], task: str,
                     class_names: Optional[List[str]], output_dir: str, confidence_threshold: float,
                     summary: str) -> int:
    """Reads every image (BGR), predicts, draws and saves ``<output_dir>/<stem>.png``; an unreadable image
    or a failing prediction is logged and skipped, the others go on.

    Args:
        predict: BGR (H, W, 3) uint8 image -> the task's output dict (as :class:`UP2Predictor` returns).
        summary: the start of the final line printed (what ran).

    Returns:
        the exit status: 0 when at least one image was written, else 1.
    """
    os.makedirs(output_dir, exist_ok=True)
    written, failed, used = [], [], set()
    progress = tqdm(paths, desc=summary, unit="image") if tqdm is not None else paths
    for index, path in enumerate(progress, 1):
        if tqdm is None:
            logger.info("[%d/%d] %s", index, len(paths), path)
        try:
            image = read_image(path, "BGR")
        except ImageReadError as e:
            logger.error("Skipping %s: %s", path, e)
            failed.append(path)
            continue
        try:
            vis, lines = visualize(image[:, :, ::-1], task, predict(image), class_names, confidence_threshold)
            out_file = output_path(output_dir, path, used)
            Image.fromarray(vis).save(out_file)
        except Exception:  # one bad input must not stop the others
            logger.exception("Failed on %s; skipped", path)
            failed.append(path)
            continue
        logger.info("%s -> %s: %s", path, out_file, " | ".join(lines))
        written.append(out_file)
    print(f"{summary}: wrote {len(written)} of {len(paths)} image(s) to {output_dir}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if written else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    vocabulary = check_args(args, parser)
    logger.info("Arguments: %s", args)
    paths = expand_inputs(args.input)
    if not paths:
        logger.error("No input image: %s", args.input)
        return 1
    predictor = UP2Predictor(setup_cfg(args))
    if vocabulary is not None:
        predictor.set_vocabulary(args.task, vocabulary)
    class_names = predictor.vocabulary(args.task) if args.task in VOCABULARY_TASKS else None
    if args.task in VOCABULARY_TASKS and not class_names:
        logger.error("--task %s needs class names: give --vocabulary 'a,b,...' (the config's datasets name none)",
                     args.task)
        return 2
    return visualize_images(paths, lambda image: predictor(image, args.task, texts=args.texts), args.task,
                            class_names, args.output, args.confidence_threshold, f"up2 demo ({args.task})")


def setup_logging():
    """Detectron2-style console logging (only when run as a script: importing ``main`` leaves it alone)."""
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="up2")


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
