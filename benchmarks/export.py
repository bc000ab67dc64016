"""Images per second of an exported graph in onnxruntime vs the PyTorch model in eager mode, on the same
images, measured in one run.

Two comparisons, each the median of ``--repeats`` passes over the same ``--num-images`` images of
``--dataset`` (default: the config's first test dataset of the export's task), the two sides alternating:

* ``predictor``: what a user calls, one image at a time from the BGR array to the final result at the
  image's size: :class:`up2.engine.UP2Predictor` (PyTorch) vs :class:`up2.deploy.runtime.OnnxPredictor`
  (test-time resize, graph, thresholds and mask resizing);
* ``graph``: the network alone on batches of ``--batch-size`` already resized images: the PyTorch graph
  module of the export (:mod:`up2.deploy.graphs`) vs ``InferenceSession.run``.

PyTorch and onnxruntime get the same number of CPU threads (``--threads``). Prints images/s of each and
the ratio onnxruntime / PyTorch (> 1: onnxruntime faster)::

    python benchmarks/export.py --config-file configs/shapes/up2_multitask_EffLite0_MiniLM.yaml \\
        --model detector.onnx --threads 2 --opts MODEL.WEIGHTS output/demo/model_final.pth
"""
import argparse
import logging
import statistics
import time

import numpy as np
import torch

import up2  # noqa: F401

logger = logging.getLogger("up2.benchmarks.export")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(first, second, repeats: int):
    """Median seconds of ``first()`` and ``second()``, called in turns (after one warm-up call each)."""
    first(), second()
    times = [(seconds(first), seconds(second)) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config")
    parser.add_argument("--model", required=True, help="the .onnx export (tools/deploy/export_onnx.py)")
    parser.add_argument("--dataset", default=None, help="images of this registered dataset")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4, help="images per call of the 'graph' comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both PyTorch and onnxruntime")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config 'KEY VALUE' pairs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import up2.data  # noqa: F401  (registers the built-in datasets)
    from detectron2.data import DatasetCatalog

    from up2.config import load_config
    from up2.data.mappers import read_image
    from up2.deploy.evaluation import default_test_dataset
    from up2.deploy.graphs import build_export_graph
    from up2.deploy.metadata import INPUT_NAMES
    from up2.deploy.runtime import OnnxPredictor
    from up2.engine import UP2Predictor

    torch.set_num_threads(args.threads)
    onnx_predictor = OnnxPredictor(args.model, num_threads=args.threads)
    task = onnx_predictor.task
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    predictor = UP2Predictor(cfg)
    predictor.set_vocabulary(task, onnx_predictor.class_names)
    dataset = args.dataset or default_test_dataset(cfg, task)
    images = [read_image(r["file_name"], "BGR") for r in DatasetCatalog.get(dataset)[:args.num_images]]
    logger.info("%s export %s: %d images of %s, %d thread(s), input %dx%d, median of %d passes", task, args.model,
                len(images), dataset, args.threads, *onnx_predictor.image_size, args.repeats)

    def run_torch_predictor():
        with torch.no_grad():
            for image in images:
                predictor(image, task)

    def run_onnx_predictor():
        for image in images:
            onnx_predictor(image)

    graph = build_export_graph(predictor.model, task, onnx_predictor.class_names)
    batches = [onnx_predictor.batch([onnx_predictor.prepare(image) for image in images[i:i + args.batch_size]])
               for i in range(0, len(images), args.batch_size)]
    torch_batches = [[torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in INPUT_NAMES[task]]
                     for feeds in batches]

    def run_torch_graph():
        with torch.no_grad():
            for inputs in torch_batches:
                graph(*inputs)

    def run_onnx_graph():
        for feeds in batches:
            onnx_predictor.run(feeds)

    for name, (torch_fn, onnx_fn) in {"predictor": (run_torch_predictor, run_onnx_predictor),
                                      "graph": (run_torch_graph, run_onnx_graph)}.items():
        torch_s, onnx_s = alternate(torch_fn, onnx_fn, args.repeats)
        logger.info("%-9s PyTorch eager %7.1f images/s | onnxruntime %7.1f images/s | ratio onnxruntime / PyTorch "
                    "%.2f", name, len(images) / torch_s, len(images) / onnx_s, torch_s / onnx_s)


if __name__ == "__main__":
    main()
