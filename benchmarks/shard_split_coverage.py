"""How evenly tar-shard samples are drawn when shards are split over ranks x DataLoader workers:
webdataset's ``split_by_node`` + ``split_by_worker`` (the shard list reshuffled every epoch, the same
permutation on every rank) against up2's :func:`up2.data.shards.worker_shard_slices` (slots rotating
every epoch, shards shared by workers when there are fewer shards than workers).

Training draws batches from every worker in turn, so every worker delivers the same number of samples
whatever its share of shards. The script streams ``--epochs`` datasets' worth of samples that way and
prints, per scheme: the workers that get no shard at all (an endless stream that never yields: the run
hangs), the samples never drawn, and the ratio of the most to the least drawn sample (1.0 is even).
No tar is read: only the shard sizes matter.

    python benchmarks/shard_split_coverage.py --ranks 2 --workers 2 --epochs 4
"""
import argparse
import os
import sys
from contextlib import contextmanager

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SCENARIOS = {  # name -> shard sizes (img2dataset shards hold their download successes: unequal)
    "5 equal shards": [1000] * 5,
    "3 equal shards": [1000] * 3,
    "6 img2dataset-like shards": [950, 980, 700, 990, 960, 970],
}


@contextmanager
def _worker_env(rank, world_size, worker, num_workers):
    keys = {"RANK": rank, "WORLD_SIZE": world_size, "WORKER": worker, "NUM_WORKERS": num_workers}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(v) for k, v in keys.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def webdataset_epoch(sizes, epoch, rank, world_size, worker, num_workers):
    """[(shard, k, r)] read by one worker in one epoch with webdataset's splitters."""
    import webdataset as wds

    order = np.random.default_rng([0, epoch]).permutation(len(sizes)).tolist()
    with _worker_env(rank, world_size, worker, num_workers):
        return [(s, 1, 0) for s in wds.split_by_worker(wds.split_by_node(iter(order)))]


def up2_epoch(sizes, epoch, rank, world_size, worker, num_workers):
    from up2.data.shards import worker_shard_slices

    total, g = world_size * num_workers, rank * num_workers + worker
    order = np.random.default_rng([0, epoch]).permutation(len(sizes))
    return worker_shard_slices(order, (g + epoch) % total, total)


def draw_counts(scheme, sizes, ranks, workers, epochs):
    """Times each sample is drawn, and the workers without any shard."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    counts = np.zeros(int(offsets[-1]), dtype=np.int64)
    per_worker = epochs * int(offsets[-1]) // (ranks * workers)
    starved = 0
    for rank in range(ranks):
        for worker in range(workers):
            drawn, epoch = 0, 0
            while drawn < per_worker:
                slices = scheme(sizes, epoch, rank, ranks, worker, workers)
                if epoch > 10 * epochs and drawn == 0:
                    starved += 1
                    break
                for shard, k, r in slices:
                    ids = np.arange(offsets[shard], offsets[shard + 1])[r::k][:per_worker - drawn]
                    counts[ids] += 1
                    drawn += len(ids)
                epoch += 1
    return counts, starved


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--epochs", type=int, default=4, help="dataset sizes' worth of samples drawn")
    args = parser.parse_args()
    print(f"{args.ranks} ranks x {args.workers} workers, {args.epochs} epochs' worth of samples drawn")
    for name, sizes in SCENARIOS.items():
        for label, scheme in (("webdataset", webdataset_epoch), ("up2", up2_epoch)):
            counts, starved = draw_counts(scheme, sizes, args.ranks, args.workers, args.epochs)
            seen = counts[counts > 0]
            ratio = seen.max() / seen.min() if len(seen) else float("nan")
            print(f"{name:28s} {label:11s} workers without shards: {starved}/{args.ranks * args.workers}  "
                  f"samples never drawn: {int((counts == 0).sum())}/{len(counts)}  most/least drawn: {ratio:.2f}")


if __name__ == "__main__":
    main()
