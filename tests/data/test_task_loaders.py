"""Weighted dataset sampling inside a task, per-task train/test loaders on registered datasets, and
the lazily started multi-task loader."""
import itertools
import json
import os
import uuid

import numpy as np
import pytest
from detectron2.config import get_cfg
from PIL import Image

from up2.config import TaskEntry, add_up2_config
from up2.data.build import (MultiTaskDataLoader, build_task_test_loader, build_task_train_loader,
                            build_task_train_loaders, mixed_batch_sizes)
from up2.data.datasets import (register_caption_dataset, register_class_folder_dataset,
                               register_coco_instances_dataset, register_text_dataset)
from up2.data.samplers import WeightedDatasetSampler, dataset_sampling_weights


def unique(name):
    return f"test_{name}_{uuid.uuid4().hex[:8]}"


def write_image(path, h=20, w=24):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, dtype=np.uint8)).save(path)


def entry(name, task_type, train, weights=(), batch_size=2, ratio=1.0):
    return TaskEntry(name=name, type=task_type, train_datasets=tuple(train), train_dataset_weights=tuple(weights),
                     test_datasets=(), sampling_ratio=ratio, loss_weight=1.0, batch_size=batch_size)


def make_cfg():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.DATASETS.UP2.IMAGE_SIZE = 16
    cfg.INPUT.FORMAT = "RGB"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 3
    return cfg


def chi_square(counts, probs):
    expected = np.asarray(probs) * sum(counts)
    return float((((np.asarray(counts) - expected) ** 2) / expected).sum())


def dataset_of(indices, sizes):
    return np.searchsorted(np.cumsum(sizes), np.asarray(indices), side="right")


def test_sampling_weights_sqrt_size_by_default_and_explicit_normalised():
    np.testing.assert_allclose(dataset_sampling_weights([4, 16, 64]), [2 / 14, 4 / 14, 8 / 14])
    np.testing.assert_allclose(dataset_sampling_weights([4, 16], power=1.0), [0.2, 0.8])
    np.testing.assert_allclose(dataset_sampling_weights([4, 16], weights=[3, 1]), [0.75, 0.25])
    with pytest.raises(ValueError, match="cc3m"):
        dataset_sampling_weights([4, 0], names=["coco", "cc3m"])
    with pytest.raises(ValueError, match="sum to 0"):
        dataset_sampling_weights([4, 5], weights=[0, 0])


@pytest.mark.parametrize("weights", [[1.0, 2.0, 5.0], []])
def test_weighted_sampler_frequencies_follow_weights(weights):
    sizes = [10, 40, 90]
    probs = dataset_sampling_weights(sizes, weights)
    draws = list(itertools.islice(WeightedDatasetSampler(sizes, probs, seed=0, rank=0, world_size=1), 6000))
    counts = np.bincount(dataset_of(draws, sizes), minlength=3)
    assert chi_square(counts, probs) < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    assert min(draws) >= 0 and max(draws) < sum(sizes)


def test_weighted_sampler_zero_weight_dataset_never_drawn_and_epochs_cover_each_dataset():
    sizes = [7, 5, 3]
    draws = list(itertools.islice(WeightedDatasetSampler(sizes, [0.5, 0.0, 0.5], seed=1, rank=0, world_size=1), 600))
    datasets = dataset_of(draws, sizes)
    assert not (datasets == 1).any()
    first = [i for i, d in zip(draws, datasets) if d == 0][:7]
    assert sorted(first) == list(range(7))  # the first 7 draws of dataset 0 are a permutation of it
    last = [i for i, d in zip(draws, datasets) if d == 2][:3]
    assert sorted(last) == [12, 13, 14]


def test_weighted_sampler_deterministic_and_sharded_per_rank():
    sizes, probs = [50, 50], [0.3, 0.7]

    def stream(seed, rank, world_size, n=200):
        return list(itertools.islice(WeightedDatasetSampler(sizes, probs, seed=seed, rank=rank,
                                                            world_size=world_size), n))

    assert stream(5, 0, 1) == stream(5, 0, 1)
    assert stream(5, 0, 1) != stream(6, 0, 1)
    rank0, rank1, full = stream(5, 0, 2), stream(5, 1, 2), stream(5, 0, 1, 400)
    assert rank0 != rank1
    assert rank0 == full[0::2] and rank1 == full[1::2]


