"""Differentiable all-gather for contrastive negatives and target sets split across ranks.

``torch.distributed.nn.functional.all_gather`` needs equal sizes and, on some backends, reduce-scatter
(not available with gloo). :func:`all_gather_with_grad` takes tensors of different first-dim sizes and
works with gloo and NCCL: forward gathers (padding to the largest size), backward sums the gradient of
the gathered tensor over ranks (``all_reduce``) and returns this rank's slice. With DDP (which averages
parameter gradients over ranks) the resulting gradient is that of the mean of the per-rank losses.
"""
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "gather_sizes", "world_info"]


def world_info():
    """(world size, rank); (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_sizes(size: int, device) -> List[int]:
    """First-dim size of every rank's tensor (one small all_gather); ``[size]`` without a process group."""
    world, _ = world_info()
    if world == 1:
        return [size]
    local = torch.tensor([size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, sizes):
        world, rank = world_info()
        if sizes is None:
            sizes = gather_sizes(tensor.shape[0], tensor.device)
        longest = max(sizes)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """Concatenation over ranks (rank order) of ``tensor`` (N_r, ...) -> (sum_r N_r, ...), differentiable.

    ``sizes``: every rank's N_r when already known (:func:`gather_sizes`), saving that exchange.
    Without an initialised process group (or with one process) it returns ``tensor`` itself.
    """
    world, _ = world_info()
    if world == 1:
        return tensor
    return _AllGather.apply(tensor, sizes)
