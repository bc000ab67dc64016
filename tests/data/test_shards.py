"""Image-text tar shards: index and registration errors, the per-rank x per-worker split (no duplicate,
full coverage), skipped corrupt members counted across DataLoader workers, and shard datasets joining
the size-based weighting of a task's datasets."""
import io
import itertools
import json
import logging
import os
import tarfile
import uuid

import numpy as np
import pytest
import torch
import torch.utils.data as torchdata
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from PIL import Image

from up2.config import TaskEntry, add_up2_config
from up2.data.build import build_task_test_loader, build_task_train_loader
from up2.data.datasets import DatasetNotFoundError, register_caption_dataset, register_image_text_shards
from up2.data.mappers import CaptioningMapper
from up2.data.bad_samples import skipped_sample_counts
from up2.data.shards import ImageTextShards, worker_shard_slices
from up2.data.catalog import is_streaming_dataset
from up2.data.streams import TaskStream


def unique(name):
    return f"test_{name}_{uuid.uuid4().hex[:8]}"


def jpeg_bytes(value=100, h=20, w=24):
    out = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory, counts, corrupt=(), no_caption=()):
    """Shards ``000000.tar``... with ``counts[i]`` samples (keys ``s{i}_{j}``) and ``shards.json``.
    ``corrupt``/``no_caption``: keys whose image is garbage / whose caption member is left out."""
    os.makedirs(directory, exist_ok=True)
    entries = []
    for i, count in enumerate(counts):
        with tarfile.open(os.path.join(directory, f"{i:06d}.tar"), "w") as tar:
            for j in range(count):
                key = f"s{i}_{j}"
                add_member(tar, f"{key}.jpg", b"\xff\xd8\xffnot really a jpeg" if key in corrupt else jpeg_bytes(j))
                if key not in no_caption:
                    add_member(tar, f"{key}.txt", f"caption {i} {j}\nsecond caption {i} {j}\n".encode())
        entries.append({"file": f"{i:06d}.tar", "num_samples": count})
    index = {"format": "up2-image-text-shards", "version": 1, "num_samples": sum(counts), "shards": entries}
    with open(os.path.join(directory, "shards.json"), "w") as f:
        json.dump(index, f)
    return directory


def make_cfg(num_workers=0):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.DATASETS.UP2.IMAGE_SIZE = 16
    cfg.INPUT.FORMAT = "RGB"
    cfg.DATALOADER.NUM_WORKERS = num_workers
    cfg.SEED = 3
    return cfg


def entry(name, task_type, train, weights=(), batch_size=4):
    return TaskEntry(name=name, type=task_type, train_datasets=tuple(train), train_dataset_weights=tuple(weights),
                     test_datasets=(), sampling_ratio=1.0, loss_weight=1.0, batch_size=batch_size)


def register(directory, **kwargs):
    name = unique("shards")
    register_image_text_shards(name, str(directory), **kwargs)
    return name


def test_registration_loads_index_sizes_and_samples(tmp_path):
    name = register(write_shards(tmp_path / "s", [3, 2]))
    assert is_streaming_dataset(name)
    shards = DatasetCatalog.get(name)
    assert isinstance(shards, ImageTextShards) and len(shards) == 5
    assert [(os.path.basename(s.path), s.num_samples, s.offset) for s in shards.shards] == [
        ("000000.tar", 3, 0), ("000001.tar", 2, 3)]
    samples = list(shards)
    assert [s["image_id"] for s in samples] == [0, 1, 2, 3, 4]
    assert samples[3]["captions"] == ["caption 1 0", "second caption 1 0"]
    assert samples[3]["source"] == f"{tmp_path / 's' / '000001.tar'}:s1_0.jpg"
    assert samples[3]["image_bytes"] == jpeg_bytes(0)


def test_glob_selects_shards_and_their_indexed_sizes(tmp_path):
    write_shards(tmp_path / "s", [3, 2, 4])
    name = unique("glob")
    register_image_text_shards(name, str(tmp_path / "s" / "00000[02].tar"))
    shards = DatasetCatalog.get(name)
    assert [os.path.basename(s.path) for s in shards.shards] == ["000000.tar", "000002.tar"] and len(shards) == 7


