"""Tests of up2.evaluation.retrieval: Recall@K against a brute-force ranking reference."""
import logging
import math

import numpy as np
import pytest
import torch

from up2.evaluation import RetrievalEvaluator, retrieval_recall


def _pessimistic_rank(scores, correct, index):
    """Position (0-based) of candidate ``index`` in a list sorted by decreasing score, where every
    wrong candidate with an equal score is placed before it and correct ones with an equal score
    after it (explicit loop, the reference)."""
    position = 0
    for other in range(len(scores)):
        if other == index:
            continue
        if scores[other] > scores[index] or (scores[other] == scores[index] and not correct[other]):
            position += 1
    return position


def _reference_recall(sim, text_to_image, ks):
    num_images, num_texts = sim.shape
    i2t = {k: [] for k in ks}
    for i in range(num_images):
        correct = [text_to_image[j] == i for j in range(num_texts)]
        if not any(correct):
            continue
        # Sort texts by (score desc, wrong before correct) and find the first correct one.
        order = sorted(range(num_texts), key=lambda j: (-sim[i, j], correct[j]))
        first = next(pos for pos, j in enumerate(order) if correct[j])
        for k in ks:
            i2t[k].append(first < k)
    t2i = {k: [] for k in ks}
    for j in range(num_texts):
        correct = [i == text_to_image[j] for i in range(num_images)]
        rank = _pessimistic_rank(sim[:, j], correct, text_to_image[j])
        for k in ks:
            t2i[k].append(rank < k)
    out = {f"i2t_R@{k}": 100 * np.mean(i2t[k]) for k in ks}
    out.update({f"t2i_R@{k}": 100 * np.mean(t2i[k]) for k in ks})
    out["mean_R"] = np.mean(list(out.values()))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(3, 15))
    texts_per_image = rng.integers(0 if seed % 2 else 1, 4, size=num_images)
    text_to_image = np.repeat(np.arange(num_images), texts_per_image)
    rng.shuffle(text_to_image)
    # Few distinct values -> many ties.
    sim = rng.integers(0, 4, size=(num_images, len(text_to_image))).astype(np.float32)
    ks = (1, 2, 5)
    got = retrieval_recall(torch.from_numpy(sim), torch.from_numpy(text_to_image), ks=ks, chunk_size=4)
    expected = _reference_recall(sim, text_to_image, ks)
    assert list(got) == list(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key
    # Numpy input and any chunking give the same answer.
    assert retrieval_recall(sim, text_to_image, ks=ks) == pytest.approx(got)


def test_hand_built_case():
    # 3 images; texts 0,1 -> image 0; text 2 -> image 1; text 3 -> image 2.
    text_to_image = [0, 0, 1, 2]
    sim = torch.tensor([
        [0.1, 0.9, 0.5, 0.2],   # image 0: best text is 1 (correct) -> rank 0
        [0.8, 0.1, 0.3, 0.7],   # image 1: its text 2 is third -> rank 2
        [0.5, 0.5, 0.5, 0.5],   # image 2: all tied -> text 3 ranked after the 3 wrong ones -> rank 3
    ])
    r = retrieval_recall(sim, text_to_image, ks=(1, 3, 4))
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@3"] == pytest.approx(200 / 3)
    assert r["i2t_R@4"] == pytest.approx(100)
    # t2i: text0 col [.1,.8,.5] true image 0 -> rank 2; text1 [.9,.1,.5] -> 0; text2 [.5,.3,.5] -> image 1 rank 2;
    # text3 [.2,.7,.5] -> image 2 rank 1.
    assert r["t2i_R@1"] == pytest.approx(25)
    assert r["t2i_R@3"] == pytest.approx(100)
    assert r["mean_R"] == pytest.approx((100 / 3 + 200 / 3 + 100 + 25 + 100 + 100) / 6)


def test_constant_scores_give_worst_recall():
    r = retrieval_recall(torch.zeros(5, 5), list(range(5)), ks=(1, 5))
    assert r["i2t_R@1"] == 0 and r["t2i_R@1"] == 0
    assert r["i2t_R@5"] == 100 and r["t2i_R@5"] == 100


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="num_texts"):
        retrieval_recall(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="text_to_image values"):
        retrieval_recall(torch.zeros(2, 2), [0, 2])


def test_evaluator_normalises_and_matches_function():
    torch.manual_seed(0)
    evaluator = RetrievalEvaluator("unregistered_retrieval_set")
    evaluator.reset()
    images, texts, owners = [], [], []
    for batch in range(2):
        inputs, outputs = [], []
        for b in range(3):
            image_id = batch * 3 + b
            k = 1 + image_id % 3
            image = torch.randn(8) * (image_id + 1)  # different norms: normalisation must matter
            text = image[None] / (image_id + 1) + 0.8 * torch.randn(k, 8)
            inputs.append({"image_id": image_id, "captions": ["c"] * k, "caption_ids": list(range(k))})
            outputs.append({"image_embedding": image, "text_embeddings": text})
            images.append(image / image.norm())
            texts.extend(t / t.norm() for t in text)
            owners.extend([len(images) - 1] * k)
        evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    expected = retrieval_recall(torch.stack(images) @ torch.stack(texts).T, owners)
    assert list(results) == ["retrieval"]
    assert results["retrieval"] == pytest.approx(expected)


def test_evaluator_rejects_caption_count_mismatch():
    evaluator = RetrievalEvaluator("x")
    with pytest.raises(ValueError, match="2 captions but 3"):
        evaluator.process([{"image_id": 1, "captions": ["a", "b"]}],
                          [{"image_embedding": torch.zeros(4), "text_embeddings": torch.zeros(3, 4)}])


def test_evaluator_without_predictions_reports_nan(caplog):
    evaluator = RetrievalEvaluator("empty_retrieval_set")
    evaluator.reset()
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate()["retrieval"]
    assert list(results) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R"]
    assert all(math.isnan(v) for v in results.values())
    assert "no predictions" in caplog.text and "'empty_retrieval_set'" in caplog.text
