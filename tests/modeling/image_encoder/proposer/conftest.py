"""Fixtures of the proposer tests: counting device-to-host copies."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class HostTransferCounter(TorchFunctionMode):
    """Counts torch calls that copy a (device-side) tensor's data to the host.

    Tensors produced by such a copy, and everything computed only from them, are host-side:
    calls on them are not counted (e.g. ``.numpy()`` of the result of ``.cpu()``).
    """

    SYNCS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__array__,
             torch.Tensor.nonzero, torch.nonzero}

    def __init__(self):
        super().__init__()
        self.count, self.host_ids, self.keep = 0, set(), []

    def _mark(self, result):
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor):
                self.host_ids.add(id(t))
                self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_host = bool(tensors) and all(id(t) in self.host_ids for t in tensors)
        result = func(*args, **kwargs)
        if func in self.SYNCS and not on_host:
            self.count += 1
            self._mark(result)
        elif on_host:
            self._mark(result)
        return result


@pytest.fixture
def host_transfer_counter():
    """The :class:`HostTransferCounter` class (a context manager; ``.count`` after the block)."""
    return HostTransferCounter
