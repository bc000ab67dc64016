"""Image captioning evaluation with the COCO caption scorers of ``pycocoevalcap``.

Tokenisation: pycocoevalcap's Stanford PTB tokenizer (Java) when ``java`` is on the PATH, otherwise
(or if it fails) :func:`simple_ptb_tokenize`, a pure-Python approximation of it: lower-case; split
off punctuation, possessives and ``n't``-style contractions; brackets become ``-lrb-``/``-rrb-``
tokens (as the Java tokenizer run with ``-lowerCase`` outputs them); then drop the tokens of
pycocoevalcap's punctuation list. Both give the same tokens on ordinary captions; rare constructs
(``#tag``, ``?!``) may differ, so scores are comparable only with the same tokenizer.

Scores: BLEU-1..4, ROUGE-L and CIDEr(-D) are pure Python. METEOR runs a Java subprocess (about 8 s
to start: it loads its paraphrase table); without Java, or if that subprocess fails or exceeds
``meteor_timeout``, METEOR is skipped with a warning instead of failing the evaluation. SPICE is off
by default (it downloads Stanford CoreNLP models on first use and needs ~8 GB of Java heap). CIDEr's
document frequencies come from the evaluated references, so it needs many images to be meaningful
(with one image it is 0 by construction).
"""
import itertools
import json
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from up2.evaluation.no_predictions import nan_results

__all__ = ["caption_scores", "tokenize_captions", "simple_ptb_tokenize", "java_available", "CaptionEvaluator",
           "CAPTION_METRICS"]

logger = logging.getLogger(__name__)

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN_RE = re.compile(r"""
    [^\W\d_](?:\.[^\W\d_])+\.?          # abbreviations: u.s.a., u.s.a
  | \d+(?:[.,:/]\d+)*(?![^\W_])        # numbers: 3.5, 1,000, 10:30 (not the 2 of 2nd)
  | [^\W_]+(?:[-'/&][^\W_]+)*           # words, incl. inner hyphens and apostrophes: t-shirt, o'clock
  | \.\.\.|--                           # ellipsis, double dash
  | \S                                  # any other symbol on its own
""", re.VERBOSE)
_CONTRACTION_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PUNCTUATIONS = frozenset(PUNCTUATIONS)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (PTB tokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


def simple_ptb_tokenize(caption: str) -> str:
    """Pure-Python approximation of pycocoevalcap's PTB tokenisation (see the module doc).

    Args:
        caption: raw caption.

    Returns:
        the space-joined lower-case tokens, punctuation removed.
    """
    tokens = []
    for token in _TOKEN_RE.findall(caption.lower().translate(_QUOTES)):
        match = _CONTRACTION_RE.match(token)
        parts = match.groups() if match and not token.startswith("'") else (token,)
        for part in parts:
            part = _BRACKETS.get(part, part)
            if part == '"':
                continue  # PTB turns double quotes into `` / '' which are in the punctuation list
            if part not in _PUNCTUATIONS:
                tokens.append(part)
    return " ".join(tokens)


def tokenize_captions(captions: Mapping, use_java: Optional[bool] = None) -> Dict[object, List[str]]:
    """Tokenises ``{key: [caption, ...]}`` for the scorers.

    Args:
        captions: ``{key: [str, ...]}``.
        use_java: PTB tokenizer (Java) or :func:`simple_ptb_tokenize`; None = Java when available.
            A failing Java tokenizer falls back to the Python one with a warning.

    Returns:
        ``{key: [tokenised str, ...]}`` with the same keys and list lengths.
    """
    # Any line or paragraph separator would break the one-caption-per-line protocol of the tokenizer.
    cleaned = {key: [" ".join(str(c).split()) for c in caps] for key, caps in captions.items()}
    if use_java is None:
        use_java = java_available()
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            out = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in cleaned.items()})
            # Empty lists never reach the tokenizer's output.
            out.update({k: [] for k, caps in cleaned.items() if not caps})
            if all(len(out.get(k, ())) == len(caps) for k, caps in cleaned.items()):
                return {k: out[k] for k in cleaned}
            logger.warning("PTB tokenizer returned a different number of captions; using the Python tokenizer")
        except Exception as e:  # noqa: BLE001 (any failure of the Java subprocess)
            logger.warning("PTB tokenizer (Java) failed (%s: %s); using the Python tokenizer", type(e).__name__, e)
    return {k: [simple_ptb_tokenize(c) for c in caps] for k, caps in cleaned.items()}


def _close_java_scorer(scorer):
    """Stops a pycocoevalcap Java scorer process (METEOR) without risking a deadlock in its ``__del__``."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None:
        for action in (proc.stdin.close, proc.kill):
            try:
                action()
            except Exception:  # noqa: BLE001
                pass
        try:
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass
    scorer.lock = threading.Lock()  # a failed compute_score leaves its lock held


def _meteor(gts, res, timeout: float) -> Optional[float]:
    """pycocoevalcap's METEOR in a watched thread; None (with a warning) on any failure."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except Exception as e:  # noqa: BLE001
        logger.warning("METEOR skipped: cannot start its Java process (%s: %s)", type(e).__name__, e)
        return None
    result = {}

    def work():
        try:
            result["score"] = float(scorer.compute_score(gts, res)[0])
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=work, name="meteor", daemon=True)
    thread.start()
    thread.join(timeout)
    timed_out = thread.is_alive()
    _close_java_scorer(scorer)
    thread.join(10)
    if timed_out:
        logger.warning("METEOR skipped: its Java process did not answer within %.0f s", timeout)
        return None
    if "error" in result:
        e = result["error"]
        logger.warning("METEOR skipped: its Java process failed (%s: %s)", type(e).__name__, e)
        return None
    return result["score"]


