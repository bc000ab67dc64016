"""projects/OpenVocabDetection: the seen / novel split of the shapes annotations, the chance baseline, and
the zero-shot evaluation (a model that names the novel objects right scores AP 100, chance does not)."""
import collections
import json
import os
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from torch import nn

from up2.config import add_up2_config
from up2.data.shapes import generate_shapes

PROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "projects", "OpenVocabDetection")
sys.path.insert(0, PROJECT)
from open_vocab import evaluate_classes_by_name, evaluate_novel_classes  # noqa: E402
from open_vocab import register_open_vocab_split, write_open_vocab_split  # noqa: E402
from open_vocab.evaluate import RandomClassModel  # noqa: E402

PREFIX = "ovtest"


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    """A 16 + 10 image shapes dataset, its split with the 3 most frequent val categories as novel, registered
    as ``ovtest_det_train_seen`` / ``ovtest_det_val_novel`` / ``ovtest_det_val_seen``."""
    root = str(tmp_path_factory.mktemp("ov") / "shapes")
    generate_shapes(root, seed=0, num_train=16, num_val=10, image_size=64, vocab_size=300, workers=1)
    val = json.load(open(os.path.join(root, "annotations", "instances_val.json")))
    names = {c["id"]: c["name"] for c in val["categories"]}
    counts = collections.Counter(names[a["category_id"]] for a in val["annotations"])
    novel = [name for name, _ in counts.most_common(3)]
    split = write_open_vocab_split(root, os.path.join(root, "split"), novel)
    register_open_vocab_split(root, split, prefix=PREFIX)
    yield root, split
    for name in (f"{PREFIX}_det_train_seen", f"{PREFIX}_det_val_novel", f"{PREFIX}_det_val_seen"):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_split_keeps_seen_for_training_and_novel_for_evaluation(shapes_split):
    root, split = shapes_split
    assert sorted(split["seen"] + split["novel"]) == sorted(c["name"] for c in json.load(
        open(os.path.join(root, "annotations", "instances_train.json")))["categories"])
    for key, original, keep in (("train_seen", "train", split["seen"]), ("val_novel", "val", split["novel"]),
                                ("val_seen", "val", split["seen"])):
        full = json.load(open(os.path.join(root, "annotations", f"instances_{original}.json")))
        part = json.load(open(split[key]))
        ids = {c["id"] for c in full["categories"] if c["name"] in keep}
        assert [c["name"] for c in part["categories"]] == [c["name"] for c in full["categories"] if c["id"] in ids]
        assert part["annotations"] == [a for a in full["annotations"] if a["category_id"] in ids]
        assert part["images"] == full["images"]  # unlabeled novel objects stay in the training images
    with pytest.raises(ValueError, match="proper subset"):
        write_open_vocab_split(root, os.path.join(root, "bad"), split["seen"] + split["novel"])
    with pytest.raises(ValueError, match="'dodecagon'"):
        write_open_vocab_split(root, os.path.join(root, "bad"), ["dodecagon"])


@pytest.fixture
def eval_cfg():
    """A config for COCO evaluation of the 64 px test images on CPU."""
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


class GroundTruthNamer(nn.Module):
    """Predicts the ground-truth objects of a dataset (boxes, masks, score 1) with the class index of each
    object's name in the current detection vocabulary."""

    def __init__(self, dataset_name: str, vocabulary, to_instances):
        super().__init__()
        self.records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
        self.names = MetadataCatalog.get(dataset_name).thing_classes
        self.current = list(vocabulary)
        self.to_instances = to_instances  # the ground_truth_instances fixture

    def vocabulary(self, task):
        return list(self.current)

    def set_vocabulary(self, task, names):
        self.current = list(names)

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            record = self.records[x["image_id"]]
            classes = [self.current.index(self.names[a["category_id"]]) for a in record["annotations"]]
            outputs.append({"instances": self.to_instances(record, classes)})
        return outputs


