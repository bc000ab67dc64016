"""up2's trainer: Detectron2's ``DefaultTrainer`` workflow (hooks, checkpoints, ``metrics.json``,
TensorBoard, ETA in the log) with the pieces that up2 needs to differ:

* DDP that also works on CPU (gloo) processes;
* atomic checkpoints (:class:`~up2.checkpoint.AtomicCheckpointer`), strict ``MODEL.WEIGHTS`` loading
  (``MODEL.UP2.WEIGHTS_STRICT``), stale ``.tmp-*`` files of a killed run removed at start, at most
  ``SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP`` periodic checkpoints, and a checkpoint then a clean exit on
  ``SOLVER.UP2.PREEMPTION_SIGNALS`` (:mod:`up2.engine.checkpoint_hooks`);
* up2's optimizer (MT-AdamW or AdamW with up2's parameter groups) from ``SOLVER.UP2.*``;
* multi-task runs (``DATASETS.UP2.TASKS``): one loader per task and a :class:`TaskSamplingHook` that
  picks the task of every iteration (the same on every rank) and sets it on the optimizer;
* exact ``--resume`` (:mod:`up2.engine.resume`): checkpoints hold the optimizer (and grad scaler)
  state, which Detectron2 0.6's ``DefaultTrainer`` leaves out, and the position of every task's
  loader; the global RNGs are reseeded before every step from ``(seed, rank, iteration)``;
* ``SOLVER.AMP.ENABLED``: autocast with ``SOLVER.UP2.AMP_DTYPE`` (bfloat16 or float16) on CPU or
  GPU (:class:`AutocastTrainer`; Detectron2 0.6's ``AMPTrainer`` is CUDA and float16 only);
* ``skipped/<dataset>/<reason>`` and ``skipped/<dataset>/bad_fraction`` in ``metrics.json``: samples
  the loaders skipped, and the run stops when a dataset has too many bad samples (:class:`SkippedSamplesHook`);
* evaluators and test loaders chosen by each test dataset's task;
* ``test()`` returns ``{dataset_name: {metric: value}}`` (flat metrics, the ``eval_results.json``
  contract of ``train_net.py --eval-only``).
"""
import contextlib
import functools
import json
import logging
import math
import os
import time
import weakref
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import inference_on_dataset
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from up2.checkpoint import AtomicCheckpointer, atomic_write_bytes
from up2.checkpoint.atomic_files import remove_stale_temp_files
from up2.config import get_task_entries
from up2.engine.target_vocabulary import set_training_vocabularies
from up2.task_specs import TASK_SPEC_REGISTRY

__all__ = ["UP2Trainer", "AutocastTrainer", "SkippedSamplesHook", "amp_dtype", "create_ddp_model",
           "test_datasets_with_tasks", "write_eval_results"]

logger = logging.getLogger(__name__)


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Wraps ``model`` in DDP when there are several processes; ``device_ids`` only on CUDA."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and next(model.parameters()).is_cuda:
        kwargs["device_ids"] = [comm.get_local_rank()]
    return DistributedDataParallel(model, **kwargs)


def write_eval_results(output_dir: str, results: Dict[str, Dict[str, float]]):
    """Writes ``output_dir/eval_results.json`` (atomically) and logs the results as a table; main
    process only."""
    from up2.evaluation import format_results_table

    if not comm.is_main_process():
        return
    path = os.path.join(output_dir, "eval_results.json")
    # Metrics that cannot be computed (e.g. COCO's APl without large objects) are NaN: JSON null.
    finite = {dataset: {metric: (value if math.isfinite(value) else None) for metric, value in metrics.items()}
              for dataset, metrics in results.items()}
    atomic_write_bytes(path, json.dumps(finite, indent=2, sort_keys=True, allow_nan=False).encode())
    logger.info("Evaluation results written to %s\n%s", path, format_results_table(results))