def _spice(gts, res) -> Optional[float]:
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(gts, res)[0])
    except Exception as e:  # noqa: BLE001
        logger.warning("SPICE skipped: %s: %s", type(e).__name__, e)
        return None


def caption_scores(predictions: Mapping, references: Mapping, *, use_java: Optional[bool] = None,
                   use_spice: bool = False, meteor_timeout: float = 600.0) -> Dict[str, float]:
    """COCO caption metrics of one predicted caption per image, in percent (×100).

    Args:
        predictions: ``{image_id: caption}``; every id must be in ``references``.
        references: ``{image_id: [caption, ...]}`` (at least one each); ids without a prediction
            are ignored.
        use_java: PTB tokenizer and METEOR through Java; None = when ``java`` is available. Without
            Java, METEOR is skipped with a warning.
        use_spice: also compute SPICE (downloads models on first use; skipped with a warning on
            failure).
        meteor_timeout: seconds allowed to METEOR's Java process.

    Returns:
        ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"(, "SPICE")}``; METEOR
        (SPICE) missing when skipped; every metric NaN (with a warning) when there are no predictions.
    """
    missing = [k for k in predictions if k not in references]
    if missing:
        raise KeyError(f"{len(missing)} predicted image ids have no reference captions, e.g. {missing[:5]}")
    empty = [k for k in predictions if len(references[k]) == 0]
    if empty:
        raise ValueError(f"{len(empty)} images have an empty reference list, e.g. {empty[:5]}")
    if not predictions:
        return nan_results("caption_scores", None,
                           CAPTION_METRICS + (("SPICE",) if use_spice else ()))
    if use_java is None:
        use_java = java_available()
    ids = list(predictions)
    tokens = tokenize_captions({**{("res", k): [predictions[k]] for k in ids},
                                **{("gts", k): list(references[k]) for k in ids}}, use_java=use_java)
    res = {i: tokens[("res", k)] for i, k in enumerate(ids)}
    gts = {i: tokens[("gts", k)] for i, k in enumerate(ids)}

    results = OrderedDict()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        results[f"BLEU-{n}"] = float(value) * 100
    if use_java:
        meteor = _meteor(gts, res, meteor_timeout)
        if meteor is not None:
            results["METEOR"] = meteor * 100
    else:
        logger.warning("METEOR skipped: it needs Java (`java` is not on the PATH)")
    results["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0]) * 100
    results["CIDEr"] = float(Cider().compute_score(gts, res)[0]) * 100
    if use_spice:
        spice = _spice(gts, res)
        if spice is not None:
            results["SPICE"] = spice * 100
    return results


class CaptionEvaluator(DatasetEvaluator):
    """Scores ``{"caption": str}`` outputs against the dataset's reference captions.

    References come from ``DatasetCatalog.get(dataset_name)`` (dicts with ``image_id`` and
    ``captions``), like COCOEvaluator reads its json. Images without a prediction are left out (with
    a warning). Writes ``caption_predictions.json`` (COCO result format) to ``output_dir`` when given.
    Returns ``{"captioning": caption_scores(...)}`` on the main process, ``{}`` elsewhere.
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None, *,
                 use_java: Optional[bool] = None, use_spice: bool = False, meteor_timeout: float = 600.0):
        """
        Args:
            dataset_name: registered caption dataset.
            distributed: gather the captions of every rank and evaluate on the main process.
            output_dir: where to write the predictions, or None.
            use_java, use_spice, meteor_timeout: see :func:`caption_scores`.
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._score_kwargs = dict(use_java=use_java, use_spice=use_spice, meteor_timeout=meteor_timeout)
        self.reset()

    def reset(self):
        self._predictions = []  # [(image_id, caption)]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._predictions.append((inp["image_id"], str(out["caption"])))

    def _references(self, image_ids: Sequence) -> Dict[object, List[str]]:
        refs = {d["image_id"]: list(d["captions"]) for d in DatasetCatalog.get(self._dataset_name)}
        if len(refs) > len(image_ids):
            logger.warning("CaptionEvaluator: %d of %d images of '%s' have no prediction and are left out",
                           len(refs) - len(image_ids), len(refs), self._dataset_name)
        return refs

    def evaluate(self):
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        predictions = OrderedDict(predictions)  # one caption per image (the last one if repeated)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "caption_predictions.json"), "w") as f:
                json.dump([{"image_id": k, "caption": v} for k, v in predictions.items()], f)
        if not predictions:
            metrics = CAPTION_METRICS + (("SPICE",) if self._score_kwargs["use_spice"] else ())
            return OrderedDict(captioning=nan_results("CaptionEvaluator", self._dataset_name, metrics))
        results = caption_scores(predictions, self._references(list(predictions)), **self._score_kwargs)
        logger.info("Captioning on '%s' (%d images): %s", self._dataset_name, len(predictions), dict(results))
        return OrderedDict(captioning=results)
