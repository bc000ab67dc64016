"""MT-AdamW: AdamW with per-step gradient normalisation and task-sampling compensation.

Uni-Perceiver v2 (paper §4.4) samples one task k per iteration with probability s_k. For the sampled
task, MT-AdamW updates every parameter (PyTorch β convention) as::

    g   = ω_k · ∇L / ‖∇L‖          # global L2 norm over all gradients; a zero norm skips it
    m   = β1·m + (1−β1)/s_k · g
    v   = β2·v + (1−β2)/s_k · g²
    m̂   = m / (1−β1^t),  v̂ = v / (1−β2^t)
    θ  ←  θ·(1 − lr·wd)              # decoupled weight decay, as torch.optim.AdamW
    θ  ←  θ − lr · m̂ / (sqrt(v̂) + eps)

t counts every ``step()`` whatever the task. The normalisation and compensation factors are folded
into scalar coefficients, so a step costs one extra read of the gradients (the global norm) and one
extra pass over ``m`` compared with ``torch.optim.AdamW(foreach=True)``. All tensor work uses
``torch._foreach_*`` ops grouped by (device, dtype).
"""
import logging
import math
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["MTAdamW", "UNUSED_PARAM_MODES"]

logger = logging.getLogger(__name__)

UNUSED_PARAM_MODES = ("decay", "skip")
_EXTRA_STATE_KEY = "mt_adamw"


def _validate_task(sampling_ratio: float, loss_weight: float) -> Tuple[float, float]:
    sampling_ratio, loss_weight = float(sampling_ratio), float(loss_weight)
    if not (0.0 < sampling_ratio <= 1.0):
        raise ValueError(f"MTAdamW.set_task: sampling_ratio must be in (0, 1], "
                         f"got {sampling_ratio}")
    if not (loss_weight >= 0.0 and math.isfinite(loss_weight)):
        raise ValueError(f"MTAdamW.set_task: loss_weight must be finite and >= 0, "
                         f"got {loss_weight}")
    return sampling_ratio, loss_weight


