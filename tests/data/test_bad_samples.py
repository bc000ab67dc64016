"""Unreadable images in JSON and class-folder datasets (a truncated JPEG, a zero-byte PNG, a missing file,
all made by the tests) are skipped, counted per dataset and replaced by another item of the same dataset,
so batches keep their size; replacements are reproducible for exact resume; too many bad samples stop
the loader with an error naming the dataset."""
import itertools
import logging
import os

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.samplers import TrainingSampler

from up2.config import TaskEntry, add_up2_config
from up2.data.bad_samples import (BadDataError, BadSampleTracker, SkippingMapDataset, gather_skipped_samples,
                                  skipped_sample_counts)
from up2.data.build import build_task_train_loader
from up2.data.mappers import ClassificationMapper, ImageReadError
from up2.engine.resume import ResumableTaskLoader, build_map_style_batches


def make_cfg(max_bad_fraction=0.2):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.DATASETS.UP2.IMAGE_SIZE = 16
    cfg.DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION = max_bad_fraction
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (24,), 40
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 3
    return cfg


def entry(task_type, dataset, batch_size=4):
    return TaskEntry(name=task_type, type=task_type, train_datasets=(dataset,), train_dataset_weights=(),
                     test_datasets=(), sampling_ratio=1.0, loss_weight=1.0, batch_size=batch_size)


def counts_of(name):
    return {k.split("/", 1)[1]: v for k, v in skipped_sample_counts().items() if k.split("/", 1)[0] == name}


def test_tracker_counts_events_and_stops_beyond_the_fraction_of_distinct_bad_samples(caplog):
    tracker = BadSampleTracker(["coco", "flickr"], [200, 1000], max_fraction=0.01, num_slots=2)
    with caplog.at_level(logging.WARNING, logger="up2.data.bad_samples"):
        tracker.skip(0, "unreadable_image", "Cannot read image /data/a.jpg", [1], slot=0)
    assert "Dataset 'coco'" in caplog.text and "/data/a.jpg" in caplog.text
    tracker.skip(0, "unreadable_image", "again", [1], slot=1)  # the same file drawn again (another worker)
    tracker.skip(0, "missing_image", "gone", [2])
    tracker.skip(1, "corrupt_shard", "cut short", [10, 11, 12, 5000])  # 5000 is out of range: not counted
    assert tracker.counts() == {"coco": {"unreadable_image": 2, "missing_image": 1}, "flickr": {"corrupt_shard": 3}}
    np.testing.assert_array_equal(tracker.bad_items(0), [1, 2])  # 2 of 200: exactly 1 %, tolerated
    with pytest.raises(BadDataError, match=r"Dataset 'coco': 3 of its 200 samples .*MAX_BAD_SAMPLE_FRACTION = 0.01"
                                           r".*Last one: /data/c.jpg"):
        tracker.skip(0, "unreadable_image", "/data/c.jpg", [3])
    with pytest.raises(ValueError, match="Unknown skip reason 'bad'"):
        tracker.skip(0, "bad", "?", [4])


def test_gather_merges_loaders_and_reports_bad_fractions():
    first = BadSampleTracker(["gather_a"], [100], max_fraction=0.5)
    second = BadSampleTracker(["gather_a", "gather_b"], [100, 10], max_fraction=0.5)
    first.skip(0, "unreadable_image", "x", [4, 5])
    second.skip(0, "unreadable_image", "x", [5, 6])  # 5 is counted twice but is one bad sample
    second.skip(1, "missing_image", "y", [0])
    results = {k: v for k, v in gather_skipped_samples().items() if k.startswith("gather_")}
    assert results == {"gather_a/unreadable_image": 4, "gather_a/bad_fraction": 0.03,
                       "gather_b/missing_image": 1, "gather_b/bad_fraction": 0.1}


