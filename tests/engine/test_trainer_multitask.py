"""UP2Trainer in a multi-task run: per-task loaders, the task of every iteration, MT-AdamW's task,
per-task iteration counts in metrics.json. Uses a toy model (the real one is tested elsewhere)."""
import json
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from up2.config import add_up2_config
from up2.data.datasets import register_all_shapes
from up2.data.shapes import generate_shapes
from up2.engine import UP2Trainer


@META_ARCH_REGISTRY.register()
class ToyTaskModel(torch.nn.Module):
    """Scores images (mean colour) for classification and texts (length) for MLM; records batches."""

    def __init__(self, cfg):
        super().__init__()
        self.image_head = torch.nn.Linear(3, 10)
        self.text_head = torch.nn.Linear(1, 1)
        self.seen = []
        self.nan_at_call = None

    def forward(self, batched_inputs):
        tasks = {x["task"] for x in batched_inputs}
        assert len(tasks) == 1, tasks
        task = tasks.pop()
        self.seen.append((task, len(batched_inputs)))
        if task == "classification":
            colours = torch.stack([x["image"].float().mean((1, 2)) / 255 for x in batched_inputs])
            labels = torch.tensor([x["label"] for x in batched_inputs])
            loss = torch.nn.functional.cross_entropy(self.image_head(colours), labels)
        else:
            lengths = torch.tensor([[len(x["text"]) / 100.0] for x in batched_inputs])
            loss = self.text_head(lengths).pow(2).mean()
        # same keys every step: the unused head contributes zero (every parameter gets a gradient)
        zero = sum(p.sum() for p in self.parameters()) * 0
        if self.nan_at_call == len(self.seen):
            loss = loss * float("nan")
        return {"loss_classification": loss + zero if task == "classification" else zero,
                "loss_mlm": loss + zero if task == "mlm" else zero}


@pytest.fixture(scope="module")
def shapes_names(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt") / "shapes"
    generate_shapes(str(root), seed=0, num_train=20, num_val=10, vocab_size=300)
    register_all_shapes(str(root), prefix="mtshapes")
    return "mtshapes"


def toy_cfg(shapes_names, output_dir):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "ToyTaskModel"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.UP2.IMAGE_SIZE = 32
    cfg.DATASETS.UP2.TASKS = [
        {"NAME": "cls", "TYPE": "classification", "TRAIN_DATASETS": [f"{shapes_names}_cls_train"],
         "SAMPLING_RATIO": 0.7, "LOSS_WEIGHT": 1.0, "BATCH_SIZE": 3},
        {"NAME": "mlm", "TYPE": "mlm", "TRAIN_DATASETS": [f"{shapes_names}_text_train"],
         "SAMPLING_RATIO": 0.3, "LOSS_WEIGHT": 0.5, "BATCH_SIZE": 5},
    ]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.MAX_ITER = 12
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 3
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_tasks_alternate_with_their_batches_and_optimizer_task(shapes_names, tmp_path):
    cfg = toy_cfg(shapes_names, tmp_path)
    trainer = UP2Trainer(cfg)
    tasks_seen_by_optimizer = []
    original_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        tasks_seen_by_optimizer.append(trainer.optimizer.task)
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step  # (the LR scheduler warns about the wrapper; harmless here)
    trainer.train()

    model = trainer.model
    expected_sizes = {"classification": 3, "mlm": 5}
    assert len(model.seen) == 12 and {task for task, _ in model.seen} == {"classification", "mlm"}
    assert all(size == expected_sizes[task] for task, size in model.seen)
    expected_task = {"classification": (0.7, 1.0), "mlm": (0.3, 0.5)}
    assert tasks_seen_by_optimizer == [expected_task[task] for task, _ in model.seen]
    metrics = [json.loads(line) for line in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    # rows are per iteration; task_loss/<task> rows of earlier iterations may come after the last one
    last = max((m for m in metrics if "task_iters/cls" in m), key=lambda m: m["iteration"])
    assert last["iteration"] == cfg.SOLVER.MAX_ITER - 1
    losses = {k for m in metrics for k in m if k.startswith("task_loss/")}
    assert losses == {"task_loss/cls", "task_loss/mlm"}
    counts = {task: sum(1 for t, _ in model.seen if t == task) for task in expected_sizes}
    assert last["task_iters/cls"] == counts["classification"] and last["task_iters/mlm"] == counts["mlm"]


def test_non_finite_loss_names_task_and_iteration(shapes_names, tmp_path):
    trainer = UP2Trainer(toy_cfg(shapes_names, tmp_path))
    trainer.model.nan_at_call = 4  # the 4th forward (iteration 3) returns NaN
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    task_of_iteration_3 = trainer.model.seen[3][0]
    message = str(error.value)
    assert "iteration 3" in message
    assert f"task: {'cls' if task_of_iteration_3 == 'classification' else 'mlm'}" in message