class MTAdamW(torch.optim.Optimizer):
    """MT-AdamW optimizer (Uni-Perceiver v2, §4.4).

    Call :meth:`set_task` with the sampled task's sampling ratio s_k and loss weight ω_k before
    ``step()``; the task stays set until the next call, so a single-task run calls it once.

    Args:
        params: parameters or parameter-group dicts (per-group ``lr``, ``weight_decay``, as torch).
        lr: learning rate α.
        betas: (β1, β2), PyTorch convention (``m = β1·m + (1−β1)·g``).
        eps: added to ``sqrt(v̂)``.
        weight_decay: decoupled weight decay (θ ← θ·(1 − lr·wd)).
        normalize_gradient: divide the gradient by its global L2 norm (paper); False: ablation.
        compensate_sampling: divide the moment increments by s_k (paper); False for the ablation.
        unused_params: what happens to a parameter whose ``grad`` is None in a step: ``"decay"``
            treats it as a zero gradient (moments decay, momentum and weight decay still move it;
            a parameter never seen before gets zero moments and only weight decay); ``"skip"``
            leaves it untouched, as torch.optim.AdamW does. Parameters with
            ``requires_grad=False`` are always skipped.
    """

    def __init__(self, params, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-4, normalize_gradient: bool = True,
                 compensate_sampling: bool = True, unused_params: str = "decay"):
        if not (lr >= 0.0):
            raise ValueError(f"MTAdamW: invalid lr {lr}, expected >= 0")
        if not (eps >= 0.0):
            raise ValueError(f"MTAdamW: invalid eps {eps}, expected >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MTAdamW: invalid betas {tuple(betas)}, "
                             "expected two values in [0, 1)")
        if not (weight_decay >= 0.0):
            raise ValueError(f"MTAdamW: invalid weight_decay {weight_decay}, expected >= 0")
        if unused_params not in UNUSED_PARAM_MODES:
            raise ValueError(f"MTAdamW: invalid unused_params {unused_params!r}, "
                             f"expected one of {list(UNUSED_PARAM_MODES)}")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.normalize_gradient = bool(normalize_gradient)
        self.compensate_sampling = bool(compensate_sampling)
        self.unused_params = unused_params
        self.global_step = 0
        self._task: Optional[Tuple[float, float]] = None

    # ------------------------------------------------------------------------------------ task
    def set_task(self, sampling_ratio: float, loss_weight: float) -> None:
        """Sets s_k (in (0, 1]) and ω_k (>= 0) of the task whose gradients the next step uses."""
        self._task = _validate_task(sampling_ratio, loss_weight)

    @property
    def task(self) -> Optional[Tuple[float, float]]:
        """The current ``(sampling_ratio, loss_weight)``, or None before :meth:`set_task`."""
        return self._task

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict:
        """torch's state dict plus ``"mt_adamw": {"step": t, "task": (s_k, ω_k) or None}``."""
        state = super().state_dict()
        state[_EXTRA_STATE_KEY] = {"step": self.global_step, "task": self._task}
        return state

    def load_state_dict(self, state_dict: Dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_EXTRA_STATE_KEY, None)
        super().load_state_dict(state_dict)
        if extra is None:  # e.g. a torch.optim.AdamW checkpoint: recover t from per-parameter steps
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            self.global_step = int(max(steps, default=0))
            logger.warning("MTAdamW.load_state_dict: no %r entry; global step set to %d",
                           _EXTRA_STATE_KEY, self.global_step)
        else:
            self.global_step = int(extra["step"])
            task = extra.get("task")
            if task is not None:
                self._task = _validate_task(*task)

    # ------------------------------------------------------------------------------------ step
    def _collect(self):
        """Per group: {(device, dtype): (params, grads_or_None, exp_avgs, exp_avg_sqs)}."""
        decay_unused = self.unused_params == "decay"
        collected = []
        for group in self.param_groups:
            buckets = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None and not (decay_unused and p.requires_grad):
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MTAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params, grads, exp_avgs, exp_avg_sqs = buckets[(p.device, p.dtype)]
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            collected.append((group, buckets))
        return collected

    @staticmethod
    def _global_grad_norm(collected) -> float:
        """L2 norm over every gradient of every group (one host sync)."""
        norms: List[torch.Tensor] = []
        for _, buckets in collected:
            for (_, dtype), (_, grads, _, _) in buckets.items():
                present = [g for g in grads if g is not None]
                if present:
                    norm_dtype = torch.promote_types(dtype, torch.float32)
                    norms.extend(torch._foreach_norm(present, 2, dtype=norm_dtype))
        if not norms:
            return 0.0
        device = norms[0].device
        stacked = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
        return torch.linalg.vector_norm(stacked).item()

    @torch.no_grad()
    def step(self, closure=None):
        """One MT-AdamW update for the task given to :meth:`set_task`.

        Raises:
            RuntimeError: if :meth:`set_task` was never called.
            FloatingPointError: if the global gradient norm is not finite.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._task is None:
            raise RuntimeError("MTAdamW.step() called before set_task(sampling_ratio, "
                               "loss_weight): set the sampled task before stepping")
        sampling_ratio, loss_weight = self._task
        collected = self._collect()
        grad_norm = self._global_grad_norm(collected)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"MTAdamW: non-finite global gradient norm {grad_norm} "
                                     f"at step {self.global_step + 1}")
        scale = loss_weight  # g = scale · ∇L
        if self.normalize_gradient and grad_norm > 0.0:
            scale = loss_weight / grad_norm
        comp = 1.0 / sampling_ratio if self.compensate_sampling else 1.0

        self.global_step += 1
        t = self.global_step
        for group, buckets in collected:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            bias_correction1 = 1.0 - beta1 ** t
            bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
            step_size = lr / bias_correction1
            for params, grads, exp_avgs, exp_avg_sqs in buckets.values():
                torch._foreach_mul_(exp_avgs, beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                used = [i for i, g in enumerate(grads) if g is not None]
                if len(used) < len(grads):  # "decay" mode: unused moments only decay
                    grads = [grads[i] for i in used]
                    m_used, v_used = [exp_avgs[i] for i in used], [exp_avg_sqs[i] for i in used]
                else:
                    m_used, v_used = exp_avgs, exp_avg_sqs
                if grads:
                    torch._foreach_add_(m_used, grads, alpha=(1.0 - beta1) * comp * scale)
                    torch._foreach_addcmul_(v_used, grads, grads,
                                            value=(1.0 - beta2) * comp * scale * scale)
                if wd != 0.0 and lr != 0.0:
                    torch._foreach_mul_(params, 1.0 - lr * wd)
                denom = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denom, bias_correction2_sqrt)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)
                del denom  # free before the next bucket allocates its own (allocator reuse)
        return loss
