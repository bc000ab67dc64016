"""The task types of up2: one specification per type, naming the parts that serve it.

A :class:`TaskSpec` names its task head (a class in ``up2.modeling.build.TASK_REGISTRY``), its dataset
mapper (``up2.data.mappers.MAPPER_REGISTRY``), its evaluator builder
(``up2.evaluation.build.EVALUATOR_REGISTRY``), whether its target set is a list of class names (open
vocabulary: ``set_vocabulary``, the datasets' ``thing_classes``) and the Detectron2 ``evaluator_type``
metadata whose datasets it evaluates when they are listed in ``DATASETS.TEST``. Everything that depends
on the task type reads it from :data:`TASK_SPEC_REGISTRY`: the config's ``DATASETS.UP2.TASKS[*].TYPE``
validation, the model's task heads, the MoE routing attribute and the similarity temperatures, the
loaders, the evaluators and the trainer.

A new task type is one :meth:`TaskSpecRegistry.register` call plus its three registered parts; this
module imports nothing of up2, so every package can read it. Types keep their registration order (it
is the MoE's task attribute value and the order of the model's task heads and temperatures).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["TaskSpec", "TaskSpecRegistry", "TASK_SPEC_REGISTRY", "BUILTIN_TASK_TYPES"]


@dataclass(frozen=True)
class TaskSpec:
    """What serves one task type.

    Attributes:
        task_type: the name used in ``DATASETS.UP2.TASKS[*].TYPE``, the inputs' ``"task"`` key and the
            head's ``task_type``.
        head: name of its task head in ``TASK_REGISTRY``.
        mapper: name of its dataset mapper in ``MAPPER_REGISTRY`` (built as ``Mapper(cfg, is_train)``).
        evaluator: name of its evaluator builder in ``EVALUATOR_REGISTRY``
            (``builder(cfg, dataset_name, output_dir) -> DatasetEvaluator``).
        has_class_names: the target set is a list of class names.
        evaluator_type: Detectron2 ``evaluator_type`` metadata of datasets this task evaluates when
            ``DATASETS.TEST`` lists them (None: only through ``DATASETS.UP2.TASKS``).
    """

    task_type: str
    head: str
    mapper: str
    evaluator: str
    has_class_names: bool = False
    evaluator_type: Optional[str] = None


class TaskSpecRegistry:
    """Task specifications by task type, in registration order."""

    def __init__(self):
        self._specs: Dict[str, TaskSpec] = {}

    def register(self, spec: TaskSpec) -> TaskSpec:
        """Adds ``spec``; a second spec for the same task type (or evaluator type) is an error."""
        if not isinstance(spec, TaskSpec) or not spec.task_type:
            raise ValueError(f"TaskSpecRegistry.register: expected a TaskSpec with a task_type, got {spec!r}")
        if spec.task_type in self._specs:
            raise ValueError(f"Task type {spec.task_type!r} is already registered: {self._specs[spec.task_type]}")
        if spec.evaluator_type is not None and spec.evaluator_type in self.evaluator_types():
            raise ValueError(f"Task type {spec.task_type!r}: evaluator_type {spec.evaluator_type!r} already belongs "
                             f"to {self.evaluator_types()[spec.evaluator_type]!r}")
        self._specs[spec.task_type] = spec
        return spec

    def unregister(self, task_type: str) -> TaskSpec:
        """Removes and returns the spec of ``task_type`` (e.g. a task type added by a test)."""
        return self._specs.pop(self.get(task_type).task_type)

    def get(self, task_type: str) -> TaskSpec:
        """The spec of ``task_type``.

        Raises:
            KeyError: naming the registered task types.
        """
        if task_type not in self._specs:
            raise KeyError(f"Unknown task type {task_type!r}; registered task types are {list(self._specs)}")
        return self._specs[task_type]

    def __contains__(self, task_type) -> bool:
        return task_type in self._specs

    def specs(self) -> List[TaskSpec]:
        return list(self._specs.values())

    def task_types(self) -> Tuple[str, ...]:
        """Every registered task type, in registration order."""
        return tuple(self._specs)

    def class_name_task_types(self) -> Tuple[str, ...]:
        """The task types whose target set is a list of class names."""
        return tuple(name for name, spec in self._specs.items() if spec.has_class_names)

    def evaluator_types(self) -> Dict[str, str]:
        """Detectron2 ``evaluator_type`` -> the task type that evaluates such datasets."""
        return {spec.evaluator_type: name for name, spec in self._specs.items() if spec.evaluator_type is not None}


TASK_SPEC_REGISTRY = TaskSpecRegistry()
for _spec in (
    TaskSpec("detection", head="DetectionTask", mapper="DetectionMapper", evaluator="coco_evaluator",
             has_class_names=True, evaluator_type="coco"),
    TaskSpec("classification", head="ClassificationTask", mapper="ClassificationMapper",
             evaluator="classification_evaluator", has_class_names=True, evaluator_type="classification"),
    TaskSpec("retrieval", head="RetrievalTask", mapper="RetrievalMapper", evaluator="retrieval_evaluator"),
    TaskSpec("captioning", head="CaptioningTask", mapper="CaptioningMapper", evaluator="caption_evaluator",
             evaluator_type="caption"),
    TaskSpec("mlm", head="MLMTask", mapper="MLMMapper", evaluator="mlm_evaluator", evaluator_type="mlm"),
):
    TASK_SPEC_REGISTRY.register(_spec)

# The five task formulations of the paper (Table 8 plus retrieval evaluation).
BUILTIN_TASK_TYPES = TASK_SPEC_REGISTRY.task_types()
