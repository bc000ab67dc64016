"""A sixth task type added from outside up2: a text-classification head, its mapper, its evaluator and its
task specification are registered here alone; UP2Trainer trains the tiny UniPerceiverV2 on it for two
iterations and evaluates it, with no change under up2/."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog

from up2.data.mappers import MAPPER_REGISTRY
from up2.engine import UP2Trainer
from up2.evaluation import ClassificationEvaluator
from up2.evaluation.build import EVALUATOR_REGISTRY
from up2.modeling.build import TASK_REGISTRY
from up2.modeling.decoder import text_segment
from up2.modeling.moe import SIDE_INPUT
from up2.modeling.tasks import ClassNamesMixin, TaskHead
from up2.task_specs import BUILTIN_TASK_TYPES, TASK_SPEC_REGISTRY, TaskSpec

TOY = "text_length"
CLASSES = ["short", "long"]
TEXTS = ["a circle", "a red square above a green triangle and a blue star", "one star",
         "two shapes: one hexagon to the left of an orange diamond", "a cross",
         "an arrow points to the right of a heart"]


@TASK_REGISTRY.register()
class TextLengthTask(ClassNamesMixin, TaskHead):
    """Is a text short or long: the text's ``<SPE>`` output scored against the class names."""

    task_type = TOY

    @configurable
    def __init__(self, *, class_names=None, class_names_datasets=()):
        super().__init__()
        if class_names:
            self.set_class_names(class_names)
        self.class_names_datasets = tuple(class_names_datasets)

    @classmethod
    def from_config(cls, cfg, class_names=None, class_names_datasets=()):
        return {"class_names": class_names, "class_names_datasets": class_names_datasets}

    def logits(self, model, batched_inputs):
        text = model.text_encoder([x["text"] for x in batched_inputs])
        segment = text_segment(text["features"], text["attention_mask"], SIDE_INPUT)
        spe = model.decoder(self.task_type, [segment]).hidden[:, 0]
        return model.head(spe, self.class_embeddings(model), self.task_type)  # (B, C)

    def losses(self, model, batched_inputs):
        labels = torch.tensor([x["label"] for x in batched_inputs], device=model.device)
        return {"loss_text_length": F.cross_entropy(self.logits(model, batched_inputs).float(), labels)}

    def inference(self, model, batched_inputs):
        return [{"class_scores": scores} for scores in self.logits(model, batched_inputs).float().softmax(-1)]


@MAPPER_REGISTRY.register()
class TextLengthMapper:
    def __init__(self, cfg, is_train: bool):
        self.is_train = is_train

    def __call__(self, record):
        return {"task": TOY, "text": record["text"], "label": record["label"], "text_id": record["text_id"]}


@EVALUATOR_REGISTRY.register()
def text_length_evaluator(cfg, dataset_name, output_dir):
    return ClassificationEvaluator(dataset_name)


@pytest.fixture
def text_length_task():
    """Registers the task type and its train / test datasets for one test, and removes them afterwards."""
    spec = TASK_SPEC_REGISTRY.register(TaskSpec(TOY, head="TextLengthTask", mapper="TextLengthMapper",
                                                evaluator="text_length_evaluator", has_class_names=True))
    records = [{"text": text, "label": int(len(text.split()) > 3), "text_id": i} for i, text in enumerate(TEXTS)]
    names = ("text_length_train", "text_length_test")
    for name in names:
        DatasetCatalog.register(name, lambda: [dict(r) for r in records])
        MetadataCatalog.get(name).set(thing_classes=CLASSES)
    try:
        yield spec
    finally:
        TASK_SPEC_REGISTRY.unregister(TOY)
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_a_registered_task_type_trains_and_evaluates(text_length_task, tiny_text_dirs, up2_cfg_factory, tmp_path):
    cfg = up2_cfg_factory(*tiny_text_dirs)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    cfg.DATASETS.UP2.TASKS = [{"NAME": "length", "TYPE": TOY, "TRAIN_DATASETS": ["text_length_train"],
                               "TEST_DATASETS": ["text_length_test"], "BATCH_SIZE": 3}]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 2, 1e-3, 0, ()
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD, cfg.SEED = 1000, 0, 0
    cfg.OUTPUT_DIR = str(tmp_path)

    trainer = UP2Trainer(cfg)
    model = trainer.model
    assert list(model.tasks) == list(BUILTIN_TASK_TYPES) + [TOY]
    assert model.class_name_tasks == ("detection", "classification", TOY)
    assert model.head.logit_scale.shape == (6,)
    gate_inputs = model.decoder.layers[0].ffn.gate.num_attribute_values
    assert tuple(gate_inputs)[0] == 6  # the MoE's task attribute has a value for the new type
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    trainer.train()

    assert any(not torch.equal(before[k], v) for k, v in model.decoder.state_dict().items())
    metrics = [json.loads(line) for line in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    last = max((m for m in metrics if "task_iters/length" in m), key=lambda m: m["iteration"])
    assert last["iteration"] == 1 and last["task_iters/length"] == 2
    assert math.isfinite(last["task_loss/length"])  # the loss of the task (its only loss)

    results = json.load(open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json")))
    assert set(results) == {"text_length_test"}
    scores = results["text_length_test"]
    assert set(scores) == {"classification/top1", "classification/top5"}
    assert 0.0 <= scores["classification/top1"] <= 100.0 and scores["classification/top5"] == 100.0
    assert model.vocabulary(TOY) == CLASSES  # read from the datasets' thing_classes


def test_the_task_type_is_gone_after_the_test():
    assert TOY not in TASK_SPEC_REGISTRY and TASK_SPEC_REGISTRY.task_types() == BUILTIN_TASK_TYPES
