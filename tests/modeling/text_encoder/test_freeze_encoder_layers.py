"""freeze_encoder_layers / MODEL.UP2.TEXT_ENCODER.FREEZE_AT: 0 nothing, 1 the embeddings, k the embeddings and
the first k - 1 transformer layers; frozen parameters get no gradient; bad values are refused."""
import pytest
import torch
from detectron2.config import get_cfg

from up2.config import add_up2_config
from up2.modeling.build import build_text_encoder
from up2.modeling.text_encoder.hf_text_encoder import freeze_encoder_layers

LAYERS = 3


@pytest.fixture
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config)


def frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def expected_frozen(model, freeze_at):
    prefixes = () if freeze_at == 0 else ("embeddings.",) + tuple(f"encoder.layer.{i}." for i in range(freeze_at - 1))
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("freeze_at", [0, 1, 2, LAYERS + 1])
def test_freezes_the_bottom_and_the_gradient_stops_there(bert, freeze_at):
    returned = freeze_encoder_layers(bert, freeze_at)
    expected = expected_frozen(bert, freeze_at)
    assert frozen_names(bert) == expected
    assert {id(p) for p in returned} == {id(p) for n, p in bert.named_parameters() if n in expected}
    if freeze_at == 1:
        assert expected == {n for n, _ in bert.named_parameters() if n.startswith("embeddings.")}
    ids = torch.randint(5, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    hidden = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    if freeze_at == LAYERS + 1:  # everything below the output is frozen
        assert not hidden.requires_grad
        return
    hidden.square().mean().backward()
    for name, parameter in bert.named_parameters():
        if name in expected:
            assert parameter.grad is None, name
        elif not name.startswith("pooler."):  # the pooler is not on the last_hidden_state path
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.parametrize("freeze_at", [-1, LAYERS + 2])
def test_out_of_range_values_are_refused(bert, freeze_at):
    with pytest.raises(ValueError, match=rf"FREEZE_AT must be in \[0, {LAYERS + 1}\].*got {freeze_at}"):
        freeze_encoder_layers(bert, freeze_at)
    assert frozen_names(bert) == set()


def test_encoder_without_bert_layout_is_refused():
    module = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    assert freeze_encoder_layers(module, 0) == []
    with pytest.raises(ValueError, match="no 'embeddings' and 'encoder.layer'"):
        freeze_encoder_layers(module, 1)


def test_config_key_reaches_the_text_encoder(tiny_text_dirs):
    tokenizer_dir, roberta_dir = tiny_text_dirs  # a 1-layer random RoBERTa
    cfg = get_cfg()
    add_up2_config(cfg)
    text = cfg.MODEL.UP2.TEXT_ENCODER
    text.NAME, text.TOKENIZER, text.PRETRAINED = roberta_dir, tokenizer_dir, False
    cfg.MODEL.UP2.DECODER.HIDDEN_DIM = 8
    assert text.FREEZE_AT == 0
    assert not any(not p.requires_grad for p in build_text_encoder(cfg).parameters())
    text.FREEZE_AT = 2
    encoder = build_text_encoder(cfg)
    assert frozen_names(encoder) == {"encoder." + n for n in expected_frozen(encoder.encoder, 2)}
    assert encoder.projection.weight.requires_grad
    assert sum(p.numel() for p in encoder.frozen) == sum(p.numel() for p in encoder.parameters() if not p.requires_grad)
    text.FREEZE_AT = 3
    with pytest.raises(ValueError, match=r"\[0, 2\].*got 3"):
        build_text_encoder(cfg)
