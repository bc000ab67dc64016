#!/usr/bin/env python
"""One PNG showing what a trained UniPerceiverV2 does on the first images of a registered dataset.

    python tools/demo_picture.py --config-file configs/shapes/up2_multitask_R18.yaml \\
        --weights output/shapes_up2/model_final.pth --dataset shapes_det_val --num-images 6 \\
        --output output/shapes_up2/demo_predictions.png [KEY VALUE ...]

Every image becomes a tile of a 3-column grid: the image upscaled x2 (nearest) with the detections drawn by
Detectron2's ``Visualizer`` (boxes, masks, class names, scores; class names: the dataset's
``thing_classes``), above a white band with the top-1 class of the classification task (over the model's
own classification vocabulary) and the generated caption.
"""
import argparse
import logging
import os
import sys
import textwrap
from typing import List, Optional, Sequence

import up2  # noqa: F401  (applies the Detectron2 compatibility fixes; must precede detectron2 imports)
import up2.data  # noqa: F401  (registers the datasets, shapes under $DETECTRON2_DATASETS)
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer
from PIL import Image, ImageDraw, ImageFont

from up2.config import load_config
from up2.engine import UP2Predictor

logger = logging.getLogger("up2.demo_picture")

COLUMNS, SCALE, GAP = 3, 2, 4  # grid columns, image upscaling, pixels between tiles
FONT_SIZE, LINE_HEIGHT, TEXT_LINES, PAD = 13, 16, 4, 4  # text band: top class, then caption (wrapped)
BAND_HEIGHT = PAD * 2 + LINE_HEIGHT * TEXT_LINES
MAX_DETECTIONS = 20


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", required=True, help="checkpoint (e.g. OUTPUT/model_final.pth)")
    parser.add_argument("--dataset", default="shapes_det_val", help="registered dataset with file_name's")
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--score-threshold", type=float, default=0.15, help="minimum score of drawn detections")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def load_font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def fit_lines(text: str, font, width: int, max_lines: int) -> List[str]:
    """``text`` wrapped to ``width`` pixels, at most ``max_lines`` lines (the last one ends in '...' if cut)."""
    chars = max(8, int(width / max(1.0, font.getlength("abcdefghij") / 10)))
    lines = textwrap.wrap(text, chars) or [""]
    while len(lines) > 1 and any(font.getlength(line) > width for line in lines) and chars > 8:
        chars -= 2
        lines = textwrap.wrap(text, chars)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, chars - 3)].rstrip() + "..."
    return lines


def draw_detections(image_bgr: np.ndarray, output: dict, metadata, threshold: float):
    """(RGB image upscaled x SCALE with the detections drawn, number of detections drawn)."""
    instances = output["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    instances = instances[instances.scores.argsort(descending=True)[:MAX_DETECTIONS]]
    # scale: matplotlib shows the image enlarged with nearest interpolation, and draws crisp text over it
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, scale=SCALE)
    return visualizer.draw_instance_predictions(instances).get_image(), len(instances)


def compose(tiles: List[Image.Image], texts: List[List[str]]) -> Image.Image:
    """The grid: COLUMNS tiles a row, each = image above a white band of text lines."""
    cell_w = max(t.width for t in tiles)
    cell_h = max(t.height for t in tiles) + BAND_HEIGHT
    rows = (len(tiles) + COLUMNS - 1) // COLUMNS
    columns = min(COLUMNS, len(tiles))
    canvas = Image.new("RGB", (columns * cell_w + (columns + 1) * GAP, rows * cell_h + (rows + 1) * GAP), "gray")
    draw, font = ImageDraw.Draw(canvas), load_font()
    for i, (tile, lines) in enumerate(zip(tiles, texts)):
        x = GAP + (i % COLUMNS) * (cell_w + GAP)
        y = GAP + (i // COLUMNS) * (cell_h + GAP)
        draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill="white")
        canvas.paste(tile, (x, y))
        band_y = y + cell_h - BAND_HEIGHT + PAD
        for j, line in enumerate(lines):
            draw.text((x + PAD, band_y + j * LINE_HEIGHT), line, fill="black", font=font)
    return canvas


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be >= 1")
    if not os.path.isfile(args.weights):
        raise SystemExit(f"demo_picture: weights file {args.weights} not found (train first: make demo)")
    if args.dataset not in DatasetCatalog.list():
        raise SystemExit(f"demo_picture: dataset {args.dataset!r} is not registered "
                         f"(DETECTRON2_DATASETS={os.environ.get('DETECTRON2_DATASETS', '<unset>')})")
    try:
        records = DatasetCatalog.get(args.dataset)[:args.num_images]
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f"demo_picture: cannot load dataset {args.dataset!r}: {e}") from e
    if not records:
        raise SystemExit(f"demo_picture: dataset {args.dataset!r} has no images")
    metadata = MetadataCatalog.get(args.dataset)
    thing_classes = metadata.get("thing_classes", None)
    if not thing_classes:
        raise SystemExit(f"demo_picture: dataset {args.dataset!r} has no metadata thing_classes")
    predictor = UP2Predictor(setup_cfg(args))
    predictor.set_vocabulary("detection", thing_classes)  # predicted classes index the drawn names
    tiles, results = [], []
    for record in records:
        path = record["file_name"]
        image = read_image(path, format="BGR")
        drawn, count = draw_detections(image, predictor(image, "detection"), metadata, args.score_threshold)
        try:
            scores = predictor(image, "classification")["class_scores"].float().cpu()
            names = predictor.model.vocabulary("classification")
            prob, index = scores.max(0)
            top = f"top class: {names[int(index)]} ({float(prob):.0%})"
        except ValueError as e:  # the model has no classification vocabulary
            logger.warning("classification skipped: %s", e)
            top = "top class: n/a"
        caption = predictor(image, "captioning")["caption"] or "(empty caption)"
        logger.info("%s: %d detection(s) >= %.2f, %s, caption: %s", path, count, args.score_threshold, top, caption)
        tiles.append(Image.fromarray(drawn))
        results.append((top, caption))
    font, width = load_font(), max(t.width for t in tiles) - 2 * PAD
    texts = []
    for top, caption in results:  # the top class (1-2 lines), then the caption in the lines left
        lines = fit_lines(top, font, width, 2)
        texts.append(lines + fit_lines(caption, font, width, TEXT_LINES - len(lines)))
    picture = compose(tiles, texts)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    picture.save(args.output)
    logger.info("wrote %s (%d image(s), %d x %d)", args.output, len(tiles), picture.width, picture.height)
    return args.output


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="up2")
    main(sys.argv[1:])
