"""Interface of a task formulation (``TASK_REGISTRY``).

A task module turns a batch of its inputs into the unified formulation: input sequences and a target
set through the shared networks of the meta-architecture, similarity logits, a loss in training and
Detectron2-style outputs at inference. It owns only task-specific state (e.g. its class names); the
shared networks are passed in as ``model`` (a :class:`~up2.modeling.meta_arch.UniPerceiverV2`), which
provides ``encode_images``, ``text_encoder``, ``decoder``, ``head``, ``targets`` and ``device``.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from up2.modeling.tasks.targets import check_class_names

__all__ = ["TaskHead", "ClassNamesMixin"]


class TaskHead(nn.Module):
    """Base class: ``forward(model, batched_inputs)`` returns losses in training, outputs in inference.

    Attributes:
        task_type: a registered task type (``up2.task_specs``); also the task group of the similarity
            temperature.
    """

    task_type = ""

    def forward(self, model, batched_inputs: List[Dict]):
        if self.training:
            return self.losses(model, batched_inputs)
        return self.inference(model, batched_inputs)

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        raise NotImplementedError


class ClassNamesMixin:
    """Class names as the target set of a task (detection, classification); replaceable at inference
    (open vocabulary) with :meth:`set_class_names`.

    ``class_names_datasets``: datasets whose metadata ``thing_classes`` give the default names when none
    were set; read at first use, so datasets whose metadata appears only when they are loaded (lazy
    registrations such as ImageNet's) work once the train loader has been built.
    """

    class_names: Optional[List[str]] = None
    class_names_datasets: Sequence[str] = ()

    def set_class_names(self, names: Sequence[str]):
        self.class_names = check_class_names(self.task_type, names)

    def require_class_names(self) -> List[str]:
        if not self.class_names:
            from detectron2.data import MetadataCatalog

            for name in self.class_names_datasets:
                classes = MetadataCatalog.get(name).get("thing_classes", None)
                if classes:
                    self.set_class_names(classes)
                    break
        if not self.class_names:
            raise ValueError(f"Task '{self.task_type}' has no class names: the datasets {list(self.class_names_datasets)} "
                             f"have no metadata 'thing_classes'; call model.set_vocabulary('{self.task_type}', names)")
        return self.class_names

    def class_embeddings(self, model) -> torch.Tensor:
        """(C, d) decoder outputs of the class names."""
        return model.targets.class_embeddings(model.text_encoder, model.decoder, self.task_type,
                                              self.require_class_names())


def vocabulary_logits(model, task: str, hidden: torch.Tensor) -> torch.Tensor:
    """(..., S) logits of decoder outputs ``hidden`` (..., d) against the task's target tokens: every
    vocabulary token (S = V), or the set of ``model.targets.vocabulary_ids(task)`` (index i = its i-th id)."""
    vocabulary = model.targets.vocabulary_embeddings(model.text_encoder, model.decoder, task)
    return model.head(hidden, vocabulary.to(hidden.dtype), task)


__all__ += ["vocabulary_logits"]
