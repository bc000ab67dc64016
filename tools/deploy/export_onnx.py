#!/usr/bin/env python
"""Exports Uni-Perceiver v2 detection (boxes, scores, classes, masks) or classification with a fixed
vocabulary to ONNX, and checks the graph with onnxruntime against PyTorch.

Examples::

    python tools/deploy/export_onnx.py --config-file configs/shapes/up2_multitask_EffLite0_MiniLM.yaml \\
        --task detection --output detector.onnx --opts MODEL.WEIGHTS output/demo/model_final.pth
    python tools/deploy/export_onnx.py --config-file X.yaml --task classification \\
        --vocabulary "cat,dog,car" --output classifier.onnx MODEL.WEIGHTS model_final.pth

``--vocabulary`` defaults to the classes of the config's dataset. The graph's images have a fixed size
(``--image-size H W``; default: detection ``INPUT.MIN_SIZE_TEST`` squared, classification
``DATASETS.UP2.IMAGE_SIZE``) and a dynamic batch. Config overrides go after ``--opts`` or at the end,
as ``KEY VALUE`` pairs. The export runs on the CPU with the PyTorch deformable attention and needs no
network: the class names are encoded here, once, and stored in the graph as constants and as metadata.
"""
import argparse
import json
import logging
import os
import sys

import up2  # noqa: F401  (applies the Detectron2 compatibility fixes; must precede detectron2 imports)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_module import load_demo  # noqa: E402  (tools/deploy/demo_module.py)

logger = logging.getLogger("up2.deploy")


def get_parser() -> argparse.ArgumentParser:
    from up2.deploy.graphs import EXPORT_TASKS

    parser = argparse.ArgumentParser(description="Export Uni-Perceiver v2 detection / classification to ONNX")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--task", default="detection", choices=EXPORT_TASKS)
    parser.add_argument("--vocabulary", default=None,
                        help="comma-separated class names (default: the classes of the config's dataset)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="fixed input size of the graph (detection only; see the module docstring)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch comparison")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="modify config options using the command-line 'KEY VALUE' pairs")
    return parser


def parse_args(argv=None):
    """Arguments; config ``KEY VALUE`` pairs after the known options join ``--opts`` (Detectron2 tools)."""
    parser = get_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if item.startswith("--")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.opts = list(args.opts) + rest
    if len(args.opts) % 2:
        parser.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    args.vocabulary = load_demo().parse_vocabulary(args.vocabulary, parser)
    return args, parser


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    from up2.config import load_config
    from up2.deploy.export import compare_with_onnxruntime, default_image_size, export_onnx, runtime_preprocessing
    from up2.engine import UP2Predictor

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.UP2.MSDA_IMPL = "pytorch"  # the exported form of the deformable attention
    steps = runtime_preprocessing(cfg, args.task)
    image_size = tuple(args.image_size) if args.image_size else default_image_size(steps)
    if args.task == "classification" and image_size != default_image_size(steps):
        parser.error(f"--image-size {image_size}: classification images are DATASETS.UP2.IMAGE_SIZE squared "
                     f"{default_image_size(steps)} (change that key with --opts instead)")
    if min(image_size) < 1:
        parser.error(f"--image-size must be positive, got {list(image_size)}")
    predictor = UP2Predictor(cfg)
    class_names = args.vocabulary or predictor.vocabulary(args.task)
    if not class_names:
        parser.error(f"--task {args.task} needs class names: the config's datasets name none; give --vocabulary 'a,b'")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    metadata = export_onnx(predictor.model, args.task, class_names, args.output, image_size=image_size,
                           input_format=cfg.INPUT.FORMAT, preprocessing=steps)
    print(f"up2 export ({args.task}): wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB), "
          f"input {metadata.image_size[0]}x{metadata.image_size[1]} {metadata.input_format}, "
          f"{len(class_names)} classes")
    if not args.no_check:
        differences = compare_with_onnxruntime(predictor.model, args.output)
        print("onnxruntime vs PyTorch on 2 random images, max |difference| per output: " + json.dumps(differences))
    return 0


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="up2")
    sys.exit(main())