def test_datasets_with_tasks(cfg) -> List[Tuple[str, str]]:
    """Returns ``[(dataset_name, task_type)]`` to evaluate: every TEST_DATASETS entry of every task
    in ``DATASETS.UP2.TASKS``, or ``DATASETS.TEST`` with the task given by each dataset's metadata."""
    from detectron2.data import MetadataCatalog

    entries = get_task_entries(cfg, require_train=False)
    if entries:
        return [(name, entry.type) for entry in entries for name in entry.test_datasets]
    pairs = []
    # Detectron2's evaluator_type metadata of a dataset -> the task type whose spec claims it
    task_of_evaluator_type = TASK_SPEC_REGISTRY.evaluator_types()
    for name in cfg.DATASETS.TEST:
        evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
        if evaluator_type not in task_of_evaluator_type:
            raise ValueError(f"Cannot tell the task of test dataset '{name}' (evaluator_type="
                             f"{evaluator_type!r}); list it under DATASETS.UP2.TASKS[*].TEST_DATASETS")
        pairs.append((name, task_of_evaluator_type[evaluator_type]))
    return pairs


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(cfg) -> torch.dtype:
    """The autocast dtype of ``SOLVER.UP2.AMP_DTYPE``."""
    name = cfg.SOLVER.UP2.AMP_DTYPE
    if name not in AMP_DTYPES:
        raise ValueError(f"SOLVER.UP2.AMP_DTYPE must be one of {sorted(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[name]


class AutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass runs under ``torch.autocast`` on the model's device type
    (CPU or CUDA) with ``dtype``. float16 scales the loss with a ``torch.amp.GradScaler`` (saved in
    the checkpoint); bfloat16 has float32's exponent range and needs none."""

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype):
        super().__init__(model, data_loader, optimizer)
        self.dtype = dtype
        self.device_type = next(model.parameters()).device.type
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if dtype == torch.float16 else None

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        (losses if self.grad_scaler is None else self.grad_scaler.scale(losses)).backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class SkippedSamplesHook(HookBase):
    """Every ``period`` iterations (and at the last one), puts the samples skipped so far by the
    loaders, summed over ranks (:func:`up2.data.bad_samples.gather_skipped_samples`, which raises on
    every rank when a dataset has more bad samples than ``DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION``), into
    the EventStorage as ``skipped/<dataset>/<reason>`` and ``skipped/<dataset>/bad_fraction``; placed
    before the ``PeriodicWriter`` of the same period, they reach ``metrics.json``."""

    def __init__(self, period: int = 20):
        self._period = int(period)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self._period and next_iter != self.trainer.max_iter:
            return
        from up2.data.bad_samples import gather_skipped_samples

        # every rank runs this hook at the same steps
        for key, count in gather_skipped_samples().items():
            self.trainer.storage.put_scalar(f"skipped/{key}", count, smoothing_hint=False)


