"""Shared pytest fixtures: two-rank launcher, tiny UniPerceiverV2 config (random RoBERTa, BPE tokenizer
trained on a few sentences; used by the modeling, engine and demo tests). ``import up2`` first: it applies
the Detectron2 compatibility fixes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import up2  # noqa: F401  (must precede any detectron2 import)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances, polygons_to_bitmask  # noqa: E402

from up2.config import add_up2_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def run_two_ranks(tmp_path):
    """Runs a script that calls ``up2.engine.launch(worker, 2, ...)`` with ``tmp_path`` as its argument
    (CPU, gloo) and returns the JSON each rank wrote to ``tmp_path/rank{r}.json``."""

    def run(script: str, timeout: int = 180):
        path = tmp_path / "run.py"
        path.write_text(script)
        result = subprocess.run([sys.executable, str(path), str(tmp_path)], capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    return run


# ---------------------------------------------------------------- tiny UniPerceiverV2 (modeling, engine, demo)
SENTENCES = [
    "a red circle above a blue square", "a green triangle to the left of a red star",
    "two shapes: one circle and one square", "a hexagon is a shape with six corners",
    "a purple heart below an orange diamond", "there is one cross and it is cyan",
    "an arrow points to the right", "a pentagon has five corners",
]
CLASS_NAMES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="session")
def tiny_text_dirs(tmp_path_factory):
    """(tokenizer dir, RoBERTa config dir) written once per session."""
    from up2.data.shapes.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_text")
    tokenizer_dir = root / "tokenizer"
    vocab = train_tokenizer(SENTENCES * 4, str(tokenizer_dir), vocab_size=300)
    config_dir = root / "roberta"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({
        "architectures": ["RobertaModel"], "model_type": "roberta", "vocab_size": vocab, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 40,
        "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    return str(tokenizer_dir), str(config_dir)


def make_tiny_image_encoder_cfg(image_tokens: str = "both"):
    """Config of a tiny image encoder (ResNet-18 GN + 32-d proposer, 6 regional tokens) for CPU tests."""
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.UP2.IMAGE_TOKENS = image_tokens
    cfg.MODEL.UP2.MSDA_IMPL = "pytorch"
    p = cfg.MODEL.UP2.PROPOSER
    p.HIDDEN_DIM, p.ENC_LAYERS, p.DEC_LAYERS, p.DIM_FEEDFORWARD, p.NHEADS = 32, 1, 1, 64, 4
    p.NUM_QUERIES, p.TOPK_QUERIES, p.MASK_DIM, p.FUSION_MASK_POOL_SIZE, p.DN_NUM_QUERIES = 12, 6, 16, 7, 4
    cfg.MODEL.UP2.LOSS.NUM_POINTS = 64
    cfg.MODEL.UP2.GLOBAL_POOL.NUM_QUERIES, cfg.MODEL.UP2.GLOBAL_POOL.NUM_HEADS = 3, 4
    return cfg


def make_tiny_up2_cfg(tokenizer_dir: str, text_encoder_dir: str, pretrained: bool = False):
    """A UniPerceiverV2 config small enough for unit tests on CPU."""
    cfg = make_tiny_image_encoder_cfg()
    cfg.MODEL.META_ARCHITECTURE = "UniPerceiverV2"
    text = cfg.MODEL.UP2.TEXT_ENCODER
    text.NAME, text.TOKENIZER, text.PRETRAINED, text.MAX_LENGTH = text_encoder_dir, tokenizer_dir, pretrained, 24
    dec = cfg.MODEL.UP2.DECODER
    dec.NUM_LAYERS, dec.HIDDEN_DIM, dec.NUM_HEADS, dec.FFN_DIM, dec.DROP_PATH, dec.DROPOUT = 2, 32, 4, 64, 0.0, 0.0
    dec.MAX_POSITIONS = 32
    cfg.MODEL.UP2.MOE.NUM_EXPERTS = 4
    cfg.MODEL.UP2.CAPTION.MAX_LENGTH = 6
    cfg.MODEL.UP2.HEAD.VOCAB_CHUNK_SIZE = 64
    return cfg


@pytest.fixture
def tiny_up2_cfg(tiny_text_dirs):
    return make_tiny_up2_cfg(*tiny_text_dirs)


@pytest.fixture(scope="session")
def image_encoder_cfg_factory():
    """make_tiny_image_encoder_cfg(image_tokens) (tiny backbone + proposer + global pooling)."""
    return make_tiny_image_encoder_cfg


@pytest.fixture(scope="session")
def up2_cfg_factory():
    """The config builder itself (e.g. to use another text encoder)."""
    return make_tiny_up2_cfg


def instances_from_ground_truth(record, classes) -> Instances:
    """Predicted ``Instances`` that are a dataset record's annotated objects: their boxes (XYXY) and polygon
    masks, score 1, and ``classes[i]`` as the class of annotation i."""
    height, width, annotations = record["height"], record["width"], record["annotations"]
    instances = Instances((height, width))
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.ones(len(annotations))
    instances.pred_classes = torch.tensor(list(classes), dtype=torch.long)
    masks = [polygons_to_bitmask([np.asarray(p) for p in a["segmentation"]], height, width) for a in annotations]
    instances.pred_masks = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool))
    return instances


@pytest.fixture(scope="session")
def ground_truth_instances():
    """instances_from_ground_truth(record, classes): a dataset record's objects as predictions."""
    return instances_from_ground_truth
