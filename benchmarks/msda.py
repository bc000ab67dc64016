"""Multi-scale deformable attention: every available implementation against the per-level
``F.grid_sample`` loop (``ms_deform_attn_grid_sample_reference``), measured in the same run.

Shapes (UPv2 / MaskDINO region proposer, an 800x1216 image, 4 levels at strides 8-64, M=8, D=32, P=4):
  encoder: N=2, Lq = S (every pixel of every level queries), decoder: N=2, Lq=900.
``--scale`` shrinks the image (the encoder shape is heavy on a CPU: ``--scale 0.5``).
Times are medians of ``--repeat`` interleaved calls after one warm-up; "fwd" runs under no_grad,
"fwd+bwd" back-propagates into value, locations and attention weights. Ratios are reference time /
implementation time (> 1: faster than the reference). Peak memory is the most memory held at once
during one call beyond the inputs (CPU: allocation events of the torch profiler; GPU:
``torch.cuda.max_memory_allocated``).

    python benchmarks/msda.py --device cpu --shapes decoder --repeat 5
    python benchmarks/msda.py --device cuda --dtype bfloat16 --shapes encoder,decoder
"""
import argparse
import logging
import statistics
import time

import torch

import up2  # noqa: F401
from up2.layers import ms_deform_attn, ms_deform_attn_grid_sample_reference, resolve_msda_impl

logger = logging.getLogger("up2.benchmarks.msda")
REFERENCE = "grid_sample loop"


def make_inputs(shape, scale, device, dtype, seed=0):
    """(value, spatial_shapes, level_start_index, locations, weights) for the encoder or decoder shape."""
    height, width = round(800 * scale), round(1216 * scale)
    sizes = [(-(-height // s), -(-width // s)) for s in (8, 16, 32, 64)]
    spatial_shapes = torch.tensor(sizes, dtype=torch.long, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_values = int(areas.sum())
    n, m, d, levels, points = 2, 8, 32, 4, 4
    queries = num_values if shape == "encoder" else 900
    gen = torch.Generator().manual_seed(seed)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(n, num_values, m, d, generator=gen).to(device, dtype)
    locations = (torch.rand(n, queries, m, levels, points, 2, generator=gen) * 1.1 - 0.05).to(device, coord)
    weights = torch.rand(n, queries, m, levels, points, generator=gen).softmax(-1).to(device, coord)
    return (value, spatial_shapes, level_start_index, locations, weights), sizes


def implementations(device, requested):
    impls = {REFERENCE: ms_deform_attn_grid_sample_reference}
    for impl in ("pytorch", "triton", "cuda"):
        if requested and impl not in requested:
            continue
        try:
            resolve_msda_impl(impl, device)
        except Exception as error:  # noqa: BLE001 - unavailable here: say why and go on
            logger.info("skipping %s: %s", impl, error)
            continue
        if impl == "triton" and device.type != "cuda" and not requested:
            logger.info("skipping triton: the CPU interpreter is far too slow for these shapes (ask --impls triton)")
            continue
        impls[impl] = lambda *a, _impl=impl: ms_deform_attn(*a, impl=_impl)
    return impls


def run_once(fn, inputs, backward):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return out


def timed(fn, inputs, backward, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run_once(fn, inputs, backward)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(fn, inputs, backward, device):
    """Bytes held at the worst moment of one call, beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once(fn, inputs, backward)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once(fn, inputs, backward)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--shapes", default="encoder,decoder", help="comma-separated subset of encoder,decoder")
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor (1.0: 800x1216)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per implementation and mode")
    parser.add_argument("--impls", default="", help="comma-separated subset of pytorch,triton,cuda (default: "
                        "every one available on the device)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    requested = [i for i in args.impls.split(",") if i]
    impls = implementations(device, requested)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"multi-scale deformable attention, {device_name}, {args.dtype}, torch {torch.__version__}, "
          f"median of {args.repeat}; ratio = {REFERENCE} time / implementation time")
    header = f"{'shape':9} {'implementation':17} {'fwd ms':>9} {'ratio':>6} {'fwd+bwd ms':>11} {'ratio':>6} " \
             f"{'peak fwd MiB':>13} {'peak fwd+bwd MiB':>17}"
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in ("encoder", "decoder"):
            parser.error(f"--shapes: unknown shape {shape!r}, expected encoder and/or decoder")
        inputs, sizes = make_inputs(shape, args.scale, device, dtype)
        print(f"\n{shape}: N=2, Lq={inputs[3].shape[1]}, S={inputs[0].shape[1]} (levels {sizes}), M=8, D=32, L=4, P=4")
        print(header)
        times = {(name, bwd): [] for name in impls for bwd in (False, True)}
        for backward in (False, True):
            for fn in impls.values():
                run_once(fn, inputs, backward)  # warm-up (Triton compilation, allocator)
            for _ in range(args.repeat):
                for name, fn in impls.items():
                    times[(name, backward)].append(timed(fn, inputs, backward, device))
        ref = {bwd: statistics.median(times[(REFERENCE, bwd)]) for bwd in (False, True)}
        for name, fn in impls.items():
            fwd, both = (statistics.median(times[(name, bwd)]) for bwd in (False, True))
            mem_fwd, mem_both = (peak_memory(fn, inputs, bwd, device) / 2**20 for bwd in (False, True))
            print(f"{shape:9} {name:17} {fwd * 1e3:9.1f} {ref[False] / fwd:6.2f} {both * 1e3:11.1f} "
                  f"{ref[True] / both:6.2f} {mem_fwd:13.1f} {mem_both:17.1f}")


if __name__ == "__main__":
    main()
