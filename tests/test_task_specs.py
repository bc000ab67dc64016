"""The task specification table: the built-in rows, the registry's errors, and every part it names exists
in its registry (see tests/engine/test_new_task_type.py for a task type added from outside up2)."""
import pytest

import up2.modeling  # noqa: F401  (registers the task heads)
from up2.config import TASK_TYPES
from up2.data.mappers import MAPPER_REGISTRY
from up2.evaluation.build import EVALUATOR_REGISTRY
from up2.modeling.build import TASK_REGISTRY
from up2.task_specs import TASK_SPEC_REGISTRY, TaskSpec, TaskSpecRegistry


def test_builtin_table():
    assert TASK_SPEC_REGISTRY.task_types() == TASK_TYPES == (
        "detection", "classification", "retrieval", "captioning", "mlm")
    assert TASK_SPEC_REGISTRY.class_name_task_types() == ("detection", "classification")
    assert TASK_SPEC_REGISTRY.evaluator_types() == {"coco": "detection", "classification": "classification",
                                                    "caption": "captioning", "mlm": "mlm"}


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_every_named_part_is_registered(task_type):
    spec = TASK_SPEC_REGISTRY.get(task_type)
    assert TASK_REGISTRY.get(spec.head).task_type == task_type
    assert MAPPER_REGISTRY.get(spec.mapper) is not None and EVALUATOR_REGISTRY.get(spec.evaluator) is not None


def test_registry_errors_name_the_types():
    registry = TaskSpecRegistry()
    registry.register(TaskSpec("a", head="A", mapper="M", evaluator="E", evaluator_type="x"))
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register(TaskSpec("a", head="B", mapper="M", evaluator="E"))
    with pytest.raises(ValueError, match="evaluator_type 'x' already belongs to 'a'"):
        registry.register(TaskSpec("b", head="B", mapper="M", evaluator="E", evaluator_type="x"))
    with pytest.raises(KeyError, match=r"Unknown task type 'c'; registered task types are \['a'\]"):
        registry.get("c")
    assert registry.unregister("a").head == "A" and registry.task_types() == ()
