"""``launch()`` with Detectron2's signature that also runs on machines without a GPU.

Detectron2 0.6's launcher hard-codes the NCCL backend and ``torch.cuda.set_device``. This one picks
NCCL when CUDA is available and gloo otherwise, so ``train_net.py --num-gpus 2`` starts two CPU
processes on a CPU-only machine (one process per "GPU"). ``dist_url="env://"`` uses the variables
set by ``torchrun`` (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK).

The process that starts the workers passes SIGTERM and SIGUSR1 on to them (the trainer stops with a
checkpoint, :mod:`up2.engine.checkpoint_hooks`) and exits with the status of a worker stopped that way.
"""
import contextlib
import logging
import os
import signal
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from up2.engine.checkpoint_hooks import PREEMPTION_EXIT_BASE

__all__ = ["launch", "DEFAULT_TIMEOUT", "distributed_backend"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
# Seconds the other workers get to exit on their own once one has exited with an error or a preemption.
WORKER_EXIT_GRACE_S = 30
# Signals passed on to the workers.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def distributed_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=DEFAULT_TIMEOUT):
    """Runs ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each machine.

    Args:
        main_func: called as ``main_func(*args)`` in every process.
        num_gpus_per_machine (int): processes per machine (GPUs, or CPU workers without CUDA).
        num_machines (int): number of machines.
        machine_rank (int): rank of this machine.
        dist_url (str): ``tcp://host:port``, ``"auto"`` (a free local port, one machine only) or
            ``"env://"`` (torchrun: the processes are already started, one per call).
        args (tuple): arguments of ``main_func``.
        timeout (timedelta): timeout of collective operations.
    """
    if dist_url == "env://" and "RANK" in os.environ:
        _init_from_env(timeout)
        main_func(*args)
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable init method in multi-machine jobs; prefer tcp://")
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} "
                         "CUDA devices are visible")
    context = mp.start_processes(
        _distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    with _forwarding_signals(context.processes):
        try:
            # a grace period: the other workers of a preempted run finish their own clean exit
            while not context.join(grace_period=WORKER_EXIT_GRACE_S):
                pass
        except mp.ProcessExitedException as error:
            signal_number = (error.exit_code or 0) - PREEMPTION_EXIT_BASE
            if signal_number in {s.value for s in signal.Signals}:
                logger.warning("Worker %d stopped on %s with a checkpoint", error.error_index,
                               signal.Signals(signal_number).name)
                raise SystemExit(error.exit_code) from None
            raise


@contextlib.contextmanager
def _forwarding_signals(processes):
    """Within the block, FORWARDED_SIGNALS received by this process are sent to ``processes`` (only when
    this is the main thread, where Python handles signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _setup_local_process_group(world_size, num_per_machine, machine_rank):
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _init_from_env(timeout):
    backend = distributed_backend()
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    machine_rank = dist.get_rank() // local_world_size
    _setup_local_process_group(dist.get_world_size(), local_world_size, machine_rank)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    comm.synchronize()


def _distributed_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args,
                        timeout):
    backend = distributed_backend()
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error("Could not initialise the process group (backend %s) at %s", backend, dist_url)
        raise
    _setup_local_process_group(world_size, num_per_machine, machine_rank)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        _release_process_groups()


def _release_process_groups():
    """Destroys every process group and drops the references Detectron2's ``comm`` keeps to them (the
    local group, the cached gloo group): a group object that survives until interpreter shutdown is
    destroyed there, and its gloo threads then abort the process ("terminate called without an active
    exception", seen in about one of four two-process runs with piped output)."""
    dist.destroy_process_group()
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()
