"""The output directory of img2dataset (``--output_format webdataset``: NNNNN.tar of KEY.jpg + KEY.json +
KEY.txt, NNNNN_stats.json and NNNNN.parquet beside each tar), written by the tests with webdataset's
TarWriter exactly as img2dataset writes it, is registered and trained as it is; a truncated shard is
skipped and counted."""
import json
import logging
import os
import tarfile

import pytest
import torch
import torch.utils.data as torchdata
import webdataset as wds
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY

from up2.config import add_up2_config
from up2.data.datasets import DatasetNotFoundError, register_image_text_shards
from up2.data.shard_layouts import IMG2DATASET
from up2.data.streams import TaskStream
from up2.engine import UP2Trainer

SAMPLES_PER_SHARD = 10000  # img2dataset's default number_sample_per_shard: keys of 5 + 4 digits


def write_img2dataset_output(directory, successes, jpeg_bytes, failed_per_shard=1):
    """What ``img2dataset --output_format webdataset --caption_col caption`` leaves in ``directory``: shard
    ``i`` holds ``successes[i]`` samples; ``failed_per_shard`` more rows failed to download (counted in the
    stats, absent from the tar). Captions are ``"caption <shard> <row>"``; row 1 of each shard has a line
    break in its caption."""
    os.makedirs(directory, exist_ok=True)
    for shard_id, count in enumerate(successes):
        shard = f"{shard_id:05d}"
        with open(os.path.join(directory, f"{shard}.tar"), "wb") as stream:
            writer = wds.TarWriter(stream)
            for row in range(count):
                key = f"{shard_id * SAMPLES_PER_SHARD + row:09d}"
                caption = f"caption {shard_id}\n{row}" if row == 1 else f"caption {shard_id} {row}"
                meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                        "error_message": None, "width": 32, "height": 24, "original_width": 64, "original_height": 48,
                        "exif": "{}", "sha256": "0" * 64}
                writer.write({"__key__": key, "jpg": jpeg_bytes(shard_id * 100 + row), "txt": caption,
                              "json": json.dumps(meta, indent=4)})
            writer.close()
        with open(os.path.join(directory, f"{shard}.parquet"), "wb") as f:  # per-row metadata, not read by up2
            f.write(b"PAR1 placeholder PAR1")
        stats = {"count": count + failed_per_shard, "successes": count, "failed_to_download": failed_per_shard,
                 "failed_to_resize": 0, "duration": 1.5, "bytes_downloaded": 1000 * count, "start_time": 0.0,
                 "end_time": 1.5, "status_dict": {"success": count, "timeout": failed_per_shard}}
        with open(os.path.join(directory, f"{shard}_stats.json"), "w") as f:
            json.dump(stats, f, indent=4)
    return directory


def truncate_inside(path, member_name):
    with tarfile.open(path) as tar:
        offset = tar.getmember(member_name).offset_data
    with open(path, "r+b") as f:
        f.truncate(offset + 10)


def test_img2dataset_directory_registers_as_it_is(tmp_path, faulty_data, caplog):
    directory = write_img2dataset_output(tmp_path / "cc3m", [4, 3, 5], faulty_data.jpeg_bytes)
    with tarfile.open(directory / "00003.tar", "w"):  # being downloaded: no stats file yet
        pass
    name = faulty_data.unique("img2dataset")
    register_image_text_shards(name, str(directory))
    with caplog.at_level(logging.WARNING, logger="up2.data.shard_layouts"):
        shards = DatasetCatalog.get(name)
    assert "00003.tar" in caplog.text and "unfinished" in caplog.text
    assert shards.layout == IMG2DATASET and len(shards) == 12
    assert [(os.path.basename(s.path), s.num_samples, s.offset) for s in shards.shards] == [
        ("00000.tar", 4, 0), ("00001.tar", 3, 4), ("00002.tar", 5, 7)]
    samples = list(shards)
    assert [s["image_id"] for s in samples] == list(range(12))
    assert samples[5]["source"] == f"{directory / '00001.tar'}:000010001.jpg"
    assert samples[5]["captions"] == ["caption 1 1"]  # img2dataset's caption file is one caption
    assert samples[6]["captions"] == ["caption 1 2"] and samples[6]["image_bytes"] == faulty_data.jpeg_bytes(102)

    glob_name = faulty_data.unique("img2dataset_glob")
    register_image_text_shards(glob_name, str(directory / "0000[02].tar"))
    assert len(DatasetCatalog.get(glob_name)) == 9


