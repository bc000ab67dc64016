"""Time of the attribute-routed conditional MoE FFN relative to a dense FFN at equal tokens.

Each of the B sequences has 2-4 segments drawn from a handful of attribute combinations (an image
segment and text segments of a few tasks), so a batch holds a few distinct routings. Both layers see
the same (B, T, d) input in training mode; the script alternates them and prints the median time of
forward (under ``no_grad``) and of forward+backward, and their ratios (MoE / dense).

* MoE: :class:`~up2.modeling.moe.ConditionalMoEFFN` (E experts of width ffn, top-k, weight-space mixing),
  called with a :class:`~up2.modeling.moe.RoutingPlan` built once per batch, outside the timed region, as
  the unified decoder does (one plan shared by all its layers).
* Dense reference: :class:`~up2.modeling.moe.FFN`, i.e. ``nn.Linear(d, ffn)`` -> GELU -> dropout ->
  ``nn.Linear(ffn, d)`` -> dropout, with the same width and dropout probability as the experts.

Workload. The weight-space work (mixing the experts, folding gradients back) is fixed per step while the
token work grows with the tokens, so the ratio falls as a step holds more tokens. The default is one
per-GPU step of the paper configuration: 28 sequences (``BATCH_SIZE`` of classification / retrieval in
``configs/Base-UP2.yaml``) of 288 tokens (an image at 224 px: ``<SPE>`` + 10 pooled + 7 x 7 flattened +
200 regional tokens, plus a caption of up to 28 tokens), with segments from 5 attribute combinations, more
distinct routings than a one-task step has. ``--batch 8 --length 256`` is a small step (2048 tokens).

Each forward+backward starts from ``zero_grad(set_to_none=True)`` on the layer and the input, as a
training step does (``--accumulate-grads`` keeps accumulating into existing ``.grad`` instead).

    python benchmarks/moe.py --batch 28 --length 288 --dim 768 --ffn 3072 --repeats 9 --device cpu
"""
import argparse
import logging
import statistics

import torch

import up2  # noqa: F401
from _timing import add_device_arguments, apply_threads, timed
from up2.modeling.moe import (
    FFN, MODALITY_IMAGE, MODALITY_TEXT, SIDE_INPUT, SIDE_TARGET, ConditionalMoEFFN, build_routing_plan,
    make_attributes,
)

logger = logging.getLogger("up2.benchmarks.moe")

COMBINATIONS = [
    make_attributes("captioning", MODALITY_IMAGE, SIDE_INPUT, False),
    make_attributes("captioning", MODALITY_TEXT, SIDE_INPUT, True),
    make_attributes("retrieval", MODALITY_IMAGE, SIDE_INPUT, False),
    make_attributes("retrieval", MODALITY_TEXT, SIDE_TARGET, False),
    make_attributes("classification", MODALITY_TEXT, SIDE_TARGET, False),
    # only used with --combinations 6 / 7
    make_attributes("mlm", MODALITY_TEXT, SIDE_INPUT, False),
    make_attributes("detection", MODALITY_IMAGE, SIDE_INPUT, False),
]


def make_segments(batch: int, length: int, generator: torch.Generator, combinations: int = 5):
    """(B, 4, A) attributes and (B, T) segment ids: 2-4 contiguous segments of random length per sequence,
    attributes drawn from the first ``combinations`` entries of COMBINATIONS."""
    choices = torch.tensor(COMBINATIONS[:combinations])
    attrs = choices[torch.randint(len(choices), (batch, 4), generator=generator)]
    seg = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        num = int(torch.randint(2, 5, (1,), generator=generator))
        cuts = torch.randperm(length - 1, generator=generator)[:num - 1].add(1).sort().values
        for s, cut in enumerate(cuts.tolist()):
            seg[b, cut:] = s + 1
    return attrs, seg


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=28, help="sequences per step (see Workload)")
    parser.add_argument("--length", type=int, default=288, help="tokens per sequence (see Workload)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--combinations", type=int, default=5, choices=range(1, len(COMBINATIONS) + 1),
                        help="attribute combinations drawn from (bounds the number of distinct routings)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout of both layers")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--accumulate-grads", action="store_true",
                        help="accumulate into existing .grad instead of starting each step from none")
    add_device_arguments(parser, default_device="cpu")
    args = parser.parse_args()
    apply_threads(args)
    logging.basicConfig(level=logging.INFO)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    attrs, seg = make_segments(args.batch, args.length, generator, args.combinations)
    attrs, seg = attrs.to(device), seg.to(device)
    moe = ConditionalMoEFFN(args.dim, args.ffn, num_experts=args.experts, top_k=args.top_k,
                            dropout=args.dropout).to(device).train()
    dense = FFN(args.dim, args.ffn, dropout=args.dropout).to(device).train()
    x = torch.randn(args.batch, args.length, args.dim, device=device, requires_grad=True)
    plan = build_routing_plan(attrs, seg)
    logger.info("%d tokens, %d distinct routings, group sizes %s", x.shape[0] * x.shape[1],
                len(plan.counts), plan.counts)

    def forward(layer):
        with torch.no_grad():
            layer(x, plan=plan)

    def forward_backward(layer):
        if not args.accumulate_grads:
            layer.zero_grad(set_to_none=True)
            x.grad = None
        y, aux = layer(x, plan=plan)
        (y.square().mean() + aux).backward()

    results = {}
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        times = {"moe": [], "dense": []}
        for _ in range(2):  # warm-up
            fn(moe), fn(dense)
        for _ in range(args.repeats):
            times["moe"].append(timed(lambda: fn(moe), device))
            times["dense"].append(timed(lambda: fn(dense), device))
        moe_t, dense_t = statistics.median(times["moe"]), statistics.median(times["dense"])
        results[name] = (moe_t, dense_t, moe_t / dense_t)
    threads = torch.get_num_threads()
    for name, (moe_t, dense_t, ratio) in results.items():
        print(f"{name}: MoE {moe_t * 1e3:.1f} ms, dense FFN {dense_t * 1e3:.1f} ms, ratio {ratio:.3f} "
              f"(B={args.batch} T={args.length} d={args.dim} ffn={args.ffn} E={args.experts} k={args.top_k}, "
              f"{len(plan.counts)} routings, {device}, {threads} threads)")


if __name__ == "__main__":
    main()
