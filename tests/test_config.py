"""Config: up2's keys and defaults, task-entry validation, and every YAML under configs/."""
import glob
import logging
import os

import pytest
from detectron2.config import get_cfg

from up2.config import TASK_TYPES, add_up2_config, get_task_entries, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def make_cfg():
    cfg = get_cfg()
    add_up2_config(cfg)
    return cfg


def test_paper_defaults_table7():
    cfg = make_cfg()
    proposer, loss = cfg.MODEL.UP2.PROPOSER, cfg.MODEL.UP2.LOSS
    assert (proposer.ENC_LAYERS, proposer.DEC_LAYERS, proposer.DIM_FEEDFORWARD, proposer.HIDDEN_DIM) == (6, 6, 2048, 256)
    assert (proposer.DROPOUT, proposer.NHEADS, proposer.ENC_N_POINTS, proposer.DEC_N_POINTS) == (0.0, 8, 4, 4)
    assert (proposer.NUM_QUERIES, proposer.TOPK_QUERIES) == (300, 200)
    assert (proposer.DN_BOX_NOISE_SCALE, proposer.DN_LABEL_NOISE_RATIO) == (1.0, 0.5)
    assert (loss.COST_OBJECTNESS, loss.COST_BBOX, loss.COST_GIOU, loss.COST_MASK, loss.COST_DICE) == (2, 5, 2, 5, 5)
    assert (loss.OBJECTNESS_WEIGHT, loss.BBOX_WEIGHT, loss.GIOU_WEIGHT, loss.MASK_WEIGHT, loss.DICE_WEIGHT) == (2, 5, 2, 5, 5)
    assert loss.NUM_POINTS == 112 * 112
    assert cfg.MODEL.UP2.GLOBAL_POOL.NUM_QUERIES == 10
    decoder = cfg.MODEL.UP2.DECODER
    assert (decoder.NUM_LAYERS, decoder.HIDDEN_DIM, decoder.NUM_HEADS, decoder.DROP_PATH) == (6, 768, 12, 0.1)
    assert cfg.MODEL.UP2.MOE.NUM_EXPERTS == 8 and cfg.MODEL.UP2.MOE.ENABLED
    assert cfg.SOLVER.UP2.ENCODER_LR_MULTIPLIER == 0.1
    assert cfg.MODEL.UP2.MSDA_IMPL == "auto"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_yaml_merges_and_validates(path):
    cfg = make_cfg()
    cfg.merge_from_file(path)
    entries = get_task_entries(cfg, require_train=False)
    for entry in entries:
        assert entry.type in TASK_TYPES


def test_base_config_carries_table8():
    cfg = make_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-UP2.yaml"))
    entries = {e.name: e for e in get_task_entries(cfg)}
    expected = {  # name: (s_k, omega_k, batch size per GPU)
        "classification": (0.1, 1.0, 28), "detection": (0.25, 1.0, 1), "mlm": (0.05, 0.5, 256),
        "captioning": (0.3, 0.5, 24), "retrieval": (0.3, 1.0, 28),
    }
    assert set(entries) == set(expected)
    for name, (s_k, w_k, batch) in expected.items():
        assert entries[name].sampling_ratio == pytest.approx(s_k)
        assert (entries[name].loss_weight, entries[name].batch_size) == (w_k, batch)
    assert sum(entries["captioning"].train_dataset_weights) == pytest.approx(0.3, abs=1e-4)
    assert cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.WEIGHT_DECAY == 1e-4


def test_key_typo_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("MODEL:\n  UP2:\n    PROPOSER:\n      NUM_QUERIESS: 900\n")
    cfg = make_cfg()
    with pytest.raises(KeyError, match="MODEL.UP2.PROPOSER.NUM_QUERIESS"):
        cfg.merge_from_file(str(path))
    with pytest.raises(AssertionError, match="SOLVER.UP2.OPTIMISER"):  # yacs raises AssertionError here
        cfg.merge_from_list(["SOLVER.UP2.OPTIMISER", "AdamW"])


def test_load_config_merges_the_file_then_the_options(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("MODEL:\n  UP2:\n    PROPOSER:\n      NUM_QUERIES: 50\nSOLVER:\n  BASE_LR: 0.5\n")
    cfg = load_config(str(path), ["SOLVER.BASE_LR", "0.25"])
    assert cfg.MODEL.UP2.PROPOSER.NUM_QUERIES == 50 and cfg.SOLVER.BASE_LR == 0.25
    assert cfg.MODEL.UP2.MSDA_IMPL == make_cfg().MODEL.UP2.MSDA_IMPL  # up2 defaults present
    assert not cfg.is_frozen()
    with pytest.raises(AssertionError, match="SOLVER.UP2.OPTIMISER"):
        load_config(str(path), ["SOLVER.UP2.OPTIMISER", "AdamW"])


def task(**overrides):
    entry = {"TYPE": "classification", "TRAIN_DATASETS": ["a"], "SAMPLING_RATIO": 1.0, "BATCH_SIZE": 2}
    entry.update(overrides)
    return entry


def entries_of(*tasks, require_train=True):
    cfg = make_cfg()
    cfg.DATASETS.UP2.TASKS = list(tasks)
    return get_task_entries(cfg, require_train=require_train)


def test_unknown_task_type_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        entries_of(task(TYPE="segmentation"))
    message = str(error.value)
    assert "'segmentation'" in message and all(t in message for t in TASK_TYPES)


@pytest.mark.parametrize("overrides, words", [
    ({"SAMPLING_RATIO": -0.1}, ["SAMPLING_RATIO", "-0.1"]),
    ({"LOSS_WEIGHT": -1.0}, ["LOSS_WEIGHT", "-1.0"]),
    ({"BATCH_SIZE": 0}, ["BATCH_SIZE", "0"]),
    ({"TRAIN_DATASETS": []}, ["TRAIN_DATASETS"]),
    ({"BATCHSIZE": 4}, ["BATCHSIZE", "BATCH_SIZE"]),
    ({"TRAIN_DATASET_WEIGHTS": [1.0, 2.0]}, ["TRAIN_DATASET_WEIGHTS", "2 values"]),
])
def test_bad_task_entry_is_rejected_naming_task_and_key(overrides, words):
    with pytest.raises(ValueError) as error:
        entries_of(task(NAME="my_cls", **overrides))
    message = str(error.value)
    assert "my_cls" in message
    for word in words:
        assert word in message


def test_sampling_ratios_are_normalised_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        entries = entries_of(task(NAME="a", SAMPLING_RATIO=2.0), task(NAME="b", TYPE="mlm", SAMPLING_RATIO=6.0))
    assert [e.sampling_ratio for e in entries] == pytest.approx([0.25, 0.75])
    assert "normalising" in caplog.text


def test_duplicate_names_rejected_and_eval_only_needs_no_train():
    with pytest.raises(ValueError, match="unique"):
        entries_of(task(), task())
    (entry,) = entries_of(task(TRAIN_DATASETS=[], TEST_DATASETS=["v"]), require_train=False)
    assert entry.name == "classification" and entry.test_datasets == ("v",)
