"""Shared helpers of the benchmark scripts: wall-clock timing that waits for CUDA kernels, and the
device / thread options every script takes."""
import time

import torch


def timed(fn, device) -> float:
    """Seconds taken by ``fn()``, synchronising CUDA before and after on a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def add_device_arguments(parser, default_device=None):
    """``--device`` (default: cuda when available) and ``--threads`` (torch CPU threads, 0 = default)."""
    parser.add_argument("--device", default=default_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def apply_threads(args):
    if args.threads:
        torch.set_num_threads(args.threads)
