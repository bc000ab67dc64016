#!/usr/bin/env python
"""COCO AP of an exported detector (onnxruntime) and of the PyTorch model on the same images.

Example::

    DETECTRON2_DATASETS=datasets python tools/deploy/evaluate_onnx.py \\
        --config-file configs/shapes/up2_multitask_EffLite0_MiniLM.yaml --model detector.onnx \\
        --dataset shapes_det_val --opts MODEL.WEIGHTS output/demo/model_final.pth

Both use up2's COCO evaluator (Detectron2's ``COCOEvaluator``, pure-Python COCOeval); the export must
hold the dataset's class names (``export_onnx.py`` without ``--vocabulary`` does). Prints both bbox / segm
results and their difference, and writes them to ``--output-dir/onnx_vs_pytorch.json``.
"""
import argparse
import json
import logging
import os
import sys

import up2  # noqa: F401  (applies the Detectron2 compatibility fixes; must precede detectron2 imports)

logger = logging.getLogger("up2.deploy")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="COCO AP of an exported up2 detector vs PyTorch")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's config file")
    parser.add_argument("--model", required=True, metavar="FILE", help="the detection .onnx file")
    parser.add_argument("--dataset", default=None,
                        help="a registered detection dataset (default: the config's first detection test dataset)")
    parser.add_argument("--output-dir", default=None, help="default: OUTPUT_DIR/inference_onnx/<dataset>")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--num-threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="modify config options using the command-line 'KEY VALUE' pairs")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import up2.data  # noqa: F401  (registers the built-in datasets)
    from up2.config import load_config
    from up2.deploy.evaluation import compare_detection_ap, default_test_dataset

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    dataset = args.dataset or default_test_dataset(cfg, "detection")
    output_dir = args.output_dir or os.path.join(cfg.OUTPUT_DIR, "inference_onnx", dataset)
    results = compare_detection_ap(cfg, args.model, dataset, output_dir, args.num_threads, args.limit)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "onnx_vs_pytorch.json"), "w") as f:
        json.dump(results, f, indent=2)
    for task in ("bbox", "segm"):
        if task in results["pytorch"]:
            torch_ap, onnx_ap = results["pytorch"][task]["AP"], results["onnxruntime"][task]["AP"]
            print(f"{dataset} {task}: AP PyTorch {torch_ap:.3f}, onnxruntime {onnx_ap:.3f}, "
                  f"difference {onnx_ap - torch_ap:+.3f}; AP50 {results['pytorch'][task]['AP50']:.3f} vs "
                  f"{results['onnxruntime'][task]['AP50']:.3f}")
    return 0


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="up2")
    sys.exit(main())