def test_replacement_is_drawn_from_the_same_dataset_and_group():
    dicts = [{"id": i} for i in range(12)]  # datasets [0, 8) and [8, 12)

    def mapper(d):
        if d["id"] in (2, 9):
            raise ImageReadError(f"Cannot read image {d['id']}.jpg")
        return dict(d)

    dataset = SkippingMapDataset(dicts, mapper, BadSampleTracker(["big", "small"], [8, 4], max_fraction=0.5),
                                 group_ids=[i % 2 for i in range(12)])
    rng = np.random.default_rng(0)
    replacements = {dataset.map_item(2, rng)["id"] for _ in range(40)}
    assert replacements <= {0, 4, 6} and len(replacements) > 1  # dataset "big", even group, readable
    assert {dataset.map_item(9, rng)["id"] for _ in range(20)} == {11}
    assert dataset.map_item(3, rng) == {"id": 3}
    counts = dataset.tracker.counts()  # a replacement may be the bad item again (draws ignore past skips)
    assert counts["big"]["unreadable_image"] >= 40 and counts["small"]["unreadable_image"] >= 20
    np.testing.assert_array_equal(dataset.tracker.bad_items(0), [2])
    np.testing.assert_array_equal(dataset.tracker.bad_items(1), [1])


@pytest.mark.parametrize("kind", ["detection", "captioning", "classification"])
def test_json_and_folder_loaders_skip_replace_and_count_real_faults(tmp_path, kind, caplog, faulty_data):
    if kind == "classification":
        name, paths = faulty_data.register_faulty_folder_dataset(tmp_path)
        bad = {paths[faulty_data.TRUNCATED], paths[faulty_data.ZERO_BYTE], paths[faulty_data.MISSING]}
    else:
        det, cap, images_dir, names = faulty_data.register_faulty_json_datasets(tmp_path)
        name = det if kind == "detection" else cap
        bad = {os.path.join(images_dir, n) for n in faulty_data.bad_names(names)}
    loader = build_task_train_loader(make_cfg(), entry(kind, name))  # loads the dataset dicts
    if kind == "classification":
        os.remove(paths[faulty_data.MISSING])  # a file that vanishes after the dataset was listed
    with caplog.at_level(logging.WARNING, logger="up2.data.bad_samples"):
        batches = list(itertools.islice(iter(loader), 15))  # 60 draws: 3 epochs of the 20 items
    assert [len(b) for b in batches] == [4] * 15
    seen = [d["file_name"] for b in batches for d in b]
    assert not bad & set(seen) and len(set(seen)) == 17
    assert all(d["task"] == kind and d["image"].shape[0] == 3 for b in batches for d in b)
    counts = counts_of(name)
    assert set(counts) == {"unreadable_image", "missing_image"}
    assert counts["unreadable_image"] >= 2 * 2 and counts["missing_image"] >= 2  # every epoch hits them
    assert gather_skipped_samples()[f"{name}/bad_fraction"] == 3 / 20
    for path in bad:
        assert path in caplog.text
    assert "Truncated" in caplog.text or "truncated" in caplog.text


def test_too_many_bad_samples_stop_the_loader_naming_the_dataset(tmp_path, faulty_data):
    _, cap, _, _ = faulty_data.register_faulty_json_datasets(tmp_path)
    loader = iter(build_task_train_loader(make_cfg(max_bad_fraction=0.01), entry("captioning", cap)))
    with pytest.raises(BadDataError, match=rf"Dataset '{cap}': 1 of its 20 samples cannot be used .*"
                                           r"MAX_BAD_SAMPLE_FRACTION = 0.01"):
        for _ in range(10):
            next(loader)


def test_resumable_loader_replaces_bad_items_identically(tmp_path, faulty_data):
    name, _ = faulty_data.register_faulty_folder_dataset(tmp_path)
    dicts = DatasetCatalog.get(name)
    mapper = ClassificationMapper(make_cfg(), is_train=True)

    def loader():
        tracker = BadSampleTracker([name], [len(dicts)], max_fraction=0.5)
        make = build_map_style_batches(dicts, mapper, lambda seed: TrainingSampler(len(dicts), seed=seed),
                                       batch_size=4, num_workers=0, tracker=tracker)
        return ResumableTaskLoader("cls", make, seed=7, exact=True), tracker

    def take(resumable, n, start=0):
        resumable.load_state_dict({"seed": 7, "position": start})
        iterator = iter(resumable)
        return [[(d["file_name"], d["image"].sum().item()) for d in next(iterator)] for _ in range(n)]

    (reference_loader, tracker), (resumed_loader, _) = loader(), loader()
    reference = take(reference_loader, 10)
    assert sum(tracker.counts()[name].values()) >= 2  # bad items were drawn and replaced
    assert take(resumed_loader, 4, start=6) == reference[6:]