@pytest.fixture
def caption_datasets(tmp_path):
    names = []
    for d, count in enumerate([2, 8]):
        images = [{"id": 100 * d + i, "file_name": f"{d}_{i}.png", "height": 20, "width": 24} for i in range(count)]
        anns = [{"id": 1000 * d + i, "image_id": im["id"], "caption": f"caption {d} {i}"} for i, im in enumerate(images)]
        for im in images:
            write_image(str(tmp_path / "img" / im["file_name"]))
        (tmp_path / f"cap{d}.json").write_text(json.dumps({"images": images, "annotations": anns}))
        names.append(unique(f"cap{d}"))
        register_caption_dataset(names[-1], str(tmp_path / f"cap{d}.json"), str(tmp_path / "img"))
    return names


@pytest.fixture
def class_dataset(tmp_path):
    for class_dir in ("n01", "n02"):
        for i in range(2):
            write_image(str(tmp_path / "cls" / class_dir / f"{i}.png"))
    (tmp_path / "names.json").write_text(json.dumps({"n01": "circle", "n02": "square"}))
    name = unique("cls")
    register_class_folder_dataset(name, str(tmp_path / "cls"), str(tmp_path / "names.json"))
    return name


@pytest.fixture
def text_dataset(tmp_path):
    (tmp_path / "corpus.txt").write_text("a red square .\n\nthe circle is blue .\nstars everywhere\n")
    name = unique("txt")
    register_text_dataset(name, str(tmp_path / "corpus.txt"))
    return name


