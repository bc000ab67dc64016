"""UP2Predictor: weights are loaded, every task's output is at the original size, the vocabulary of a call
is respected and restored, BGR input reaches the model in INPUT.FORMAT, retrieval scores equal the
dot products of separately computed embeddings, bad arguments are named."""
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import up2.modeling  # noqa: F401
from up2.engine import UP2Predictor

VOCAB = ["cat", "dog", "person"]
TEXTS = ["a red circle above a blue square", "a green triangle", "there is one cross and it is cyan"]
H, W = 90, 120  # original size (not a multiple of anything, not square)


def small_cfg(up2_cfg_factory, tiny_text_dirs, image_format="BGR"):
    cfg = up2_cfg_factory(*tiny_text_dirs)
    cfg.INPUT.FORMAT = image_format
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 256
    cfg.DATASETS.UP2.IMAGE_SIZE = 128
    return cfg


@pytest.fixture(scope="module")
def weights(up2_cfg_factory, tiny_text_dirs, tmp_path_factory):
    """A checkpoint of a tiny random model (seed 0), as Detectron2 saves them: {"model": state_dict}."""
    torch.manual_seed(0)
    model = build_model(small_cfg(up2_cfg_factory, tiny_text_dirs))
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path), model.state_dict()


@pytest.fixture(scope="module")
def predictor(up2_cfg_factory, tiny_text_dirs, weights):
    cfg = small_cfg(up2_cfg_factory, tiny_text_dirs)
    cfg.MODEL.WEIGHTS = weights[0]
    torch.manual_seed(1)  # another initialisation: only loading makes the weights equal the checkpoint's
    return UP2Predictor(cfg)


def photo(seed=0, h=H, w=W):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def test_weights_loaded_and_eval_mode(predictor, weights):
    saved = weights[1]
    state = predictor.model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert not predictor.model.training


def test_detection_at_original_size_within_vocabulary(predictor):
    assert predictor.vocabulary("detection") is None
    inst = predictor(photo(), "detection", vocabulary=VOCAB)["instances"]
    assert inst.image_size == (H, W) and inst.pred_masks.shape[1:] == (H, W)
    assert len(inst) > 0 and int(inst.pred_classes.max()) < len(VOCAB) and int(inst.pred_classes.min()) >= 0
    boxes = inst.pred_boxes.tensor
    assert bool((boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= W).all() and (boxes[:, 1::2] <= H).all())
    assert predictor.vocabulary("detection") is None  # a call's vocabulary is restored afterwards
    with pytest.raises(ValueError, match="class names"):
        predictor(photo(), "detection")  # none set


def test_classification_scores_follow_the_vocabulary(predictor):
    predictor.set_vocabulary("classification", ["circle", "square"])
    try:
        scores = predictor(photo(), "classification")["class_scores"]
        assert scores.shape == (2,)
        scores = predictor(photo(), "classification", vocabulary=VOCAB)["class_scores"]
        assert scores.shape == (len(VOCAB),) and torch.allclose(scores.sum(), torch.tensor(1.0), atol=1e-5)
        assert predictor.vocabulary("classification") == ["circle", "square"]  # restored
    finally:
        predictor.model.tasks["classification"].class_names = None


def test_captioning_returns_a_string(predictor):
    out = predictor(photo(), "captioning")
    assert set(out) == {"caption"} and isinstance(out["caption"], str)


def test_retrieval_scores_are_dot_products_of_unit_embeddings(predictor):
    image = photo(3)
    out = predictor(image, "retrieval", texts=TEXTS)
    emb = out["image_embedding"]
    assert emb.dim() == 1 and torch.allclose(emb.norm(), torch.tensor(1.0), atol=1e-5)
    with torch.no_grad():  # independent reference: the model's text-only retrieval inputs
        text_emb = torch.stack([o["text_embedding"] for o in predictor.model(
            [{"task": "retrieval", "text": t} for t in TEXTS])])
    assert torch.allclose(out["text_scores"], text_emb @ emb, atol=1e-5)
    ranked = out["ranked_texts"]
    assert sorted(t for t, _ in ranked) == sorted(TEXTS)
    assert [s for _, s in ranked] == sorted((float(s) for s in out["text_scores"]), reverse=True)
    assert torch.allclose(predictor(image, "retrieval")["image_embedding"], emb, atol=1e-6)


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_bgr_input_reaches_the_model_in_input_format(up2_cfg_factory, tiny_text_dirs, predictor, image_format,
                                                     monkeypatch):
    if image_format != predictor.input_format:
        predictor = UP2Predictor(small_cfg(up2_cfg_factory, tiny_text_dirs, image_format))
    seen = []
    forward = predictor.model.forward

    def spy(batched_inputs):
        seen.append(batched_inputs[0])
        return forward(batched_inputs)

    monkeypatch.setattr(predictor.model, "forward", spy)
    bgr = np.empty((H, W, 3), dtype=np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 100, 200  # B, G, R
    first = 200 if image_format == "RGB" else 10
    predictor(bgr, "detection", vocabulary=VOCAB)
    predictor(bgr, "captioning")
    det, cap = seen
    assert det["image"].dtype == torch.uint8 and (det["height"], det["width"]) == (H, W)
    assert min(det["image"].shape[1:]) == 128  # ResizeShortestEdge(INPUT.MIN_SIZE_TEST)
    assert tuple(cap["image"].shape) == (3, 128, 128)  # DATASETS.UP2.IMAGE_SIZE square
    for x in (det, cap):
        assert x["image"][0].eq(first).all() and x["image"][1].eq(100).all()
        assert x["image"][2].eq(210 - first).all()


def test_bad_arguments_are_named(predictor):
    with pytest.raises(ValueError, match="unknown task 'mlm'"):
        predictor(photo(), "mlm")
    with pytest.raises(ValueError, match="takes no vocabulary"):
        predictor(photo(), "captioning", vocabulary=VOCAB)
    with pytest.raises(ValueError, match="'retrieval' task"):
        predictor(photo(), "detection", texts=TEXTS)
    with pytest.raises(ValueError, match="non-empty list"):
        predictor(photo(), "retrieval", texts=[])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) BGR"):
        predictor(photo()[..., 0], "captioning")
    with pytest.raises(ValueError, match="uint8"):
        predictor(photo().astype(np.float32), "captioning")
    with pytest.raises(ValueError, match="empty"):
        predictor(photo(), "detection", vocabulary=[])
    assert predictor.vocabulary("detection") is None
