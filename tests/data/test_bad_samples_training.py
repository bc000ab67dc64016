"""Training with unreadable images (a truncated JPEG, a zero-byte PNG and a missing file made by the tests)
in COCO JSON, captions JSON and class-folder datasets: UP2Trainer skips and replaces them, counts them
per dataset in metrics.json and goes on; more bad samples than DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION
stop the run naming the dataset; with 2 gloo ranks where only one rank draws the bad file, both ranks
run the same tasks and end with identical parameters."""
import json
import os
import textwrap

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data.samplers import TrainingSampler
from detectron2.modeling import META_ARCH_REGISTRY

from up2.config import add_up2_config
from up2.data.bad_samples import BadDataError
from up2.data.build import task_loader_seed
from up2.engine import UP2Trainer


@META_ARCH_REGISTRY.register()
class MeanPixelToyModel(torch.nn.Module):
    """Loss from each image's mean pixel (each text's length for MLM); records the batches it gets."""

    def __init__(self, cfg):
        super().__init__()
        self.head = torch.nn.Linear(1, 1)
        self.batches = []  # (task, [file_name])

    def forward(self, batched_inputs):
        self.batches.append((batched_inputs[0]["task"], [d.get("file_name") for d in batched_inputs]))
        x = torch.tensor([[d["image"].float().mean().item() / 255.0] if "image" in d else [len(d["text"]) / 100.0]
                          for d in batched_inputs])
        return {"loss_toy": self.head(x).pow(2).mean()}


def make_cfg(output_dir, tasks, max_iter, max_bad_fraction):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "MeanPixelToyModel"
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (24,), 40
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    cfg.DATASETS.UP2.IMAGE_SIZE = 16
    cfg.DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION = max_bad_fraction
    cfg.DATASETS.UP2.TASKS = [{"NAME": name, "TYPE": task_type, "TRAIN_DATASETS": [dataset], "BATCH_SIZE": batch_size,
                               "SAMPLING_RATIO": 1.0} for name, task_type, dataset, batch_size in tasks]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = max_iter, 0, ()
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD, cfg.SEED = 100000, 0, 1
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_training_skips_counts_and_goes_on(tmp_path, faulty_data):
    det, cap, images_dir, names = faulty_data.register_faulty_json_datasets(tmp_path / "json")
    cls, paths = faulty_data.register_faulty_folder_dataset(tmp_path / "folder")
    tasks = [("det", "detection", det, 2), ("cls", "classification", cls, 4), ("cap", "captioning", cap, 4)]
    trainer = UP2Trainer(make_cfg(tmp_path / "out", tasks, max_iter=60, max_bad_fraction=0.2))
    os.remove(paths[faulty_data.MISSING])  # vanishes after the folder was listed
    trainer.train()

    batches = trainer.model.batches
    assert len(batches) == 60
    sizes = {task_type: size for _, task_type, _, size in tasks}
    assert all(len(files) == sizes[task] for task, files in batches)  # every batch full
    bad = {os.path.join(images_dir, n) for n in faulty_data.bad_names(names)}
    bad |= {paths[faulty_data.TRUNCATED], paths[faulty_data.ZERO_BYTE], paths[faulty_data.MISSING]}
    assert not bad & {f for _, files in batches for f in files}
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    last = [r for r in records if r["iteration"] == 59][-1]
    for dataset in (det, cls, cap):
        assert last[f"skipped/{dataset}/unreadable_image"] >= 2  # the truncated JPEG and the zero-byte PNG
        assert last[f"skipped/{dataset}/missing_image"] >= 1
        assert last[f"skipped/{dataset}/bad_fraction"] == pytest.approx(3 / 20)
    assert any(f"skipped/{cls}/unreadable_image" in r for r in records if r["iteration"] == 19)


def test_too_many_bad_samples_stop_the_run_naming_the_dataset(tmp_path, faulty_data):
    cls, _ = faulty_data.register_faulty_folder_dataset(tmp_path / "folder")
    trainer = UP2Trainer(make_cfg(tmp_path / "out", [("cls", "classification", cls, 4)], max_iter=30,
                                  max_bad_fraction=0.01))
    with pytest.raises(BadDataError, match=rf"Dataset '{cls}': 1 of its 20 samples cannot be used .*"
                                           r"MAX_BAD_SAMPLE_FRACTION = 0.01"):
        trainer.train()
    assert trainer.iter < 29