def test_naming_the_novel_objects_right_scores_100_and_chance_does_not(shapes_split, eval_cfg, tmp_path,
                                                                    ground_truth_instances):
    _, split = shapes_split
    dataset = f"{PREFIX}_det_val_novel"
    model = GroundTruthNamer(dataset, split["seen"], ground_truth_instances)
    results = evaluate_novel_classes(eval_cfg, model, dataset, split["novel"], str(tmp_path))
    assert results["zero_shot"]["bbox/AP50"] == pytest.approx(100.0)
    assert results["zero_shot"]["segm/AP50"] == pytest.approx(100.0)
    assert results["chance"]["bbox/AP50"] < 90.0
    assert model.vocabulary("detection") == split["seen"]  # the previous vocabulary is restored
    # the novel names in another order than the dataset's category ids: still scored by name
    reordered = evaluate_novel_classes(eval_cfg, model, dataset, list(reversed(split["novel"])), str(tmp_path / "r"))
    assert reordered["zero_shot"]["bbox/AP50"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="expected the classes"):
        evaluate_novel_classes(eval_cfg, model, dataset, split["novel"][:2], str(tmp_path / "bad"))


def test_seen_split_is_scored_with_the_seen_vocabulary(shapes_split, eval_cfg, tmp_path, ground_truth_instances):
    _, split = shapes_split
    dataset = f"{PREFIX}_det_val_seen"
    assert list(MetadataCatalog.get(dataset).thing_classes) == split["seen"]
    model = GroundTruthNamer(dataset, split["novel"], ground_truth_instances)
    results = evaluate_classes_by_name(eval_cfg, model, dataset, split["seen"], str(tmp_path))
    assert results["by_name"]["bbox/AP50"] == pytest.approx(100.0)
    assert results["chance"]["bbox/AP50"] < 90.0
    assert model.vocabulary("detection") == split["novel"]


def test_chance_model_keeps_boxes_and_scores_and_draws_classes(shapes_split, ground_truth_instances):
    _, split = shapes_split
    dataset = f"{PREFIX}_det_val_novel"
    model = GroundTruthNamer(dataset, split["novel"], ground_truth_instances)
    inputs = [{"image_id": i} for i in sorted(model.records)]
    truth, chance = model(inputs), RandomClassModel(model, num_classes=3, seed=0)(inputs)
    drawn = torch.cat([c["instances"].pred_classes for c in chance])
    assert int(drawn.min()) >= 0 and int(drawn.max()) < 3 and len(set(drawn.tolist())) > 1
    for t, c in zip(truth, chance):
        assert torch.equal(t["instances"].pred_boxes.tensor, c["instances"].pred_boxes.tensor)
        assert torch.equal(t["instances"].scores, c["instances"].scores)
    again = torch.cat([c["instances"].pred_classes for c in RandomClassModel(model, 3, seed=0)(inputs)])
    assert torch.equal(drawn, again)


def test_two_stage_configs_chain_and_keep_novel_shapes_out_of_detection_only():
    """Stage 2 starts from stage 1's final weights; only its detection task trains on the seen split, while
    classification (both stages) and captioning train on data that names every shape."""
    from up2.config import get_task_entries, load_config

    configs = os.path.join(PROJECT, "configs")
    stage1 = load_config(os.path.join(configs, "open_vocab_shapes_stage1.yaml"), [])
    stage2 = load_config(os.path.join(configs, "open_vocab_shapes_stage2.yaml"), [])
    assert stage2.MODEL.WEIGHTS == os.path.join(stage1.OUTPUT_DIR, "model_final.pth")
    assert stage2.OUTPUT_DIR != stage1.OUTPUT_DIR
    first = {entry.name: entry.train_datasets for entry in get_task_entries(stage1)}
    second = {entry.name: entry.train_datasets for entry in get_task_entries(stage2)}
    assert first == {"classification": ("shapes_cls_train",)}
    assert second == {"detection": ("shapes_det_train_seen",), "classification": ("shapes_cls_train",),
                      "captioning": ("shapes_caption_train",)}
