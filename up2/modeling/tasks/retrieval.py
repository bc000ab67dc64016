"""Image-text retrieval in the unified formulation: the image ``<SPE>`` output against the caption
``<SPE>`` outputs, symmetric contrastive loss with label smoothing. Negatives are the captions (images)
of the whole global batch, gathered from every rank with a differentiable all-gather (paper §4.4;
``MODEL.UP2.RETRIEVAL.GATHER_NEGATIVES`` off = local negatives only, Table 4)."""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from up2.modeling.build import TASK_REGISTRY
from up2.modeling.decoder.unified_decoder import text_segment
from up2.modeling.distributed import all_gather_with_grad, gather_sizes, world_info
from up2.modeling.moe import SIDE_TARGET
from up2.modeling.tasks.base import TaskHead
from up2.modeling.tasks.classification import encode_image_spe

__all__ = ["RetrievalTask", "contrastive_loss", "encode_text_spe"]


def encode_text_spe(model, task: str, texts: Sequence[str]) -> torch.Tensor:
    """(N, d) decoder ``<SPE>`` outputs of texts (target side)."""
    text = model.text_encoder(list(texts))
    return model.decoder(task, [text_segment(text["features"], text["attention_mask"], SIDE_TARGET)]).hidden[:, 0]


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, gather: bool,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE of B local pairs against the gathered batch.

    Args:
        image_emb, text_emb: (B, d) unit vectors; pair i = (image i, text i).
        scale: 1 / tau.
        gather: use the pairs of every rank as negatives.

    Returns:
        0-dim loss: mean over local rows of (CE(image -> all texts) + CE(text -> all images)) / 2. Averaged
        over ranks (as DDP does with gradients) it equals the loss of one process on the whole batch.
    """
    offset = 0
    all_images, all_texts = image_emb, text_emb
    world, rank = world_info()
    if gather and world > 1:
        sizes = gather_sizes(image_emb.shape[0], image_emb.device)  # one exchange serves both gathers
        all_images, all_texts = all_gather_with_grad(image_emb, sizes), all_gather_with_grad(text_emb, sizes)
        offset = sum(sizes[:rank])
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    dtype = torch.promote_types(image_emb.dtype, torch.float32)  # at least fp32 logits
    i2t = scale * image_emb.to(dtype) @ all_texts.to(dtype).T
    t2i = scale * text_emb.to(dtype) @ all_images.to(dtype).T
    return 0.5 * (F.cross_entropy(i2t, labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(t2i, labels, label_smoothing=label_smoothing))


@TASK_REGISTRY.register()
class RetrievalTask(TaskHead):
    """
    Args:
        gather_negatives: negatives from every rank.
        label_smoothing: of both cross-entropies (0.1).
    """

    task_type = "retrieval"

    @configurable
    def __init__(self, *, gather_negatives: bool = True, label_smoothing: float = 0.1):
        super().__init__()
        self.gather_negatives, self.label_smoothing = gather_negatives, label_smoothing

    @classmethod
    def from_config(cls, cfg):
        return {"gather_negatives": cfg.MODEL.UP2.RETRIEVAL.GATHER_NEGATIVES,
                "label_smoothing": cfg.MODEL.UP2.HEAD.LABEL_SMOOTHING}

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        captions = [x["caption"] for x in batched_inputs]
        image_emb = model.head.embed(encode_image_spe(model, self.task_type, batched_inputs))
        text_emb = model.head.embed(encode_text_spe(model, self.task_type, captions))
        loss = contrastive_loss(image_emb, text_emb, model.head.scale(self.task_type), self.gather_negatives,
                                self.label_smoothing)
        return {"loss_retrieval": loss}

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        """Embeddings (unit vectors, (d,)): ``image_embedding`` for inputs with an image,
        ``text_embeddings`` (K, d) for their ``captions``, ``text_embedding`` for text-only inputs."""
        outputs = [{} for _ in batched_inputs]
        with_image = [i for i, x in enumerate(batched_inputs) if "image" in x]
        if with_image:
            emb = model.head.embed(encode_image_spe(model, self.task_type, [batched_inputs[i] for i in with_image]))
            for i, e in zip(with_image, emb):
                outputs[i]["image_embedding"] = e
        texts, owners = [], []
        for i, x in enumerate(batched_inputs):
            captions = x.get("captions") or ([x["text"]] if "text" in x else [])
            texts.extend(captions)
            owners.extend([i] * len(captions))
        if texts:
            emb = model.head.embed(encode_text_spe(model, self.task_type, texts))
            owners_t = torch.tensor(owners, device=emb.device)
            for i, x in enumerate(batched_inputs):
                rows = emb[owners_t == i]
                if "captions" in x:
                    outputs[i]["text_embeddings"] = rows
                elif "text" in x:
                    outputs[i]["text_embedding"] = rows[0]
        return outputs
