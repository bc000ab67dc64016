"""Per-task target vocabularies (MODEL.UP2.HEAD.TARGET_VOCABULARY "training_texts"): set validation and index
maps, restricted logits are columns of the full ones, the captioning / MLM losses and decoding use the set,
the set travels with the weights (AtomicCheckpointer), the trainer's set is exactly the training texts'
tokens, and the MLM evaluator's coverage / perplexity over the set. Uses the tiny UniPerceiverV2 of
tests/conftest.py."""
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import up2.modeling  # noqa: F401
from up2.checkpoint import AtomicCheckpointer
from up2.engine.target_vocabulary import set_training_vocabularies
from up2.evaluation import MLMEvaluator
from up2.modeling.tasks import beam_search
from up2.modeling.tasks.base import vocabulary_logits
from up2.modeling.tasks.targets import TargetEncoder

CAPTIONS = ["a red circle above a blue square", "a green triangle to the left of a red star"]
TEXTS = ["a red circle above a blue square", "there is one cross and it is cyan", "a pentagon has five corners"]


def image(seed, h=64, w=80):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8)


def captioning_batch():
    return [{"task": "captioning", "image": image(i), "caption": c, "image_id": i} for i, c in enumerate(CAPTIONS)]


def mlm_batch():
    return [{"task": "mlm", "text": t, "text_id": i} for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def built(tiny_text_dirs, up2_cfg_factory):
    cfg = up2_cfg_factory(*tiny_text_dirs)
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.fixture
def model(built):
    """The module's tiny model, in eval mode, with the full vocabulary again after the test."""
    model = built[1]
    yield model
    for name in model.targets.variable_size_buffers:
        setattr(model.targets, name, torch.zeros(0, dtype=torch.long))
    model.targets.clear_cache()
    model.zero_grad(set_to_none=True)
    model.eval()


def special_ids(model):
    return set(model.text_encoder.tokenizer.all_special_ids)


# ------------------------------------------------------------------------------------- the sets themselves
def test_set_validation_and_storage():
    targets = TargetEncoder()
    assert targets.vocabulary_ids("captioning") is None and targets.vocabulary_ids("mlm") is None
    targets.set_vocabulary_ids("mlm", [7, 3, 7, 5], vocab_size=10)
    assert targets.vocabulary_ids("mlm").tolist() == [3, 5, 7]  # sorted, without duplicates
    assert targets.vocabulary_ids("captioning") is None  # per task
    assert targets.state_dict()["mlm_vocabulary"].tolist() == [3, 5, 7]
    with pytest.raises(ValueError, match="'captioning' is empty"):
        targets.set_vocabulary_ids("captioning", [], vocab_size=10)
    with pytest.raises(ValueError, match=r"outside \[0, 10\): \[10\]"):
        targets.set_vocabulary_ids("mlm", [3, 10], vocab_size=10)
    with pytest.raises(ValueError, match=r"outside \[0, 10\): \[-1\]"):
        targets.set_vocabulary_ids("mlm", [-1, 3], vocab_size=10)
    with pytest.raises(ValueError, match="'detection' has no vocabulary targets"):
        targets.set_vocabulary_ids("detection", [1], vocab_size=10)
    assert targets.vocabulary_ids("mlm").tolist() == [3, 5, 7]  # a refused set leaves the old one
    with pytest.raises(ValueError, match="TARGET_VOCABULARY: unknown value 'train'"):
        TargetEncoder(target_vocabulary="train")


def test_token_indices_and_full_vocabulary_scores_known_answers():
    targets = TargetEncoder()
    tokens = torch.tensor([[5, 3, 4, 0], [7, -100, 9, 8]])
    assert torch.equal(targets.token_indices("captioning", tokens), tokens)  # full vocabulary: ids unchanged
    scores = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    assert targets.full_vocabulary_scores("captioning", scores, 10) is scores

    targets.set_vocabulary_ids("captioning", [3, 5, 7], vocab_size=10)
    assert targets.token_indices("captioning", tokens).tolist() == [[1, 0, -100, -100], [2, -100, -100, -100]]
    full = targets.full_vocabulary_scores("captioning", scores, 10)
    inf = float("-inf")
    assert full.tolist() == [[inf, inf, inf, 1.0, inf, 2.0, inf, 3.0, inf, inf]]
    full[:, [3, 5, 7]].sum().backward()  # differentiable w.r.t. the set's scores
    assert scores.grad.tolist() == [[1.0, 1.0, 1.0]]
    zeros = targets.full_vocabulary_scores("captioning", torch.ones(2, 1, 3), 8, fill=0.0)
    assert zeros.shape == (2, 1, 8) and zeros.sum() == 6 and zeros[0, 0, [3, 5, 7]].tolist() == [1, 1, 1]


def test_restricted_logits_are_the_set_columns_of_the_full_logits(model):
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    vocab_size = len(model.text_encoder.tokenizer)
    with torch.no_grad():
        full = vocabulary_logits(model, "captioning", hidden)
        ids = torch.tensor([2, 40, 41, 77, 150, 299])
        model.targets.set_vocabulary_ids("captioning", ids.tolist(), vocab_size)
        restricted = vocabulary_logits(model, "captioning", hidden)
        mlm = vocabulary_logits(model, "mlm", hidden)  # the other task keeps the full vocabulary
    assert full.shape == (5, vocab_size) and restricted.shape == (5, 6) and mlm.shape == (5, vocab_size)
    torch.testing.assert_close(restricted, full[:, ids], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- captioning
def test_captioning_loss_is_cross_entropy_over_the_set(model):
    task, inputs = model.tasks["captioning"], captioning_batch()
    vocab_size = len(model.text_encoder.tokenizer)
    with torch.no_grad():
        full_logits, targets = task.teacher_forced_logits(model, inputs, CAPTIONS)
        full_loss = task.losses(model, inputs)["loss_captioning"]
    words = sorted({int(t) for t in targets.flatten() if t >= 0})
    left_out = words[1::3]  # a third of the caption tokens is not in the set: those words are not scored
    ids = sorted(set(words) - set(left_out) | {7, 8, 100})
    model.targets.set_vocabulary_ids("captioning", ids, vocab_size)

    position = {token: i for i, token in enumerate(ids)}
    scored = [(b, t) for b in range(targets.shape[0]) for t in range(targets.shape[1])
              if int(targets[b, t]) in position]
    assert 0 < len(scored) < int((targets >= 0).sum())
    log_probs = full_logits[:, :, ids].double().log_softmax(-1)
    expected = -sum(float(log_probs[b, t, position[int(targets[b, t])]]) for b, t in scored) / len(scored)
    torch.testing.assert_close(full_loss, F.cross_entropy(full_logits.flatten(0, 1), targets.flatten()))
    with torch.no_grad():
        assert task.losses(model, inputs)["loss_captioning"].item() == pytest.approx(expected, abs=1e-4)
    model.train()  # training: the set is encoded with gradient (checkpointed chunks)
    loss = task.losses(model, inputs)["loss_captioning"]
    assert loss.item() == pytest.approx(expected, abs=1e-4) and loss.item() < full_loss.item()
    loss.backward()
    assert model.decoder.spe_token.grad is not None and bool(torch.isfinite(model.decoder.spe_token.grad).all())


def test_decoding_emits_only_tokens_of_the_set(model):
    task, inputs = model.tasks["captioning"], captioning_batch()
    bos, eos = model.text_encoder.bos_token_id, model.text_encoder.eos_token_id
    vocab_size = len(model.text_encoder.tokenizer)

    def decode():
        step_fn, state = task.decoding_start(model, inputs)
        return beam_search(step_fn, state, len(inputs), task.beam_size, task.max_length, bos, eos,
                           task.length_penalty, vocab_size=vocab_size)

    with torch.no_grad():
        free = decode()
        step_fn, state = task.decoding_start(model, inputs)
        free_first, _ = step_fn(torch.full((2, 1), bos), state)
    used = {t for seq in free.sequences for t in seq}
    assert used, "the unrestricted decoder emits words"
    # a set without any word the unrestricted decoder chose: the captions must change
    candidates = [i for i in range(vocab_size) if i not in used and i not in special_ids(model)]
    ids = sorted(candidates[::20] + [eos])
    model.targets.set_vocabulary_ids("captioning", ids, vocab_size)
    with torch.no_grad():
        restricted = decode()
        step_fn, state = task.decoding_start(model, inputs)
        first, _ = step_fn(torch.full((2, 1), bos), state)
        captions = [out["caption"] for out in model(inputs)]
    assert all(set(seq) <= set(ids) for seq in restricted.sequences)
    outside = torch.ones(vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert bool(torch.isinf(first[:, outside]).all()) and bool(torch.isfinite(first[:, ids]).all())
    # over the set, the step's distribution is the full one renormalised
    torch.testing.assert_close(first[:, ids], free_first[:, ids].log_softmax(-1), rtol=1e-4, atol=1e-4)
    tokenizer = model.text_encoder.tokenizer
    assert captions == [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in restricted.sequences]


# ------------------------------------------------------------------------------------- MLM
def test_mlm_inference_marks_targets_outside_the_set(model):
    task, inputs = model.tasks["mlm"], mlm_batch()
    vocab_size = len(model.text_encoder.tokenizer)
    with torch.no_grad():
        free = model(inputs)
        masked, targets, attention_mask = task._masked_batch(model, inputs)
        full_logits = task._logits(model, masked, attention_mask, targets)  # (M, V)
    assert all(bool(out["mlm_target_in_vocabulary"].all()) for out in free)
    flat_targets = torch.cat([out["mlm_targets"] for out in free])
    assert torch.equal(flat_targets, targets[targets != -100])
    unique = sorted(set(flat_targets.tolist()))
    assert len(unique) >= 2
    ids = torch.tensor(sorted(set(unique[::2]) | {5, 6, 250}))  # about half of the masked tokens left out
    model.targets.set_vocabulary_ids("mlm", ids.tolist(), vocab_size)
    with torch.no_grad():
        outputs = model(inputs)

    in_set = torch.isin(flat_targets, ids)
    assert 0 < int(in_set.sum()) < flat_targets.numel()
    restricted = full_logits[:, ids].log_softmax(-1)
    position = {int(token): i for i, token in enumerate(ids)}
    expected_log_probs = torch.tensor([float(restricted[m, position[int(t)]]) if bool(in_set[m]) else -math.inf
                                       for m, t in enumerate(flat_targets)])
    got = {key: torch.cat([out[key] for out in outputs]) for key in outputs[0]}
    assert torch.equal(got["mlm_targets"], flat_targets)
    assert torch.equal(got["mlm_target_in_vocabulary"], in_set)
    torch.testing.assert_close(got["mlm_target_log_probs"], expected_log_probs, rtol=1e-4, atol=1e-4)
    assert torch.equal(got["mlm_predictions"], ids[restricted.argmax(-1)])

    evaluator = MLMEvaluator("mlm_set", distributed=False)
    evaluator.process(inputs, outputs)
    results = evaluator.evaluate()["mlm"]
    assert results["vocabulary_coverage"] == pytest.approx(100.0 * float(in_set.float().mean()))
    correct = float((got["mlm_predictions"] == flat_targets).float().mean())
    assert results["accuracy"] == pytest.approx(100.0 * correct)
    assert results["perplexity"] == pytest.approx(math.exp(-float(expected_log_probs[in_set].double().mean())),
                                                  rel=1e-4)


def test_mlm_loss_without_any_masked_token_in_the_set_is_zero(model):
    model.targets.set_vocabulary_ids("mlm", [model.text_encoder.eos_token_id], len(model.text_encoder.tokenizer))
    model.train()
    loss = model(mlm_batch())["loss_mlm"]
    assert loss.item() == 0.0
    loss.backward()  # still a graph (DDP needs every rank to take part)


def test_mlm_evaluator_coverage_and_perplexity_over_the_set():
    evaluator = MLMEvaluator("hand_made", distributed=False)
    evaluator.reset()
    inf = float("-inf")
    # text 0: 3 tokens, 2 right, token 7 outside the set; text 1: 2 tokens, 1 right, token 3 outside
    evaluator.process(
        [{"text_id": 0}, {"text_id": 1}],
        [{"mlm_predictions": torch.tensor([5, 6, 9]), "mlm_targets": torch.tensor([5, 6, 7]),
          "mlm_target_log_probs": torch.tensor([math.log(0.5), math.log(0.25), inf]),
          "mlm_target_in_vocabulary": torch.tensor([True, True, False])},
         {"mlm_predictions": torch.tensor([1, 2]), "mlm_targets": torch.tensor([1, 3]),
          "mlm_target_log_probs": torch.tensor([0.0, inf]),
          "mlm_target_in_vocabulary": torch.tensor([True, False])}])
    results = evaluator.evaluate()["mlm"]
    assert results["accuracy"] == pytest.approx(60.0)
    assert results["vocabulary_coverage"] == pytest.approx(60.0)
    # over the 3 tokens of the set: (0.5 * 0.25 * 1) ** (-1 / 3) = 2
    assert results["perplexity"] == pytest.approx(2.0)

    # outputs without the flag (full vocabulary) count as covered; all tokens outside: no perplexity
    evaluator.reset()
    evaluator.process([{"text_id": 2}], [{"mlm_predictions": torch.tensor([4]), "mlm_targets": torch.tensor([4])}])
    evaluator.process([{"text_id": 3}], [{"mlm_predictions": torch.tensor([1]), "mlm_targets": torch.tensor([8]),
                                          "mlm_target_log_probs": torch.tensor([inf]),
                                          "mlm_target_in_vocabulary": torch.tensor([False])}])
    results = evaluator.evaluate()["mlm"]
    assert results == {"accuracy": 50.0, "vocabulary_coverage": 50.0}


# ------------------------------------------------------------------------------------- checkpoints
def test_sets_travel_with_the_weights(model, built, tmp_path):
    cfg = built[0]
    vocab_size = len(model.text_encoder.tokenizer)
    model.targets.set_vocabulary_ids("captioning", [2, 30, 31, 90], vocab_size)
    model.targets.set_vocabulary_ids("mlm", [10, 11, 12, 13, 14, 200], vocab_size)
    state = model.state_dict()
    assert state["targets.captioning_vocabulary"].tolist() == [2, 30, 31, 90]
    assert state["targets.mlm_vocabulary"].tolist() == [10, 11, 12, 13, 14, 200]
    path = tmp_path / "model.pth"
    torch.save({"model": state}, path)

    torch.manual_seed(1)
    fresh = build_model(cfg).eval()
    assert fresh.targets.captioning_vocabulary.numel() == 0 and fresh.targets.mlm_vocabulary.numel() == 0
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert vocabulary_logits(fresh, "captioning", hidden).shape == (3, vocab_size)  # cached: full vocabulary
    AtomicCheckpointer(fresh).load(str(path))
    assert fresh.targets.vocabulary_ids("captioning").tolist() == [2, 30, 31, 90]
    assert fresh.targets.vocabulary_ids("mlm").tolist() == [10, 11, 12, 13, 14, 200]
    with torch.no_grad():
        restored, original = vocabulary_logits(fresh, "captioning", hidden), vocabulary_logits(model, "captioning", hidden)
    assert restored.shape == (3, 4)
    torch.testing.assert_close(restored, original)

    # Detectron2's own checkpointer skips the (differently sized) buffers: the resize is what restores them
    plain = build_model(cfg)
    DetectionCheckpointer(plain).load(str(path))
    assert plain.targets.vocabulary_ids("captioning") is None

    # a full-vocabulary checkpoint clears a model's sets
    full_path = tmp_path / "full.pth"
    torch.save({"model": plain.state_dict()}, full_path)
    AtomicCheckpointer(fresh).load(str(full_path))
    assert fresh.targets.vocabulary_ids("captioning") is None and fresh.targets.vocabulary_ids("mlm") is None


# ------------------------------------------------------------------------------------- the trainer's sets
@pytest.fixture(scope="module")
def shapes_datasets(tmp_path_factory):
    from up2.data.datasets import register_all_shapes
    from up2.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("vocabulary_shapes") / "shapes"
    generate_shapes(str(root), seed=0, num_train=6, num_val=2, image_size=32, vocab_size=300, workers=1)
    register_all_shapes(str(root), prefix="tvshapes")
    return "tvshapes"


def test_training_vocabularies_are_the_tokens_of_the_training_texts(model, built, shapes_datasets):
    cfg = built[0].clone()
    prefix = shapes_datasets
    cfg.DATASETS.UP2.TASKS = [
        {"NAME": "captioning", "TYPE": "captioning", "TRAIN_DATASETS": [f"{prefix}_caption_train"]},
        {"NAME": "mlm", "TYPE": "mlm", "TRAIN_DATASETS": [f"{prefix}_text_train"]},
        {"NAME": "retrieval", "TYPE": "retrieval", "TRAIN_DATASETS": [f"{prefix}_caption_val"]},
    ]
    set_training_vocabularies(cfg, model)  # "full" (the default): nothing changes
    assert model.targets.vocabulary_ids("captioning") is None and model.targets.vocabulary_ids("mlm") is None
    cfg.MODEL.UP2.HEAD.TARGET_VOCABULARY = "training_texts"
    set_training_vocabularies(cfg, model)

    # references: what the tasks' losses see, token by token
    encoder, specials = model.text_encoder, special_ids(model)
    caption_targets = set()
    for record in DatasetCatalog.get(f"{prefix}_caption_train"):
        batch = encoder.tokenize(record["captions"])
        words = batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1]  # the captioning targets
        caption_targets.update(words.tolist())
    mlm_targets = {encoder.eos_token_id}
    for record in DatasetCatalog.get(f"{prefix}_text_train"):
        batch = encoder.tokenize([record["text"]])
        mlm_targets.update(t for t in batch["input_ids"][0].tolist() if t not in specials)
    assert encoder.eos_token_id in caption_targets and not caption_targets & (specials - {encoder.eos_token_id})
    assert model.targets.vocabulary_ids("captioning").tolist() == sorted(caption_targets)
    assert model.targets.vocabulary_ids("mlm").tolist() == sorted(mlm_targets)
    assert len(caption_targets) < len(encoder.tokenizer) and caption_targets != mlm_targets
    # every masked-token target of the corpus can be scored
    assert set(model.targets.token_indices("mlm", torch.tensor(sorted(mlm_targets))).tolist()) == set(
        range(len(mlm_targets)))

    # a config without an MLM task leaves the MLM targets alone
    for name in model.targets.variable_size_buffers:
        setattr(model.targets, name, torch.zeros(0, dtype=torch.long))
    cfg.DATASETS.UP2.TASKS = cfg.DATASETS.UP2.TASKS[:1]
    set_training_vocabularies(cfg, model)
    assert model.targets.vocabulary_ids("mlm") is None
    assert model.targets.vocabulary_ids("captioning").tolist() == sorted(caption_targets)


TWO_RANK_VOCABULARY = textwrap.dedent("""
    import json, os, sys
    import up2
    from detectron2.utils import comm
    from up2.engine import launch
    from up2.engine.target_vocabulary import _from_main_process

    def worker(out_dir):
        rank = comm.get_rank()
        calls = []

        def compute():  # what each rank would read from its datasets
            calls.append(rank)
            return [3, 1, 2] if rank == 0 else [9]

        ids = _from_main_process(compute)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"ids": ids, "computed": bool(calls)}, f)

    if __name__ == "__main__":
        launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
""")


@pytest.mark.slow  # two spawned processes importing torch + Detectron2
def test_main_process_reads_the_texts_and_every_rank_gets_its_sets(run_two_ranks):
    rank0, rank1 = run_two_ranks(TWO_RANK_VOCABULARY)
    assert rank0 == {"ids": [3, 1, 2], "computed": True}
    assert rank1 == {"ids": [3, 1, 2], "computed": False}
