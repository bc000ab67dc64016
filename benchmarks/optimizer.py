"""Step time of MTAdamW relative to ``torch.optim.AdamW(foreach=True)`` on UPv2-sized parameters.

The parameter list mimics a UPv2 R-50 model (≈410M elements at ``--scale 1``): ResNet-50 convs,
a 6-layer deformable encoder and decoder at d=256, RoBERTa-base, and a 6-layer BERT-base unified
decoder whose FFNs are 8-expert MoE. ``--scale`` multiplies every width by sqrt(scale), so the
element count shrinks by ``scale`` while the number of tensors stays the same. Both optimizers
update the same tensors with random gradients (all parameters have a gradient), alternating step
by step; the script prints the median step time of each and the median per-step ratio.

    python benchmarks/optimizer.py --scale 0.1 --steps 7 --device cpu
"""
import argparse
import logging
import math
import statistics
import time

import torch

import up2  # noqa: F401
from _timing import add_device_arguments, apply_threads
from up2.solver import MTAdamW

logger = logging.getLogger("up2.benchmarks.optimizer")


def upv2_r50_shapes(scale: float = 1.0):
    """List of parameter shapes of a UPv2 R-50 model, widths multiplied by sqrt(scale)."""
    f = math.sqrt(scale)

    def w(n):
        return max(1, int(round(n * f)))

    shapes = []

    def linear(i, o, bias=True):
        shapes.append((w(o), w(i)))
        if bias:
            shapes.append((w(o),))

    def norm(c):
        shapes.extend([(w(c),), (w(c),)])

    def conv(i, o, k):
        shapes.append((w(o), w(i), k, k))
        norm(o)

    # ResNet-50 (stem + 4 stages of bottlenecks), ≈ 23.5M
    conv(3, 64, 7)
    cin = 64
    for blocks, mid, out in ((3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)):
        for b in range(blocks):
            conv(cin, mid, 1)
            conv(mid, mid, 3)
            conv(mid, out, 1)
            if b == 0:
                conv(cin, out, 1)
            cin = out
    # region proposer at d=256: input projections, 6 deformable encoder + 6 decoder layers, heads
    d, ffn = 256, 2048
    for c in (512, 1024, 2048):
        conv(c, d, 1)
    conv(2048, d, 3)
    shapes.append((4, w(d)))  # level_embed

    def deform_attn():
        linear(d, 8 * 4 * 4 * 2)  # sampling offsets
        linear(d, 8 * 4 * 4)  # attention weights
        linear(d, d)  # value projection
        linear(d, d)  # output projection

    for _ in range(6):
        deform_attn()
        norm(d)
        linear(d, ffn)
        linear(ffn, d)
        norm(d)
    for _ in range(6):
        shapes.extend([(w(3 * d), w(d)), (w(3 * d),)])  # self-attention in-projection
        linear(d, d)
        norm(d)
        deform_attn()
        norm(d)
        linear(d, ffn)
        linear(ffn, d)
        norm(d)
        for _ in range(3):  # box / mask / objectness MLP layers per decoder layer
            linear(d, d)
    # RoBERTa-base text encoder, ≈ 125M
    h, inter = 768, 3072
    shapes.extend([(w(50265), w(h)), (w(514), w(h)), (1, w(h))])
    norm(h)
    for _ in range(12):
        for _ in range(4):
            linear(h, h)
        norm(h)
        linear(h, inter)
        linear(inter, h)
        norm(h)
    # unified decoder: 6 BERT-base layers, FFN = 8-expert MoE
    for _ in range(6):
        for _ in range(4):
            linear(h, h)
        norm(h)
        linear(h, 8, bias=False)  # gate
        for _ in range(8):
            linear(h, inter)
            linear(inter, h)
        norm(h)
    return shapes


def time_interleaved(optimizers, params, steps, warmup):
    """Median wall time (seconds) of each optimizer's step, steps alternating between optimizers
    so that load from other processes affects all of them alike; also the median per-round ratio
    of each optimizer's time to the first one's."""
    sync = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
    times = [[] for _ in optimizers]
    for i in range(warmup + steps):
        for k, optimizer in enumerate(optimizers):
            if hasattr(optimizer, "set_task"):
                optimizer.set_task(0.3, 1.0)
            sync()
            start = time.perf_counter()
            optimizer.step()
            sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    ratios = [statistics.median(a / b for a, b in zip(t, times[0])) for t in times]
    return medians, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="element-count factor (0, 1]")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer")
    add_device_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_threads(args)

    shapes = upv2_r50_shapes(args.scale)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(args.device))
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(args.device)
    numel = sum(p.numel() for p in params)
    logger.info("UPv2 R-50-like parameters: %d tensors, %.1fM elements, device %s, %d threads",
                len(params), numel / 1e6, args.device, torch.get_num_threads())

    # both optimizers act on the same tensors (values drift; timing does not depend on them)
    groups = [{"params": params[::2], "lr": 1e-4}, {"params": params[1::2], "lr": 1e-5}]
    adamw = torch.optim.AdamW([dict(g) for g in groups], lr=1e-4, weight_decay=1e-4, foreach=True)
    mt = MTAdamW([dict(g) for g in groups], lr=1e-4, weight_decay=1e-4)
    (t_adamw, t_mt), (_, ratio) = time_interleaved([adamw, mt], params, args.steps, args.warmup)
    logger.info("AdamW(foreach=True) %.1f ms | MTAdamW %.1f ms | ratio %.2fx (MTAdamW / AdamW: "
                "median of %d interleaved steps; ratio of medians %.2fx; scale %g)",
                t_adamw * 1e3, t_mt * 1e3, ratio, args.steps, t_mt / t_adamw, args.scale)

if __name__ == "__main__":
    main()