def test_img2dataset_stats_errors_name_the_file(tmp_path, faulty_data):
    directory = write_img2dataset_output(tmp_path / "s", [2, 2], faulty_data.jpeg_bytes)
    os.remove(directory / "00001.tar")
    name = faulty_data.unique("gone")
    register_image_text_shards(name, str(directory))
    with pytest.raises(DatasetNotFoundError, match=r"00001\.tar does not exist"):
        DatasetCatalog.get(name)
    (directory / "00001_stats.json").unlink()
    (directory / "00000_stats.json").write_text(json.dumps({"count": 3}))
    name = faulty_data.unique("bad_stats")
    register_image_text_shards(name, str(directory))
    with pytest.raises(ValueError, match=r"00000_stats\.json: key 'successes'.*got None"):
        DatasetCatalog.get(name)
    empty = faulty_data.unique("empty")
    os.makedirs(tmp_path / "empty")
    register_image_text_shards(empty, str(tmp_path / "empty"), prepare_hint="Run img2dataset.")
    with pytest.raises(DatasetNotFoundError,
                       match=r"img2dataset shards NNNNN.tar \+ NNNNN_stats.json.*Run img2dataset"):
        DatasetCatalog.get(empty)


@pytest.mark.parametrize("successes", [[3, 2, 4, 1, 3], [4, 3]])  # 5 shards, and 2 shards for 4 workers
def test_img2dataset_shards_split_over_two_ranks_and_two_workers_once(tmp_path, faulty_data, successes):
    name = faulty_data.unique("split")
    register_image_text_shards(name, str(write_img2dataset_output(tmp_path / "s", successes, faulty_data.jpeg_bytes)))
    shards = DatasetCatalog.get(name)
    ids = []
    for rank in (0, 1):
        stream = TaskStream([shards], [1.0], mapper=None, seed=5, infinite=False, rank=rank, world_size=2,
                            num_workers=2)
        ids += [s["image_id"] for s in torchdata.DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(ids) == list(range(sum(successes)))


@META_ARCH_REGISTRY.register()
class CaptionedImageToyModel(torch.nn.Module):
    """Loss from each image's mean pixel and caption length; records the image ids it gets."""

    def __init__(self, cfg):
        super().__init__()
        self.head = torch.nn.Linear(2, 1)
        self.batches = []

    def forward(self, batched_inputs):
        self.batches.append([(d.get("source"), d["image_id"]) for d in batched_inputs])
        x = torch.tensor([[d["image"].float().mean().item() / 255.0, len(d["caption"]) / 100.0]
                          for d in batched_inputs])
        return {"loss_toy": self.head(x).pow(2).mean()}


def make_cfg(output_dir, datasets, max_iter=8, num_workers=0, max_bad_fraction=0.01):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "CaptionedImageToyModel"
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FORMAT = "RGB"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    cfg.DATASETS.UP2.IMAGE_SIZE = 16
    cfg.DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION = max_bad_fraction
    cfg.DATASETS.UP2.TASKS = [{"NAME": "cap", "TYPE": "captioning", "TRAIN_DATASETS": list(datasets), "BATCH_SIZE": 3}]
    cfg.DATALOADER.NUM_WORKERS = num_workers
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = max_iter, 0, ()
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD, cfg.SEED = 100000, 0, 2
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_img2dataset_directory_trains_as_it_is(tmp_path, faulty_data):
    name = faulty_data.unique("train_img2dataset")
    register_image_text_shards(name, str(write_img2dataset_output(tmp_path / "s", [4, 3, 5], faulty_data.jpeg_bytes)))
    trainer = UP2Trainer(make_cfg(tmp_path / "out", [name], max_iter=8, num_workers=2))
    trainer.train()
    batches = trainer.model.batches
    assert len(batches) == 8 and all(len(b) == 3 for b in batches)
    assert {i for b in batches for _, i in b} == set(range(12))  # 24 draws of 12 samples: every one seen
    assert all(source.endswith(".jpg") and ".tar:0000" in source for b in batches for source, _ in b)
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    assert records[-1]["iteration"] == 7 and not any(k.startswith("skipped/") for k in records[-1])


def test_truncated_shard_and_bad_json_images_are_skipped_and_counted_in_training(tmp_path, faulty_data):
    directory = write_img2dataset_output(tmp_path / "s", [4, 6, 5], faulty_data.jpeg_bytes)
    truncate_inside(directory / "00001.tar", "000010002.jpg")  # samples 2..5 of shard 1 are lost
    shards = faulty_data.unique("truncated")
    register_image_text_shards(shards, str(directory))
    _, captions, _, _ = faulty_data.register_faulty_json_datasets(tmp_path / "json")
    trainer = UP2Trainer(make_cfg(tmp_path / "out", [shards, captions], max_iter=30, max_bad_fraction=0.3))
    trainer.train()
    batches = trainer.model.batches
    assert len(batches) == 30 and all(len(b) == 3 for b in batches)
    from_shards = {i for b in batches for source, i in b if source is not None}
    assert from_shards and not from_shards & {6, 7, 8, 9}
    last = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")][-1]
    assert last["iteration"] == 29
    assert last[f"skipped/{shards}/corrupt_shard"] >= 4 and last[f"skipped/{shards}/corrupt_shard"] % 4 == 0
    assert last[f"skipped/{shards}/bad_fraction"] == pytest.approx(4 / 15)
    assert last[f"skipped/{captions}/bad_fraction"] == pytest.approx(3 / 20)
    assert last[f"skipped/{captions}/missing_image"] >= 1 and last[f"skipped/{captions}/unreadable_image"] >= 2
