"""Trains UniPerceiverV2 on ONE task of a multi-task config and reports how much its loss fell.

    python tools/single_task_training.py --config-file configs/shapes/up2_multitask_R18.yaml \
        --tasks detection classification retrieval captioning mlm --iters 300

For every task: a fresh model (seeded), that task's loader, optimizer (up2's, MT-AdamW with s_k = 1) and
LR schedule (the config's warm-up and steps), ``--iters`` steps of ``--batch-size`` inputs (default: the
task's BATCH_SIZE). Prints one JSON line per task: ``initial`` (the untrained model's loss, step 1),
``first`` / ``last`` (mean total loss of the first / last ``--window`` steps), ``reduction`` = 1 - last /
first and ``reduction_from_initial`` = 1 - last / initial.
"""
import argparse
import json
import logging
import sys
import time

import torch

import up2  # noqa: F401  (before detectron2)
import up2.data  # noqa: F401
import up2.modeling  # noqa: F401
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler

from up2.config import load_config, get_task_entries
from up2.data.build import build_task_train_loader
from up2.engine.target_vocabulary import set_training_vocabularies
from up2.solver import build_optimizer

logger = logging.getLogger("up2.single_task_training")


def find_task(cfg, task_name: str):
    """``(index, entry)`` of the ``DATASETS.UP2.TASKS`` entry named ``task_name`` (the config's NAME-or-TYPE
    rule); KeyError listing the tasks when there is none."""
    entries = get_task_entries(cfg)
    names = [entry.name for entry in entries]
    if task_name not in names:
        raise KeyError(f"Task {task_name!r} is not in DATASETS.UP2.TASKS ({names})")
    index = names.index(task_name)
    return index, entries[index]


def with_batch_size(cfg, task_name: str, batch_size: int):
    """A copy of ``cfg`` whose ``DATASETS.UP2.TASKS`` entry ``task_name`` has BATCH_SIZE ``batch_size``."""
    cfg = cfg.clone()
    cfg.defrost()
    index, _ = find_task(cfg, task_name)
    cfg.DATASETS.UP2.TASKS[index]["BATCH_SIZE"] = batch_size
    get_task_entries(cfg)  # rejects a batch size <= 0, naming the task
    return cfg


def train_one_task(cfg, task_name: str, iters: int, window: int = 10, seed: int = 0) -> dict:
    """Returns ``{"task", "initial", "first", "last", "reduction", "reduction_from_initial",
    "seconds_per_iter"}`` (see the module doc)."""
    _, entry = find_task(cfg, task_name)
    torch.manual_seed(seed)
    model = build_model(cfg)
    set_training_vocabularies(cfg, model)  # as the trainer: MODEL.UP2.HEAD.TARGET_VOCABULARY
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    if hasattr(optimizer, "set_task"):
        optimizer.set_task(sampling_ratio=1.0, loss_weight=1.0)
    loader = iter(build_task_train_loader(cfg, entry))
    history, start = [], time.perf_counter()
    for _ in range(iters):
        losses = model(next(loader))
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        scheduler.step()
        history.append(float(total.detach()))
    first, last = sum(history[:window]) / window, sum(history[-window:]) / window
    return {"task": task_name, "initial": round(history[0], 4), "first": round(first, 4), "last": round(last, 4),
            "reduction": round(1.0 - last / first, 4), "reduction_from_initial": round(1.0 - last / history[0], 4),
            "seconds_per_iter": round((time.perf_counter() - start) / iters, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", nargs="+", required=True, help="task NAMEs of DATASETS.UP2.TASKS")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-step batch size of the trained task (default: the config's BATCH_SIZE)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config_file, args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    results = []
    for task in args.tasks:
        task_cfg = cfg if args.batch_size is None else with_batch_size(cfg, task, args.batch_size)
        result = train_one_task(task_cfg, task, args.iters, args.window)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
