"""Tests of up2.evaluation.caption: scores equal pycocoevalcap's scorers; Java and pure-Python paths."""
import io
import json
import logging
import math
import os
import threading
import uuid

import pytest
from detectron2.data import DatasetCatalog
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

import up2.evaluation.caption as caption_module
from up2.evaluation import CaptionEvaluator, caption_scores, simple_ptb_tokenize, tokenize_captions

needs_java = pytest.mark.skipif(not caption_module.java_available(), reason="needs java on the PATH")

REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "Man on a surfboard riding an ocean wave."],
    2: ["Two dogs play with a red frisbee in the park.", "Dogs running on the grass after a frisbee.",
        "A pair of dogs chasing a frisbee on a lawn."],
    3: ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate.",
        "A dinner plate holds chicken, rice and broccoli."],
    4: ["A cat sleeping on a laptop keyboard.", "The cat is lying on the keyboard of a computer.",
        "A gray cat naps on an open laptop."],
}
PREDICTIONS = {1: "A man riding a wave on a surfboard.", 2: "Two dogs playing with a frisbee.",
               3: "A plate of rice and broccoli.", 4: "A cat laying on a keyboard."}
# Captions on which Stanford's PTB tokenizer and the pure-Python one agree (checked when Java exists).
TOKENIZER_CASES = [
    "Two dogs' toys are on the floor, aren't they?",
    "A woman's hat (red) sits on a well-known t-shirt.",
    "The U.S. flag flies at 3.5 meters -- high!",
    "A cat that doesn't like \"water\"...",
    "I'm sure they'll go; we've seen it: 1,000 times",
    "An 'odd' kitchen with 2nd-floor view",
    "Man with a $5 bill, 50% off!",
]


def _direct_scores(gts, res):
    """pycocoevalcap's scorers called directly (×100)."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n}": 100 * b for n, b in enumerate(bleu, 1)}
    out["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    return out


def test_simple_tokenizer_known_answers():
    assert simple_ptb_tokenize("A man's dog (brown) doesn't run -- fast!") == \
        "a man 's dog -lrb- brown -rrb- does n't run fast"
    assert simple_ptb_tokenize("“Curly” can't, won't...") == "curly ca n't wo n't"
    assert simple_ptb_tokenize("") == ""


def test_scores_equal_pycocoevalcap_scorers_python_tokenizer(caplog):
    gts = {k: [simple_ptb_tokenize(c) for c in v] for k, v in REFERENCES.items()}
    res = {k: [simple_ptb_tokenize(PREDICTIONS[k])] for k in REFERENCES}
    with caplog.at_level(logging.WARNING):
        got = caption_scores(PREDICTIONS, REFERENCES, use_java=False)
    expected = _direct_scores(gts, res)
    assert list(got) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert 0 < got["BLEU-4"] < got["BLEU-1"] < 100
    assert "METEOR skipped" in caplog.text


def test_perfect_prediction_and_empty_prediction():
    perfect = {k: refs[0] for k, refs in REFERENCES.items()}
    r = caption_scores(perfect, REFERENCES, use_java=False)
    assert r["BLEU-4"] == pytest.approx(100, abs=1e-4)
    assert r["ROUGE-L"] == pytest.approx(100)
    empty = caption_scores({1: "", 2: "two dogs"}, REFERENCES, use_java=False)
    assert empty["ROUGE-L"] < 100 and empty["BLEU-1"] >= 0


def test_java_absent_uses_python_tokenizer(monkeypatch, caplog):
    monkeypatch.setattr(caption_module.shutil, "which", lambda name: None)

    def fail(*args, **kwargs):
        raise AssertionError("the Java tokenizer must not run without Java")

    monkeypatch.setattr("pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer.tokenize", fail)
    with caplog.at_level(logging.WARNING):
        r = caption_scores(PREDICTIONS, REFERENCES)
    assert "METEOR" not in r and "METEOR skipped" in caplog.text
    assert r == pytest.approx(caption_scores(PREDICTIONS, REFERENCES, use_java=False))


def test_failing_java_tokenizer_falls_back(monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise OSError("boom")

    monkeypatch.setattr("pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer.tokenize", fail)
    with caplog.at_level(logging.WARNING):
        out = tokenize_captions({1: ["A Dog."]}, use_java=True)
    assert out == {1: ["a dog"]} and "PTB tokenizer (Java) failed" in caplog.text


class _FakeProcess:
    """Stands for METEOR's Java process: killing it ends the pending read, as EOF would."""

    def __init__(self):
        self.killed = threading.Event()
        self.stdin = io.BytesIO()

    def kill(self):
        self.killed.set()

    def wait(self, timeout=None):
        return 0


