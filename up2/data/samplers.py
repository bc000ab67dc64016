"""Training samplers over several datasets of one task.

:class:`WeightedDatasetSampler` is Detectron2's ``TrainingSampler`` generalised to a concatenation
of datasets sampled with given weights (paper Table 8: inside a task, datasets are drawn with
probability proportional to the square root of their sizes, or with explicit weights).
"""
import itertools
import logging
from typing import Optional, Sequence

import numpy as np
from detectron2.utils import comm
from torch.utils.data.sampler import Sampler

__all__ = ["WeightedDatasetSampler", "dataset_sampling_weights"]

logger = logging.getLogger(__name__)

# Dataset draws are made this many at a time (vectorised); the stream does not depend on it.
_CHUNK = 4096


def dataset_sampling_weights(sizes: Sequence[int], weights: Sequence[float] = (), power: float = 0.5,
                             names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Normalised probability of drawing each dataset.

    Args:
        sizes: number of items of each dataset.
        weights: explicit relative weights (one per dataset, >= 0); empty means ``size ** power``.
        power: exponent of the size when ``weights`` is empty (Table 8: 0.5, square root).
        names: dataset names, only for error messages.

    Returns:
        float64 array of shape (D,), summing to 1.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(sizes))]
    if len(sizes) == 0:
        raise ValueError("dataset_sampling_weights: no dataset given")
    empty = [name for name, size in zip(names, sizes) if size <= 0]
    if empty:
        raise ValueError(f"Training dataset(s) {empty} have no items; remove them or fix their files")
    if len(weights):
        if len(weights) != len(sizes):
            raise ValueError(f"{len(weights)} dataset weights given for {len(sizes)} datasets {names}")
        probs = np.asarray(weights, dtype=np.float64)
        if (probs < 0).any() or not np.isfinite(probs).all():
            raise ValueError(f"Dataset weights must be finite and >= 0, got {list(weights)} for {names}")
    else:
        probs = np.asarray(sizes, dtype=np.float64) ** float(power)
    if probs.sum() <= 0:
        raise ValueError(f"Dataset weights {probs.tolist()} of {names} sum to 0")
    return probs / probs.sum()


class WeightedDatasetSampler(Sampler):
    """Infinite stream of indices into the concatenation of several datasets.

    Each index is drawn by first drawing a dataset ``d`` with probability ``probs[d]``, then taking
    the next item of ``d``'s own stream of shuffled epochs (``shuffle(range(size_d))`` repeated):
    every item of a dataset is marginally uniform, and a dataset is covered once before any of its
    items repeats. Index ``offsets[d] + i`` is item ``i`` of dataset ``d``.

    As Detectron2's ``TrainingSampler``, every rank generates the same global stream from ``seed``
    and keeps positions ``rank, rank + world_size, ...``: ranks see different items, and the stream
    of a rank is a pure function of ``(seed, rank, world_size)``. DataLoader workers are sharded by
    Detectron2's ``ToIterableDataset``.
    """

    def __init__(self, sizes: Sequence[int], probs: Sequence[float], seed: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        """
        Args:
            sizes: number of items of each dataset, in concatenation order.
            probs: probability of drawing each dataset (see :func:`dataset_sampling_weights`).
            seed: seed of the stream, identical on every rank; ``None`` draws one shared by all ranks
                (``comm.shared_random_seed``).
            rank, world_size: default to the current process group's.
        """
        if len(sizes) != len(probs) or not len(sizes):
            raise ValueError(f"WeightedDatasetSampler: {len(sizes)} sizes for {len(probs)} probabilities")
        if any(int(s) <= 0 for s in sizes):
            raise ValueError(f"WeightedDatasetSampler: every dataset needs items, got sizes {list(sizes)}")
        probs = np.asarray(probs, dtype=np.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"WeightedDatasetSampler: invalid probabilities {probs.tolist()}")
        self._sizes = [int(s) for s in sizes]
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(np.int64)
        self._probs = probs / probs.sum()
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank = comm.get_rank() if rank is None else int(rank)
        self._world_size = comm.get_world_size() if world_size is None else int(world_size)

    @property
    def probs(self) -> np.ndarray:
        """Probability of each dataset, shape (D,)."""
        return self._probs.copy()

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self):
        rng = np.random.default_rng(self._seed)
        perms = [np.empty(0, dtype=np.int64) for _ in self._sizes]
        positions = [0] * len(self._sizes)
        cdf = np.cumsum(self._probs)
        cdf /= cdf[-1]
        while True:
            # Inverse-CDF draws; searchsorted never selects a dataset of probability 0.
            datasets = np.minimum(np.searchsorted(cdf, rng.random(_CHUNK), side="right"), len(cdf) - 1)
            for d in datasets.tolist():
                if positions[d] == len(perms[d]):
                    perms[d] = rng.permutation(self._sizes[d])
                    positions[d] = 0
                yield int(self._offsets[d] + perms[d][positions[d]])
                positions[d] += 1
