"""metrics.json reports the samples the loaders skipped (up2.data.bad_samples) as
``skipped/<dataset>/<reason>`` and ``skipped/<dataset>/bad_fraction``, updated during training."""
import json
import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from up2.config import add_up2_config
from up2.data.bad_samples import BadSampleTracker
from up2.engine import UP2Trainer


@META_ARCH_REGISTRY.register()
class SkipCountingToyModel(torch.nn.Module):
    """Scores text lengths; at its 25th call, records one more skipped sample in ``counter``."""

    def __init__(self, cfg):
        super().__init__()
        self.head = torch.nn.Linear(1, 1)
        self.counter = None
        self.calls = 0

    def forward(self, batched_inputs):
        self.calls += 1
        if self.calls == 25:
            self.counter.skip(0, "missing_caption", "toy sample without caption", [7])
        lengths = torch.tensor([[len(x["text"]) / 100.0] for x in batched_inputs])
        return {"loss_mlm": self.head(lengths).pow(2).mean()}


def test_skipped_samples_reach_metrics_json(engine_shapes, tmp_path):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SkipCountingToyModel"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.UP2.TASKS = [{"NAME": "mlm", "TYPE": "mlm", "TRAIN_DATASETS": [f"{engine_shapes[1]}_text_train"],
                               "BATCH_SIZE": 2}]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 30, 0, ()
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD, cfg.SEED = 1000, 0, 0
    cfg.OUTPUT_DIR = str(tmp_path)
    counter = BadSampleTracker(["toy_shards"], [1000])  # what a loader holds
    counter.skip(0, "unreadable_image", "three toy images", [1, 2, 3])
    trainer = UP2Trainer(cfg)
    trainer.model.counter = counter
    trainer.train()

    records = {r["iteration"]: r for r in map(json.loads, open(os.path.join(tmp_path, "metrics.json")))}
    assert records[19]["skipped/toy_shards/unreadable_image"] == 3
    assert "skipped/toy_shards/missing_caption" not in records[19]
    assert records[29]["skipped/toy_shards/unreadable_image"] == 3
    assert records[29]["skipped/toy_shards/missing_caption"] == 1
    assert records[19]["skipped/toy_shards/bad_fraction"] == 3 / 1000
    assert records[29]["skipped/toy_shards/bad_fraction"] == 4 / 1000