class _HangingMeteor:
    def __init__(self):
        self.meteor_p = _FakeProcess()

    def compute_score(self, gts, res):
        if self.meteor_p.killed.wait(30):
            raise ValueError("could not convert string to float: ''")
        return 50.0, []


class _BrokenMeteor(_HangingMeteor):
    def compute_score(self, gts, res):
        raise ValueError("could not convert string to float: ''")


@pytest.mark.parametrize("scorer,message", [(_HangingMeteor, "did not answer"), (_BrokenMeteor, "failed")])
def test_meteor_failure_is_skipped(monkeypatch, caplog, scorer, message):
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", scorer)
    monkeypatch.setattr(caption_module, "tokenize_captions", lambda c, use_java=None:
                        {k: [simple_ptb_tokenize(x) for x in v] for k, v in c.items()})
    with caplog.at_level(logging.WARNING):
        r = caption_scores(PREDICTIONS, REFERENCES, use_java=True, meteor_timeout=0.5)
    assert "METEOR" not in r and "CIDEr" in r
    assert message in caplog.text


@needs_java
def test_java_and_python_tokenizers_agree():
    captions = {i: [c] for i, c in enumerate(TOKENIZER_CASES + REFERENCES[1] + [PREDICTIONS[4]])}
    assert tokenize_captions(captions, use_java=True) == tokenize_captions(captions, use_java=False)


@needs_java
@pytest.mark.slow
def test_meteor_with_java():
    r = caption_scores(PREDICTIONS, REFERENCES, use_java=True)
    assert list(r) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert 0 < r["METEOR"] < 100
    # Same value as pycocoevalcap's METEOR called directly on the same PTB-tokenised captions.
    tokens = tokenize_captions({**{("res", k): [v] for k, v in PREDICTIONS.items()},
                                **{("gts", k): v for k, v in REFERENCES.items()}}, use_java=True)
    scorer = Meteor()
    direct, _ = scorer.compute_score({k: tokens[("gts", k)] for k in REFERENCES},
                                     {k: tokens[("res", k)] for k in REFERENCES})
    assert r["METEOR"] == pytest.approx(100 * direct)


def test_unknown_image_raises():
    with pytest.raises(KeyError, match="no reference captions"):
        caption_scores({99: "a cat"}, REFERENCES, use_java=False)


def test_caption_evaluator(tmp_path):
    name = f"test_captions_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [
        {"file_name": f"{k}.jpg", "image_id": k, "captions": v, "caption_ids": list(range(len(v)))}
        for k, v in REFERENCES.items()])
    evaluator = CaptionEvaluator(name, output_dir=str(tmp_path), use_java=False)
    evaluator.reset()
    ids = list(PREDICTIONS)
    for batch in (ids[:2], ids[2:]):
        evaluator.process([{"image_id": k} for k in batch], [{"caption": PREDICTIONS[k]} for k in batch])
    results = evaluator.evaluate()
    assert list(results) == ["captioning"]
    assert results["captioning"] == pytest.approx(caption_scores(PREDICTIONS, REFERENCES, use_java=False))
    with open(os.path.join(tmp_path, "caption_predictions.json")) as f:
        assert {d["image_id"]: d["caption"] for d in json.load(f)} == PREDICTIONS


def test_caption_evaluator_without_predictions(caplog):
    evaluator = CaptionEvaluator("never_registered_caption_set")
    evaluator.reset()
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate()
    assert list(results["captioning"]) == list(caption_module.CAPTION_METRICS)
    assert all(math.isnan(v) for v in results["captioning"].values())
    assert "no predictions" in caplog.text and "NaN" in caplog.text