class UP2Trainer(DefaultTrainer):
    """``DefaultTrainer`` with up2's DDP, checkpointer, optimizer and evaluators (see module doc)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        set_training_vocabularies(cfg, model)  # before any checkpoint is loaded: a checkpoint's sets win
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # weak reference: the model must not keep its trainer alive
        model.register_forward_hook(functools.partial(UP2Trainer._check_losses_are_finite, weakref.proxy(self)))
        # With unmixed sampling every rank runs the same task, so the unused parameters (e.g. the image
        # encoder in an MLM step) are the same on every rank: DDP can find them without hanging.
        model = create_ddp_model(model, broadcast_buffers=False,
                                 find_unused_parameters=bool(get_task_entries(cfg, require_train=False)))
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = AutocastTrainer(model, data_loader, optimizer, amp_dtype(cfg))
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, strict=cfg.MODEL.UP2.WEIGHTS_STRICT,
                                               trainer=weakref.proxy(self))
        if comm.is_main_process():  # only the main process writes checkpoints
            remove_stale_temp_files(cfg.OUTPUT_DIR)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        self._set_single_task()

    def _check_losses_are_finite(self, module, inputs, outputs):
        """Forward hook: a non-finite training loss raises FloatingPointError naming the loss, the
        task and the iteration, on the rank where it happened, before the backward pass."""
        if not module.training or not isinstance(outputs, dict) or not outputs:
            return
        losses = [value.detach().float().sum() for value in outputs.values() if torch.is_tensor(value)]
        if losses and not bool(torch.stack(losses).isfinite().all()):
            bad = {name: float(value.detach().float().sum()) for name, value in outputs.items()
                   if torch.is_tensor(value) and not bool(value.detach().isfinite().all())}
            task = self.current_task.name if self.current_task is not None else "single-task run"
            raise FloatingPointError(f"Non-finite loss at iteration {self.iter} (task: {task}, rank "
                                     f"{comm.get_rank()}): {bad}")

    @property
    def current_task(self):
        """The TaskEntry of the running iteration (None in single-task or mixed runs)."""
        return getattr(self, "_current_task", None)

    @current_task.setter
    def current_task(self, entry):
        self._current_task = entry

    def _set_single_task(self):
        """A run without DATASETS.UP2.TASKS is one task sampled every step: s_k = 1, omega_k = 1."""
        set_task = getattr(self.optimizer, "set_task", None)
        if set_task is not None and not get_task_entries(self.cfg, require_train=False):
            set_task(sampling_ratio=1.0, loss_weight=1.0)

    @classmethod
    def build_train_loader(cls, cfg):
        """One resumable loader per task of ``DATASETS.UP2.TASKS`` (a :class:`MultiTaskDataLoader` of
        :class:`~up2.engine.resume.ResumableTaskLoader` fed by the task-sampling hook), or Detectron2's
        loader of ``DATASETS.TRAIN`` for a single-task run."""
        from up2.data import MultiTaskDataLoader
        from up2.engine.resume import build_resumable_task_loaders

        if not get_task_entries(cfg):
            return super().build_train_loader(cfg)
        return MultiTaskDataLoader(build_resumable_task_loaders(cfg))

    def _task_loaders(self) -> Dict[str, object]:
        """The per-task loaders that have a position to checkpoint (none in single-task runs)."""
        loaders = getattr(self._trainer.data_loader, "loaders", {})
        return {name: loader for name, loader in loaders.items() if hasattr(loader, "state_dict")}

    def state_dict(self):
        """Detectron2's trainer state (iteration, hook states: LR scheduler, task counts, seed) plus
        the optimizer and grad-scaler state (``"_trainer"``) and each task loader's position."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["task_loaders"] = {name: loader.state_dict() for name, loader in self._task_loaders().items()}
        return ret

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: the optimizer starts afresh")
        saved = state_dict.get("task_loaders", {})
        for name, loader in self._task_loaders().items():
            if name in saved:
                loader.load_state_dict(saved[name])
            else:
                logger.warning("The checkpoint has no position for the train loader of task '%s': it "
                               "restarts its stream", name)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, task_type=None):
        """Test loader of ``dataset_name`` with the mapper of ``task_type`` (default: the dataset's task in
        ``DATASETS.UP2.TASKS``; give it for a dataset evaluated by several tasks)."""
        from up2.data import build_task_test_loader

        if task_type is None:
            task_type = dict(test_datasets_with_tasks(cfg)).get(dataset_name)
        if task_type is None or (task_type == "detection" and not get_task_entries(cfg, require_train=False)):
            return super().build_test_loader(cfg, dataset_name)
        return build_task_test_loader(cfg, dataset_name, task_type)

    def build_hooks(self):
        """Detectron2's hooks, preceded by the :class:`IterationSeedHook` (seed ``cfg.SEED``, or one
        drawn and shared by the ranks) and, in multi-task runs, the task-sampling hook; a
        :class:`SkippedSamplesHook` before the writers; the evaluation hook also writes
        ``OUTPUT_DIR/eval_results.json``; the periodic checkpointer keeps at most
        ``SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP`` checkpoints; a :class:`PreemptionHook` comes last."""
        from up2.engine.checkpoint_hooks import BoundedPeriodicCheckpointer, PreemptionHook, max_checkpoints_to_keep
        from up2.engine.resume import IterationSeedHook
        from up2.engine.task_sampling import TaskSamplingHook, build_task_sampler

        hook_list = super().build_hooks()
        entries = get_task_entries(self.cfg)
        if entries:
            sampler = build_task_sampler(self.cfg, entries)
            hook_list.insert(0, TaskSamplingHook(sampler, check_agreement=self.cfg.SOLVER.UP2.CHECK_TASK_AGREEMENT,
                                                 data_loader=self._trainer.data_loader))
        seed = self.cfg.SEED if self.cfg.SEED >= 0 else comm.shared_random_seed()
        hook_list.insert(0, IterationSeedHook(seed))
        writers = [i for i, hook in enumerate(hook_list) if isinstance(hook, hooks.PeriodicWriter)]
        hook_list.insert(writers[0] if writers else len(hook_list), SkippedSamplesHook(period=20))

        def test_and_write_results():
            results = self.test(self.cfg, self.model)
            write_eval_results(self.cfg.OUTPUT_DIR, results)
            return results

        keep = max_checkpoints_to_keep(self.cfg)

        def replaced(hook):
            if isinstance(hook, hooks.EvalHook):
                return hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_and_write_results)
            if isinstance(hook, hooks.PeriodicCheckpointer):
                return BoundedPeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, keep)
            return hook

        hook_list = [replaced(hook) for hook in hook_list]
        if self.cfg.SOLVER.UP2.PREEMPTION_SIGNALS:
            hook_list.append(PreemptionHook(self.cfg.SOLVER.UP2.PREEMPTION_SIGNALS, keep))
        return hook_list

    @property
    def optimizer(self):
        return self._trainer.optimizer

    @classmethod
    def build_optimizer(cls, cfg, model):
        from up2.solver import build_optimizer

        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, task_type=None):
        from up2.evaluation import build_evaluator

        if task_type is None:
            task_type = dict(test_datasets_with_tasks(cfg)).get(dataset_name)
        return build_evaluator(cfg, dataset_name, task_type, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None) -> Dict[str, Dict[str, float]]:
        """Evaluates ``model`` on every test dataset of every task.

        Returns:
            ``{dataset_name: {metric: value}}`` with Detectron2's flat metric names ("bbox/AP").
        """
        results = OrderedDict()
        for index, (dataset_name, task_type) in enumerate(test_datasets_with_tasks(cfg)):
            data_loader = cls.build_test_loader(cfg, dataset_name, task_type=task_type)
            if evaluators is not None:
                evaluator = evaluators[index]
            else:
                evaluator = cls.build_evaluator(cfg, dataset_name, task_type=task_type)
            with _dataset_vocabulary(model, dataset_name, task_type):
                dataset_results = inference_on_dataset(model, data_loader, evaluator)
            flat = flatten_results_dict(dataset_results or {})
            # a dataset evaluated by several tasks (captions: captioning and retrieval) gets all their metrics
            results.setdefault(dataset_name, OrderedDict()).update(flat)
            if comm.is_main_process():
                logger.info("Evaluation results of %s (%s): %s", dataset_name, task_type, flat)
        return results


@contextlib.contextmanager
def _dataset_vocabulary(model, dataset_name: str, task_type: str):
    """Evaluates class-name tasks over the test dataset's ``thing_classes`` (open vocabulary), restoring
    the model's vocabulary afterwards; a no-op for models without ``set_vocabulary``."""
    from detectron2.data import MetadataCatalog

    model = model.module if isinstance(model, DistributedDataParallel) else model
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if (not hasattr(model, "set_vocabulary") or task_type not in TASK_SPEC_REGISTRY.class_name_task_types()
            or not classes):
        yield
        return
    previous = model.vocabulary(task_type)
    model.set_vocabulary(task_type, classes)
    try:
        yield
    finally:
        if previous:
            model.set_vocabulary(task_type, previous)