def test_missing_index_or_shard_and_bad_index_are_named(tmp_path):
    name = register(tmp_path / "nowhere", prepare_hint="Run prepare_image_text_shards.py")
    with pytest.raises(DatasetNotFoundError, match="nowhere.*shards.json.*prepare_image_text_shards.py"):
        DatasetCatalog.get(name)
    write_shards(tmp_path / "s", [1, 1])
    os.remove(tmp_path / "s" / "000001.tar")
    with pytest.raises(DatasetNotFoundError, match="000001.tar"):
        DatasetCatalog.get(register(tmp_path / "s"))
    (tmp_path / "s" / "shards.json").write_text(json.dumps({"format": "up2-image-text-shards", "version": 1,
                                                            "shards": [{"file": "000000.tar", "num_samples": -1}]}))
    with pytest.raises(ValueError, match=r"shards\[0\].*num_samples.*-1"):
        DatasetCatalog.get(register(tmp_path / "s"))


@pytest.mark.parametrize("num_shards", [6, 3])  # more shards than the 4 workers, and fewer
def test_every_epoch_splits_samples_over_workers_exactly_once(num_shards):
    counts = [5, 3, 4, 6, 2, 1][:num_shards]
    for epoch in range(3):
        order = np.random.default_rng([0, epoch]).permutation(num_shards)
        seen = [(s, j) for slot in range(4) for s, k, r in worker_shard_slices(order, slot, 4)
                for j in range(counts[s]) if j % k == r]
        assert len(seen) == len(set(seen)) == sum(counts)


def _rank_samples(shards, rank, infinite=False, take=None):
    stream = TaskStream([shards], [1.0], mapper=None, seed=5, infinite=infinite, rank=rank, world_size=2,
                        num_workers=2)
    loader = torchdata.DataLoader(stream, batch_size=None, num_workers=2)
    return [s["image_id"] for s in (loader if take is None else itertools.islice(loader, take))]


@pytest.mark.parametrize("counts", [[3, 2, 4, 1, 3], [4, 3]])  # 5 shards, and 2 shards for 4 workers
def test_two_ranks_two_workers_cover_every_sample_once(tmp_path, counts):
    shards = DatasetCatalog.get(register(write_shards(tmp_path / "s", counts)))
    ids = _rank_samples(shards, 0) + _rank_samples(shards, 1)
    assert sorted(ids) == list(range(sum(counts)))


def test_training_stream_reshuffles_each_epoch_without_duplicates(tmp_path):
    base = DatasetCatalog.get(register(write_shards(tmp_path / "s", [4, 3, 5, 2, 6])))
    shards = ImageTextShards("t", base.shards, shuffle_buffer=3)

    def epoch_size(worker, epoch):  # 5 shards >= 4 workers: whole shards, slot rotating per epoch
        slices = worker_shard_slices(shards.epoch_order(9, epoch), (worker + epoch) % 4, 4)
        return sum(shards.shards[s].num_samples for s, _, _ in slices)

    streams = []
    for worker in range(4):
        n0, n1 = epoch_size(worker, 0), epoch_size(worker, 1)
        ids = [d["image_id"] for _, d in itertools.islice(shards.stream(9, worker, 4, True), n0 + n1)]
        streams.append((ids[:n0], ids[n0:]))
    for epoch in (0, 1):
        assert sorted(i for worker_ids in streams for i in worker_ids[epoch]) == list(range(len(shards)))
    assert [ids[0] for ids in streams] != [ids[1] for ids in streams]


def _truncate_inside(path, member_name):
    with tarfile.open(path) as tar:
        offset = tar.getmember(member_name).offset_data
    with open(path, "r+b") as f:
        f.truncate(offset + 10)


def test_corrupt_member_is_skipped_counted_and_named(tmp_path, caplog):
    directory = write_shards(tmp_path / "s", [3, 3], corrupt={"s0_1"})
    _truncate_inside(directory / "000001.tar", "s1_2.jpg")
    name = register(directory)
    mapper = CaptioningMapper(make_cfg(), is_train=False)
    stream = TaskStream([DatasetCatalog.get(name)], [1.0], mapper, seed=0, infinite=False, rank=0, world_size=1,
                        num_workers=2, max_bad_fraction=1.0)
    outputs = list(torchdata.DataLoader(stream, batch_size=None, num_workers=2))
    assert sorted(o["image_id"] for o in outputs) == [0, 2, 3, 4]
    assert all(tuple(o["image"].shape) == (3, 16, 16) and len(o["captions"]) == 2 for o in outputs)
    # counted in the DataLoader worker processes, read in the main process
    assert stream.tracker.counts() == {name: {"unreadable_image": 1, "corrupt_shard": 1}}
    assert {k: v for k, v in skipped_sample_counts().items() if k.startswith(name + "/")} == {
        f"{name}/corrupt_shard": 1, f"{name}/unreadable_image": 1}
    # Without workers (main process): the warnings name the shard and the member.
    stream = TaskStream([DatasetCatalog.get(name)], [1.0], mapper, seed=0, infinite=False, rank=0, world_size=1,
                        max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="up2.data.bad_samples"):
        assert len(list(stream)) == 4
    assert f"{directory / '000000.tar'}:s0_1.jpg" in caplog.text
    assert f"shard {directory / '000001.tar'} is unreadable after 2 samples" in caplog.text
    assert stream.tracker.counts() == {name: {"unreadable_image": 1, "corrupt_shard": 1}}


