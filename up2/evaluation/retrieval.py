"""Image-text retrieval evaluation: Recall@K in both directions (image→text, text→image).

Ranking convention (documented, used everywhere in up2): ties are broken **pessimistically**. A
correct item whose score equals a wrong item's score is ranked after it, so a model that gives every
candidate the same score gets the worst possible recall (not a lucky or order-dependent one) and the
result never depends on the order of the images or texts.
"""
import itertools
import logging
from collections import OrderedDict
from typing import Dict, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from up2.evaluation.no_predictions import nan_results

__all__ = ["retrieval_recall", "RetrievalEvaluator"]

logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


def retrieval_recall(similarity: ArrayLike, text_to_image: ArrayLike, ks: Sequence[int] = (1, 5, 10),
                     chunk_size: int = 256) -> Dict[str, float]:
    """Recall@K of image→text and text→image retrieval, in percent.

    * image→text: an image is a hit at K when ANY of its texts is among its K best-scored texts;
      images that have no text are left out of the i2t average (they cannot be retrieved correctly).
    * text→image: a text is a hit at K when its image is among its K best-scored images.

    The rank of a correct item counts every wrong item whose score is ``>=`` its own (pessimistic
    ties, see the module doc). For image→text, the image's best-scored text is the one that counts.

    Args:
        similarity: (num_images, num_texts) scores, higher is more similar.
        text_to_image: (num_texts,) integer, ``text_to_image[j]`` is the row (image) of text j.
        ks: the K values.
        chunk_size: image rows processed at a time (bounds the memory to ``chunk_size × num_texts``).

    Returns:
        ``{"i2t_R@K": ..., "t2i_R@K": ..., "mean_R": mean of all the recalls}`` (i2t keys first, in
        the order of ``ks``).
    """
    sim = torch.as_tensor(similarity)
    if not sim.is_floating_point():
        sim = sim.double()
    t2i = torch.as_tensor(text_to_image, dtype=torch.long).reshape(-1)
    if sim.dim() != 2 or sim.shape[1] != t2i.numel():
        raise ValueError(f"similarity must be (num_images, num_texts) with num_texts = len(text_to_image) = "
                         f"{t2i.numel()}; got shape {tuple(sim.shape)}")
    num_images, num_texts = sim.shape
    if num_texts and (int(t2i.min()) < 0 or int(t2i.max()) >= num_images):
        raise ValueError(f"text_to_image values must be in [0, {num_images}); got range "
                         f"[{int(t2i.min())}, {int(t2i.max())}]")
    if num_texts == 0 or num_images == 0:
        logger.warning("retrieval_recall: no images or no texts; every recall is NaN")

    # t2i: number of wrong images scoring >= the true image, per text.
    true_scores = sim[t2i, torch.arange(num_texts)] if num_texts else sim.new_zeros(0)
    t2i_rank = torch.zeros(num_texts, dtype=torch.long)
    # i2t: number of wrong texts scoring >= the image's best correct text, per image.
    i2t_rank = torch.zeros(num_images, dtype=torch.long)
    has_text = torch.bincount(t2i, minlength=num_images)[:num_images] > 0
    for start in range(0, num_images, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, num_images))
        block = sim[rows]  # (R, T)
        positive = t2i[None, :] == rows[:, None]  # (R, T)
        t2i_rank += ((block >= true_scores[None, :]) & ~positive).sum(0)
        best = torch.where(positive, block, torch.full_like(block, -float("inf"))).amax(1) if num_texts \
            else block.new_zeros(len(rows))
        i2t_rank[rows] = ((block >= best[:, None]) & ~positive).sum(1)
    i2t_rank = i2t_rank[has_text]
    if num_images and not bool(has_text.all()):
        logger.warning("retrieval_recall: %d of %d images have no text and are left out of i2t recall",
                       int((~has_text).sum()), num_images)

    def recall(ranks: torch.Tensor, k: int) -> float:
        return float((ranks < k).double().mean() * 100) if ranks.numel() else float("nan")

    results = OrderedDict()
    for k in ks:
        results[f"i2t_R@{k}"] = recall(i2t_rank, k)
    for k in ks:
        results[f"t2i_R@{k}"] = recall(t2i_rank, k)
    results["mean_R"] = float(np.mean(list(results.values()))) if results else 0.0
    return results


class RetrievalEvaluator(DatasetEvaluator):
    """Gathers image and caption embeddings across ranks and reports Recall@K (``retrieval_recall``).

    Inputs are COCO-captions style dicts (``image_id``, ``captions``); each output has
    ``"image_embedding"`` (D,) and ``"text_embeddings"`` (K, D) with K = ``len(captions)``, in the
    caption order. Embeddings are L2-normalised here, so the score is the cosine similarity.
    Returns ``{"retrieval": {"i2t_R@1", ..., "t2i_R@10", "mean_R"}}`` on the main process.
    """

    def __init__(self, dataset_name: str = "", distributed: bool = True, ks: Sequence[int] = (1, 5, 10)):
        """
        Args:
            dataset_name: used in log messages.
            distributed: gather the embeddings of every rank and evaluate on the main process.
            ks: the K values of Recall@K.
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._ks = tuple(ks)
        self.reset()

    def reset(self):
        self._items = []  # [(image_id, image_embedding (D,), text_embeddings (K, D))]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            image_emb = out["image_embedding"].detach().float().cpu().reshape(-1)
            text_embs = out["text_embeddings"].detach().float().cpu()
            if text_embs.dim() == 1:
                text_embs = text_embs[None]
            if "captions" in inp and len(inp["captions"]) != text_embs.shape[0]:
                raise ValueError(f"Image {inp.get('image_id')} of '{self._dataset_name}' has "
                                 f"{len(inp['captions'])} captions but {text_embs.shape[0]} text embeddings")
            if text_embs.shape[0] and text_embs.shape[1] != image_emb.numel():
                raise ValueError(f"image_embedding has dim {image_emb.numel()} but text_embeddings have "
                                 f"dim {text_embs.shape[1]} (image {inp.get('image_id')})")
            self._items.append((inp.get("image_id"), image_emb, text_embs))

    def evaluate(self):
        items = self._items
        if self._distributed:
            comm.synchronize()
            items = list(itertools.chain(*comm.gather(items, dst=0)))
            if not comm.is_main_process():
                return {}
        if not items:
            keys = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in self._ks] + ["mean_R"]
            return OrderedDict(retrieval=nan_results("RetrievalEvaluator", self._dataset_name, keys))
        images = F.normalize(torch.stack([image for _, image, _ in items]), dim=-1)  # (I, D)
        texts = F.normalize(torch.cat([text for _, _, text in items]), dim=-1)  # (T, D)
        text_to_image = torch.cat([torch.full((text.shape[0],), i, dtype=torch.long)
                                   for i, (_, _, text) in enumerate(items)])
        results = retrieval_recall(images @ texts.T, text_to_image, self._ks)
        logger.info("Retrieval on '%s' (%d images, %d texts): %s", self._dataset_name, len(items),
                    texts.shape[0], dict(results))
        return OrderedDict(retrieval=results)
