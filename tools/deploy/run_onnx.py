#!/usr/bin/env python
"""Draws the predictions of an exported up2 graph (``tools/deploy/export_onnx.py``) on images: the model
runs in onnxruntime (:class:`up2.deploy.runtime.OnnxPredictor`, no PyTorch inference), the picture is
``demo/demo.py``'s (its ``visualize``: Detectron2's Visualizer for detection, top-5 classes for
classification).

Example::

    python tools/deploy/run_onnx.py --model detector.onnx --input photos/*.jpg --output vis_onnx/

Every input gets ``OUTPUT/<file stem>.png``. The class names, input size, channel order and test-time
resize come from the graph's metadata. Unreadable inputs are reported by name and skipped; the exit status
is non-zero only when no input could be processed.
"""
import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import up2  # noqa: F401  (applies the Detectron2 compatibility fixes; must precede detectron2 imports)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_module import load_demo  # noqa: E402  (tools/deploy/demo_module.py)

logger = logging.getLogger("up2.deploy")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw the predictions of an exported up2 ONNX graph")
    parser.add_argument("--model", required=True, metavar="FILE", help="the .onnx file of export_onnx.py")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files or glob patterns (quote them: 'photos/*.jpg')")
    parser.add_argument("--output", required=True, help="directory for the visualisations (<stem>.png)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the detections drawn")
    parser.add_argument("--num-threads", type=int, default=None, help="onnxruntime intra-op threads")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    demo = load_demo()
    from up2.deploy.evaluation import to_model_output
    from up2.deploy.runtime import OnnxPredictor

    paths = demo.expand_inputs(args.input)
    if not paths:
        logger.error("No input image: %s", args.input)
        return 1
    predictor = OnnxPredictor(args.model, num_threads=args.num_threads)
    return demo.visualize_images(
        paths, lambda image: to_model_output(predictor(image), predictor.task, image.shape[:2]), predictor.task,
        predictor.class_names, args.output, args.confidence_threshold, f"up2 run_onnx ({predictor.task})")


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="up2")
    sys.exit(main())
