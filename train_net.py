#!/usr/bin/env python
"""Trains and evaluates up2 models, with Detectron2's command line.

    python train_net.py --config-file configs/shapes/X.yaml --num-gpus 2
    python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file X.yaml --resume

``--num-gpus N`` starts N processes (NCCL on GPUs; gloo on CPU-only machines). ``--eval-only``
writes ``OUTPUT_DIR/eval_results.json`` = ``{dataset_name: {metric: value}}``. ``--resume`` continues
a multi-task run exactly where it stopped (same batches and random numbers, see ``up2.engine.resume``),
also after SIGTERM / SIGUSR1, which stop training with a checkpoint (exit status 143 / 138). A
``MODEL.WEIGHTS`` that does not fit the model is an error (``MODEL.UP2.WEIGHTS_STRICT``).
"""
import logging

import up2  # noqa: F401  (applies Detectron2 compatibility fixes; must precede detectron2 imports)
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import up2.data  # noqa: F401  (registers the built-in datasets)
import up2.modeling  # noqa: F401  (registers up2's meta-architectures, backbones and parts)
from up2.checkpoint import AtomicCheckpointer
from up2.config import load_config, get_task_entries
from up2.engine import UP2Trainer, launch, write_eval_results

logger = logging.getLogger("up2")


def setup(args):
    """Builds the config from the file and the trailing KEY VALUE options; Detectron2's set-up."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    get_task_entries(cfg, require_train=not args.eval_only)  # fail early on a bad task list
    default_setup(cfg, args)  # output dir, config.yaml, logs, environment info, seed
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="up2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = UP2Trainer.build_model(cfg)
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.UP2.WEIGHTS_STRICT)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = UP2Trainer.test(cfg, model)
        write_eval_results(cfg.OUTPUT_DIR, results)
        return results

    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logger.info("Command line arguments: %s", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
