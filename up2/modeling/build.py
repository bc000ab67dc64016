"""Registries of up2's pluggable parts and their ``build_*`` functions.

Each registry holds classes built from the config (Detectron2 ``@configurable`` style):

* ``PROPOSER_REGISTRY``: region proposers (``MODEL.UP2.PROPOSER.NAME``), image features → proposals;
* ``GLOBAL_POOL_REGISTRY``: global image representations (``MODEL.UP2.GLOBAL_POOL.NAME``);
* ``TEXT_ENCODER_REGISTRY``: text encoders (``MODEL.UP2.TEXT_ENCODER.ARCH``);
* ``DECODER_REGISTRY``: the unified decoder g (``MODEL.UP2.DECODER.NAME``);
* ``TASK_REGISTRY``: task formulations (task heads); each task type names its head in its
  :class:`~up2.task_specs.TaskSpec`.
"""
from detectron2.utils.registry import Registry

from up2.task_specs import TASK_SPEC_REGISTRY

__all__ = [
    "PROPOSER_REGISTRY", "GLOBAL_POOL_REGISTRY", "TEXT_ENCODER_REGISTRY", "DECODER_REGISTRY", "TASK_REGISTRY",
    "build_proposer", "build_global_pool", "build_text_encoder", "build_unified_decoder", "build_task",
]

PROPOSER_REGISTRY = Registry("UP2_PROPOSER")
PROPOSER_REGISTRY.__doc__ = "Region proposers: multi-scale features -> proposals (tokens, boxes, masks, objectness)."
GLOBAL_POOL_REGISTRY = Registry("UP2_GLOBAL_POOL")
GLOBAL_POOL_REGISTRY.__doc__ = "Global image representations from the last feature level."
TEXT_ENCODER_REGISTRY = Registry("UP2_TEXT_ENCODER")
TEXT_ENCODER_REGISTRY.__doc__ = "Text encoders: token ids -> text features."
DECODER_REGISTRY = Registry("UP2_DECODER")
DECODER_REGISTRY.__doc__ = "The unified, modality-agnostic decoder g."
TASK_REGISTRY = Registry("UP2_TASK")
TASK_REGISTRY.__doc__ = "Task formulations (inputs, target sets, losses, inference) keyed by task type."


def build_proposer(cfg, input_shape):
    """Builds ``MODEL.UP2.PROPOSER.NAME`` for backbone outputs ``input_shape`` (dict of ShapeSpec)."""
    return PROPOSER_REGISTRY.get(cfg.MODEL.UP2.PROPOSER.NAME)(cfg, input_shape)


def build_global_pool(cfg, in_channels: int):
    """Builds ``MODEL.UP2.GLOBAL_POOL.NAME`` over a feature map with ``in_channels`` channels."""
    return GLOBAL_POOL_REGISTRY.get(cfg.MODEL.UP2.GLOBAL_POOL.NAME)(cfg, in_channels)


def build_text_encoder(cfg):
    """Builds ``MODEL.UP2.TEXT_ENCODER.ARCH``."""
    return TEXT_ENCODER_REGISTRY.get(cfg.MODEL.UP2.TEXT_ENCODER.ARCH)(cfg)


def build_unified_decoder(cfg):
    """Builds ``MODEL.UP2.DECODER.NAME``."""
    return DECODER_REGISTRY.get(cfg.MODEL.UP2.DECODER.NAME)(cfg)


def build_task(cfg, task_type: str, **kwargs):
    """Builds the head that the :class:`~up2.task_specs.TaskSpec` of ``task_type`` names in ``TASK_REGISTRY``
    (extra ``from_config`` kwargs allowed)."""
    head = TASK_REGISTRY.get(TASK_SPEC_REGISTRY.get(task_type).head)
    if getattr(head, "task_type", None) != task_type:
        raise ValueError(f"TASK_REGISTRY entry {head.__name__} has task_type {getattr(head, 'task_type', None)!r}; "
                         f"the spec of task type {task_type!r} names it")
    return head(cfg, **kwargs)
