#!/usr/bin/env python
"""Open-vocabulary detection on `shapes`: train with detection on the seen categories, then detect the
novel ones by name and compare with a chance baseline.

    python projects/OpenVocabDetection/train_open_vocab.py \
        [--config-file projects/OpenVocabDetection/configs/open_vocab_shapes.yaml] \
        [--novel hexagon heart arrow] [--eval-only --weights output/open_vocab_shapes/model_final.pth] [KEY VALUE ...]

The measured two-stage schedule (README): ``train_net.py --config-file
projects/OpenVocabDetection/configs/open_vocab_shapes_stage1.yaml`` (classification alone), then this script
with ``--config-file projects/OpenVocabDetection/configs/open_vocab_shapes_stage2.yaml`` (from its weights).

Needs the `shapes` dataset (``make shapes``). Writes ``OUTPUT_DIR/open_vocab_results.json``: the novel
classes detected by name (``zero_shot``) and by chance (``chance``), their AP50 ratios, and for comparison
the seen classes detected with the seen vocabulary (``seen_classes``: ``by_name`` and ``chance``).
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import up2  # noqa: E402,F401  (before detectron2)
import up2.data  # noqa: E402,F401
import up2.modeling  # noqa: E402,F401
from up2.checkpoint import AtomicCheckpointer  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from open_vocab import (NOVEL_CLASSES_DEFAULT, evaluate_classes_by_name, evaluate_novel_classes,  # noqa: E402
                        register_open_vocab_split, write_open_vocab_split)
from up2.config import load_config  # noqa: E402
from up2.data.datasets.builtin import get_datasets_root  # noqa: E402
from up2.engine import UP2Trainer  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "open_vocab_shapes.yaml")
logger = logging.getLogger("open_vocab")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--novel", nargs="+", default=list(NOVEL_CLASSES_DEFAULT))
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--weights", default="", help="checkpoint to evaluate with --eval-only")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(output=cfg.OUTPUT_DIR)
    setup_logger(name="up2")
    setup_logger(name="open_vocab")
    shapes_root = os.path.join(get_datasets_root(), "shapes")
    split = write_open_vocab_split(shapes_root, os.path.join(cfg.OUTPUT_DIR, "split"), args.novel)
    register_open_vocab_split(shapes_root, split)
    logger.info("Seen classes %s, novel classes %s", split["seen"], split["novel"])

    if args.eval_only:
        model = UP2Trainer.build_model(cfg)
        AtomicCheckpointer(model).load(args.weights)
    else:
        trainer = UP2Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model
    results = evaluate_novel_classes(cfg, model, "shapes_det_val_novel", split["novel"],
                                     os.path.join(cfg.OUTPUT_DIR, "novel_eval"))
    seen = evaluate_classes_by_name(cfg, model, "shapes_det_val_seen", split["seen"],
                                    os.path.join(cfg.OUTPUT_DIR, "seen_eval"))
    summary = {"seen": split["seen"], "novel": split["novel"], **results, "seen_classes": seen}
    for metric in ("bbox/AP50", "segm/AP50"):
        chance = results["chance"].get(metric, 0.0)
        summary[f"{metric} ratio"] = results["zero_shot"].get(metric, 0.0) / chance if chance > 0 else None
    with open(os.path.join(cfg.OUTPUT_DIR, "open_vocab_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("Novel-class detection (zero-shot) vs chance: %s", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