@pytest.fixture
def det_dataset(tmp_path):
    images, anns = [], []
    for i, (h, w) in enumerate([(20, 24), (24, 20), (20, 24), (24, 20)]):
        write_image(str(tmp_path / "det" / f"{i}.png"), h=h, w=w)
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        anns.append({"id": i + 1, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                     "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    name = unique("det")
    register_coco_instances_dataset(name, str(tmp_path / "inst.json"), str(tmp_path / "det"))
    return name


def test_caption_task_loader_mixes_datasets_by_weight(caption_datasets):
    loader = build_task_train_loader(make_cfg(), entry("cap", "captioning", caption_datasets, weights=[1, 1],
                                                      batch_size=4))
    batches = list(itertools.islice(iter(loader), 10))
    assert all(len(b) == 4 for b in batches)
    items = [d for b in batches for d in b]
    assert all(d["task"] == "captioning" and tuple(d["image"].shape) == (3, 16, 16) and isinstance(d["caption"], str)
               for d in items)
    from_small = sum(d["image_id"] < 100 for d in items)
    # Equal weights: half the draws come from the 2-image dataset (binomial 40 draws, p = 0.5).
    assert 10 <= from_small <= 30


def test_classification_and_mlm_loaders(class_dataset, text_dataset):
    cfg = make_cfg()
    (batch,) = itertools.islice(iter(build_task_train_loader(cfg, entry("cls", "classification", [class_dataset],
                                                                        batch_size=3))), 1)
    assert len(batch) == 3 and {d["label"] for d in batch} <= {0, 1} and batch[0]["task"] == "classification"
    batches = list(itertools.islice(iter(build_task_train_loader(cfg, entry("mlm", "mlm", [text_dataset]))), 3))
    texts = [d["text"] for b in batches for d in b]
    # TrainingSampler: shuffled epochs, so each window of 3 consecutive draws covers the corpus.
    assert sorted(texts[:3]) == sorted(["a red square .", "the circle is blue .", "stars everywhere"])


def test_detection_loader_groups_aspect_ratios(det_dataset):
    cfg = make_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MIN_SIZE_TRAIN = (20,)
    cfg.INPUT.MAX_SIZE_TRAIN = 40
    cfg.INPUT.CROP.ENABLED = False
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = True
    batches = list(itertools.islice(iter(build_task_train_loader(cfg, entry("det", "detection", [det_dataset]))), 4))
    for batch in batches:
        assert len(batch) == 2 and all(d["task"] == "detection" and len(d["instances"]) == 1 for d in batch)
        assert len({d["image"].shape[1] > d["image"].shape[2] for d in batch}) == 1


def test_test_loaders(class_dataset, caption_datasets, det_dataset):
    cfg = make_cfg()
    cfg.DATASETS.UP2.TEST_BATCH_SIZE = 3
    batches = list(build_task_test_loader(cfg, class_dataset, "classification"))
    assert [len(b) for b in batches] == [3, 1]
    assert sorted(d["image_id"] for b in batches for d in b) == [0, 1, 2, 3]
    (batch,) = list(build_task_test_loader(cfg, caption_datasets[0], "retrieval"))
    assert [d["captions"] for d in batch] == [["caption 0 0"], ["caption 0 1"]] and batch[0]["task"] == "retrieval"
    det = list(build_task_test_loader(cfg, det_dataset, "detection"))
    assert len(det) == 4 and all(len(b) == 1 and b[0]["task"] == "detection" for b in det)


def test_multi_task_loader_lazy_and_selected(class_dataset, text_dataset):
    cfg = make_cfg()
    cfg.DATASETS.UP2.TASKS = [
        {"NAME": "cls", "TYPE": "classification", "TRAIN_DATASETS": [class_dataset], "BATCH_SIZE": 2,
         "SAMPLING_RATIO": 0.5},
        {"NAME": "mlm", "TYPE": "mlm", "TRAIN_DATASETS": [text_dataset], "BATCH_SIZE": 3, "SAMPLING_RATIO": 0.5},
    ]
    loader = MultiTaskDataLoader(build_task_train_loaders(cfg))
    stream = iter(loader)  # what SimpleTrainer does once; starts nothing
    assert loader.started_tasks == []
    with pytest.raises(RuntimeError, match="no task selected"):
        next(stream)
    stream = iter(loader)
    loader.select(["mlm"])
    batch = next(stream)
    assert len(batch) == 3 and {d["task"] for d in batch} == {"mlm"} and loader.started_tasks == ["mlm"]
    loader.select(["cls", "mlm"])  # mixed: every task's batch
    assert [d["task"] for d in next(stream)] == ["classification"] * 2 + ["mlm"] * 3
    assert len(loader.next_batch("cls")) == 2
    with pytest.raises(KeyError, match="vqa"):
        loader.select(["vqa"])


def test_mixed_batch_sizes_follow_sampling_ratios(class_dataset, text_dataset):
    entries = [entry("a", "classification", ["x"], batch_size=28, ratio=0.5),
               entry("b", "detection", ["y"], batch_size=1, ratio=0.25),
               entry("c", "mlm", ["z"], batch_size=256, ratio=0.25),
               entry("d", "mlm", ["z"], batch_size=4, ratio=0.0)]
    assert mixed_batch_sizes(entries) == {"a": 14, "b": 1, "c": 64}
    cfg = make_cfg()
    cfg.SOLVER.UP2.SAMPLING = "mixed"
    cfg.DATASETS.UP2.TASKS = [
        {"NAME": "cls", "TYPE": "classification", "TRAIN_DATASETS": [class_dataset], "BATCH_SIZE": 4},
        {"NAME": "mlm", "TYPE": "mlm", "TRAIN_DATASETS": [text_dataset], "BATCH_SIZE": 4, "SAMPLING_RATIO": 3.0},
    ]
    loaders = build_task_train_loaders(cfg)
    assert [len(next(iter(loaders[name]))) for name in ("cls", "mlm")] == [1, 3]


def test_each_task_has_its_own_workers(class_dataset, text_dataset):
    cfg = make_cfg()
    cfg.DATALOADER.NUM_WORKERS = 1
    loader = MultiTaskDataLoader({
        "cls": build_task_train_loader(cfg, entry("cls", "classification", [class_dataset])),
        "mlm": build_task_train_loader(cfg, entry("mlm", "mlm", [text_dataset])),
    })
    for name in ["cls", "mlm", "mlm", "cls", "mlm"]:
        assert len(loader.next_batch(name)) == 2
    assert sorted(loader.started_tasks) == ["cls", "mlm"]
