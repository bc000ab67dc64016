"""UPv2 optimisation: MT-AdamW (paper §4.4), parameter groups, and the config-driven builder."""
from .build import OPTIMIZERS, TaskAdamW, build_optimizer
from .mt_adamw import UNUSED_PARAM_MODES, MTAdamW
from .param_groups import build_param_groups, param_kind

__all__ = [
    "MTAdamW", "TaskAdamW", "build_optimizer", "build_param_groups", "param_kind",
    "OPTIMIZERS", "UNUSED_PARAM_MODES",
]
