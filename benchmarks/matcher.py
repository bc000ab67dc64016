"""Time of the batched HungarianMatcher relative to an image-by-image reference, at UPv2-like sizes.

Both match the same predictions with the same costs (objectness focal, L1, GIoU, point BCE and dice
on ``--num-points`` points): ``HungarianMatcher.forward`` computes the (B, Q, G_max) costs of the
whole batch and copies them to the host once; ``match_per_image_reference`` computes (Q, G_b) costs
image by image with one host copy each. Ground-truth counts are drawn in [--min-gt, --max-gt] per
image; predicted and ground-truth masks are ``--mask-size`` squared. Calls alternate between the two
and the median time of each is reported, with the ratio reference / batched (> 1: batched faster).
On a CPU there is no device synchronisation to save, so the ratio mostly reflects padding to G_max
and kernel sizes; on a GPU the per-image host copies also stall the device.

    python benchmarks/matcher.py --repeats 3
"""
import argparse
import logging
import statistics

import torch

import up2  # noqa: F401
from _timing import add_device_arguments, apply_threads, timed
from up2.modeling.image_encoder.proposer.matcher import HungarianMatcher, match_per_image_reference

logger = logging.getLogger("up2.benchmarks.matcher")


def make_batch(batch, num_queries, mask_size, min_gt, max_gt, device, gen):
    """Random predictions (B, Q, ...) and B targets with G_b in [min_gt, max_gt]."""
    def boxes(*shape):
        centre = torch.rand(*shape, 2, generator=gen) * 0.8 + 0.1
        return torch.cat([centre, torch.rand(*shape, 2, generator=gen) * 0.3 + 0.02], -1).to(device)

    outputs = {"pred_logits": torch.randn(batch, num_queries, 1, generator=gen).to(device),
               "pred_boxes": boxes(batch, num_queries),
               "pred_masks": torch.randn(batch, num_queries, mask_size, mask_size, generator=gen).to(device)}
    counts = torch.randint(min_gt, max_gt + 1, (batch,), generator=gen).tolist()
    targets = [{"boxes": boxes(n), "masks": (torch.rand(n, mask_size, mask_size, generator=gen) > 0.5).to(device)}
               for n in counts]
    return outputs, targets, counts



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["2x300", "4x300", "8x300", "2x900", "4x900"],
                        help="BxQ pairs (batch size x queries)")
    parser.add_argument("--num-points", type=int, default=112 * 112)
    parser.add_argument("--mask-size", type=int, default=200)
    parser.add_argument("--min-gt", type=int, default=7)
    parser.add_argument("--max-gt", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
    add_device_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_threads(args)
    device = torch.device(args.device)
    matcher = HungarianMatcher(num_points=args.num_points)
    logger.info("device %s, %d threads, %d points, masks %dx%d, G_b in [%d, %d], median of %d calls",
                device, torch.get_num_threads(), args.num_points, args.mask_size, args.mask_size,
                args.min_gt, args.max_gt, args.repeats)
    logger.info("%4s %5s %-22s %12s %14s %7s", "B", "Q", "G_b", "batched ms", "per-image ms", "ratio")
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        batch, num_queries = (int(v) for v in size.lower().split("x"))
        outputs, targets, counts = make_batch(batch, num_queries, args.mask_size, args.min_gt, args.max_gt,
                                              device, gen)
        # same points for both implementations
        points = matcher.random_points(batch, device, torch.Generator().manual_seed(1))
        batched, reference = [], []
        matcher(outputs, targets, point_coords=points)  # warm-up
        for _ in range(args.repeats):
            batched.append(timed(lambda: matcher(outputs, targets, point_coords=points), device))
            reference.append(timed(lambda: match_per_image_reference(matcher, outputs, targets, point_coords=points),
                                   device))
        a, r = statistics.median(batched) * 1e3, statistics.median(reference) * 1e3
        logger.info("%4d %5d %-22s %12.1f %14.1f %6.2fx", batch, num_queries, ",".join(map(str, counts)), a, r, r / a)
        del outputs, targets


if __name__ == "__main__":
    main()