TWO_RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import up2
    import torch
    from detectron2.config import get_cfg
    from detectron2.engine import HookBase
    from detectron2.modeling import META_ARCH_REGISTRY
    from up2.config import add_up2_config
    from up2.data.bad_samples import skipped_sample_counts
    from up2.data.datasets import register_class_folder_dataset, register_text_dataset
    from up2.engine import UP2Trainer, launch

    @META_ARCH_REGISTRY.register()
    class MeanPixelToyModel(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.head = torch.nn.Linear(1, 1)
            self.files = []

        def forward(self, batched_inputs):
            self.files.extend(d["file_name"] for d in batched_inputs if "file_name" in d)
            x = torch.tensor([[d["image"].float().mean().item() / 255.0] if "image" in d
                              else [len(d["text"]) / 100.0] for d in batched_inputs])
            return {"loss_toy": self.head(x).pow(2).mean()}

    class RecordStep(HookBase):
        def __init__(self):
            self.steps = []

        def after_step(self):
            digest = hashlib.sha256()
            for p in self.trainer.model.parameters():
                digest.update(p.detach().numpy().tobytes())
            self.steps.append({"iter": self.trainer.iter, "task": self.trainer.current_task.name,
                               "params": digest.hexdigest()})

    def worker(out_dir):
        torch.set_num_threads(1)
        with open(os.path.join(out_dir, "datasets.json")) as f:
            datasets = json.load(f)
        register_class_folder_dataset(*datasets["cls"])
        register_text_dataset(*datasets["text"])
        cfg = get_cfg()
        add_up2_config(cfg)
        cfg.merge_from_file(os.path.join(out_dir, "config.yaml"))
        trainer = UP2Trainer(cfg)
        record = RecordStep()
        trainer.register_hooks([record])
        trainer.train()
        rank = torch.distributed.get_rank()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"steps": record.steps, "skipped": skipped_sample_counts(),
                       "files": trainer.model.module.files}, f)

    if __name__ == "__main__":
        launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
""")


@pytest.mark.slow
def test_two_ranks_step_together_when_one_rank_draws_a_bad_file(run_two_ranks, tmp_path, faulty_data):
    root = tmp_path / "folder"
    classes = root / "classes"
    paths = []
    for label, class_dir in enumerate(("n001", "n002")):
        names = faulty_data.write_images(classes / class_dir, 10, faults=False, first_value=100 * label)
        paths.extend(str(classes / class_dir / n) for n in sorted(names))
    (root / "classes.json").write_text(json.dumps({"n001": "circle", "n002": "square"}))
    (tmp_path / "text.txt").write_text("".join(f"sentence number {i}\n" for i in range(30)))
    cls, text = faulty_data.unique("cls2"), faulty_data.unique("text2")
    (tmp_path / "datasets.json").write_text(json.dumps({
        "cls": [cls, str(classes), str(root / "classes.json")], "text": [text, str(tmp_path / "text.txt")]}))
    # classification gets at most 5 steps x 2 images per rank: the first epoch of the shared index stream,
    # whose even positions are rank 0's and odd positions rank 1's; corrupt rank 0's first image
    cfg = make_cfg(tmp_path / "out", [("cls", "classification", cls, 2), ("mlm", "mlm", text, 3)], max_iter=5,
                   max_bad_fraction=0.1)
    stream = TrainingSampler(20, seed=task_loader_seed(cfg, "cls"))._infinite_indices()
    first_epoch = [int(next(stream)) for _ in range(20)]
    bad = paths[first_epoch[0]]
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    records = run_two_ranks(TWO_RANK_SCRIPT, timeout=600)

    steps = [r["steps"] for r in records]
    assert [s["iter"] for s in steps[0]] == [s["iter"] for s in steps[1]] == list(range(5))
    assert [s["task"] for s in steps[0]] == [s["task"] for s in steps[1]]
    assert "cls" in [s["task"] for s in steps[0]]
    assert [s["params"] for s in steps[0]] == [s["params"] for s in steps[1]]
    assert records[0]["skipped"][f"{cls}/unreadable_image"] >= 1 and records[1]["skipped"] == {}
    assert bad not in records[0]["files"] + records[1]["files"]
    rank1_paths = {paths[i] for i in first_epoch[1::2]}
    assert set(records[1]["files"]) <= rank1_paths
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    last = [r for r in metrics if r["iteration"] == 4][-1]
    assert last[f"skipped/{cls}/unreadable_image"] >= 1 and last[f"skipped/{cls}/bad_fraction"] == 0.05