def test_missing_caption_member_is_skipped(tmp_path):
    name = register(write_shards(tmp_path / "s", [3], no_caption={"s0_0"}))
    stream = TaskStream([DatasetCatalog.get(name)], [1.0], None, seed=0, infinite=False, rank=0, world_size=1,
                        max_bad_fraction=1.0)
    assert [s["image_id"] for s in stream] == [1, 2]
    assert skipped_sample_counts()[f"{name}/missing_caption"] == 1


def test_training_stream_without_usable_sample_fails_instead_of_spinning(tmp_path):
    name = register(write_shards(tmp_path / "s", [2, 1, 2], no_caption={"s0_0", "s0_1", "s1_0", "s2_0", "s2_1"}))
    stream = TaskStream([DatasetCatalog.get(name)], [1.0], None, seed=0, infinite=True, rank=0, world_size=1,
                        max_bad_fraction=1.0)
    with pytest.raises(RuntimeError, match=f"{name}.*no usable sample"):
        next(iter(stream))
    assert stream.tracker.counts()[name]["missing_caption"] >= 5


def test_shard_and_json_datasets_share_a_task_weighted_by_sqrt_size(tmp_path):
    shard_name = register(write_shards(tmp_path / "s", [4, 4]))
    images = [{"id": 100 + i, "file_name": f"{i}.png", "height": 20, "width": 24} for i in range(2)]
    for im in images:
        Image.fromarray(np.full((20, 24, 3), 50, dtype=np.uint8)).save(tmp_path / im["file_name"])
    anns = [{"id": i, "image_id": im["id"], "caption": f"json {i}"} for i, im in enumerate(images)]
    (tmp_path / "cap.json").write_text(json.dumps({"images": images, "annotations": anns}))
    json_name = unique("cap")
    register_caption_dataset(json_name, str(tmp_path / "cap.json"), str(tmp_path))
    loader = build_task_train_loader(make_cfg(), entry("cap", "captioning", [json_name, shard_name]))
    np.testing.assert_allclose(loader.dataset.probs, [np.sqrt(2) / (np.sqrt(2) + np.sqrt(8)),
                                                      np.sqrt(8) / (np.sqrt(2) + np.sqrt(8))])
    batches = list(itertools.islice(iter(loader), 45))
    items = [d for b in batches for d in b]
    assert all(len(b) == 4 for b in batches) and len(items) == 180
    assert all(d["task"] == "captioning" and d["image"].shape == torch.Size([3, 16, 16])
               and isinstance(d["caption"], str) for d in items)
    from_json = sum("file_name" in d for d in items)
    # Binomial(180, 1/3): mean 60, sd 6.3; the bounds are 4.7 sd away.
    assert 30 <= from_json <= 90
    assert {d["image_id"] for d in items if "source" in d} == set(range(8))


def test_shard_test_loader_reads_each_sample_once(tmp_path):
    name = register(write_shards(tmp_path / "s", [2, 3]))
    cfg = make_cfg()
    cfg.DATASETS.UP2.TEST_BATCH_SIZE = 2
    batches = list(build_task_test_loader(cfg, name, "retrieval"))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(d["image_id"] for b in batches for d in b) == [0, 1, 2, 3, 4]
    assert batches[0][0]["task"] == "retrieval" and batches[0][0]["captions"] == ["caption 0 0", "second caption 0 0"]


def test_shards_train_only_image_text_tasks(tmp_path):
    name = register(write_shards(tmp_path / "s", [2]))
    with pytest.raises(ValueError, match="classification"):
        build_task_train_loader(make_cfg(), entry("cls", "classification", [name]))
