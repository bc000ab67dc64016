"""Where one training step of each task spends its time, for a multi-task config (default: the demo's).

    DETECTRON2_DATASETS=datasets python benchmarks/step_profile.py \\
        --config-file configs/shapes/up2_multitask_EffLite0_MiniLM.yaml --steps 5 [KEY VALUE ...]

For every task of ``DATASETS.UP2.TASKS``: ``--steps`` training steps of its batch (after one warm-up step),
with the median of

* the forward time of each part, exclusive of the parts it calls: ``backbone``, ``proposer`` (region
  proposer + its losses), ``global_pool``, ``text_encoder``, ``decoder`` (the unified decoder), and
  ``targets`` (class-name / vocabulary target encoding; the text encoder and decoder calls it makes are
  counted under ``targets``), ``rest`` (similarity head, losses, glue: the forward total minus the parts);
* ``backward`` and ``optimizer`` (MT-AdamW step);

printed as one JSON line per task, then the sampling-weighted mean seconds per iteration, which is what
the trainer's ``time`` column shows. Each part's share of the step is its time over the step total, a
ratio measured in the same run.
"""
import argparse
import json
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

import up2  # noqa: F401  (before detectron2)
import up2.data  # noqa: F401
import up2.modeling  # noqa: F401
from detectron2.modeling import build_model

from up2.config import get_task_entries, load_config
from up2.data.build import build_task_train_loader
from up2.engine.target_vocabulary import set_training_vocabularies
from up2.solver import build_optimizer


class ExclusiveTimer:
    """Wall time per named region, exclusive of the named regions nested inside it."""

    def __init__(self):
        self.totals = defaultdict(float)
        self._stack = []  # [name, start, time spent in children]

    def push(self, name):
        self._stack.append([name, time.perf_counter(), 0.0])

    def pop(self):
        name, start, children = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - children
        if self._stack:
            self._stack[-1][2] += elapsed

    @contextmanager
    def region(self, name):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def hook(self, module, name):
        module.register_forward_pre_hook(lambda *_: self.push(name))
        module.register_forward_hook(lambda *_: self.pop())

    def wrap(self, obj, method, name):
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            with self.region(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)


def instrument(model) -> ExclusiveTimer:
    timer = ExclusiveTimer()
    encoder = model.image_encoder
    for module, name in ((encoder.backbone, "backbone"), (encoder.proposer, "proposer"),
                         (model.text_encoder.encoder, "text_encoder"), (model.decoder, "decoder")):
        timer.hook(module, name)
    if encoder.global_pool is not None:
        timer.hook(encoder.global_pool, "global_pool")
    for method in ("class_embeddings", "vocabulary_embeddings"):
        timer.wrap(model.targets, method, "targets")
    return timer


def profile_task(model, optimizer, timer, entry, loader, steps: int):
    optimizer.set_task(sampling_ratio=entry.sampling_ratio, loss_weight=entry.loss_weight)
    rows = []
    for step in range(steps + 1):
        batch = next(loader)
        timer.totals.clear()
        start = time.perf_counter()
        loss = sum(model(batch).values())
        forward = time.perf_counter() - start
        parts = dict(timer.totals)
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss.backward()
        backward = time.perf_counter() - start
        start = time.perf_counter()
        optimizer.step()
        row = {**parts, "rest": forward - sum(parts.values()), "forward": forward, "backward": backward,
               "optimizer": time.perf_counter() - start}
        row["step"] = forward + backward + row["optimizer"]
        if step:  # the first step warms caches and allocators
            rows.append(row)
    keys = sorted({k for row in rows for k in row})
    return {k: round(statistics.median(row.get(k, 0.0) for row in rows), 3) for k in keys}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/shapes/up2_multitask_EffLite0_MiniLM.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    model = build_model(cfg)
    set_training_vocabularies(cfg, model)
    model.train()
    optimizer = build_optimizer(cfg, model)
    timer = instrument(model)
    mean_step = 0.0
    print(json.dumps({"torch_threads": torch.get_num_threads(), "config": args.config_file}))
    for entry in get_task_entries(cfg):
        result = profile_task(model, optimizer, timer, entry, iter(build_task_train_loader(cfg, entry)), args.steps)
        mean_step += entry.sampling_ratio * result["step"]
        print(json.dumps({"task": entry.name, "batch": entry.batch_size, **result}), flush=True)
    print(json.dumps({"seconds_per_iteration_sampling_weighted": round(mean_step, 3)}))


if __name__ == "__main__":
    main()
