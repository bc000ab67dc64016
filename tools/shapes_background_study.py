#!/usr/bin/env python
"""How much of the `shapes` classification difficulty is the background? A plain from-scratch CNN, the
same for every variant, trained for the same wall-clock budget on the classification images with

* ``textured``: the images as ``python -m up2.data.shapes`` renders them (before its JPEG encoding):
  gradient, noisy, striped or checkered backgrounds of two close muted colours (spec version 2);
* ``vivid``: the same shapes drawn the way spec version 1 did, on textures of two independent colours,
  half the time taken from the shapes' own hues (not the same images: the background is drawn first);
* ``plain``: the same shapes (same masks, colours, distractors) on one random colour per image;
* ``gray``: the same shapes on neutral gray (128, 128, 128) in every image.

    python tools/shapes_background_study.py --seconds 150 [--size 64] [--num-train 1000] [--num-val 200]

Images are rendered in memory by the generator (``render_classification_image``, seed 0) at 128 px
and resized to ``--size``; the network is ``reference_classifier.small_bn_net`` + a linear layer,
AdamW (lr 3e-3), batch 32, horizontal flips. Prints one JSON line per variant with the iterations
done and the validation top-1 (%). Measured on the 2-core CPU: see the README ("What make demo
produces").
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_classifier import small_bn_net  # noqa: E402

from up2.data.shapes import load_spec, render_classification_image  # noqa: E402

VARIANTS = ("textured", "vivid", "plain", "gray")
RENDER_SIZE = 128


def render_split(split_id: int, count: int, variant: str, size: int, spec: dict):
    """(count, 3, size, size) float images normalised to about [-2, 2] and (count,) labels (i % C)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown background variant {variant!r}; expected one of {list(VARIANTS)}")
    num_classes = len(spec["categories"])
    recolor = np.random.default_rng([0, split_id])
    images, labels = [], []
    for index in range(count):
        label = index % num_classes
        style_spec = {**spec, "background_style": "vivid"} if variant == "vivid" else spec
        sample = render_classification_image(0, split_id, index, label, RENDER_SIZE, style_spec)
        image = sample.image
        if variant in ("plain", "gray"):
            shapes = np.any([instance.mask for instance in sample.instances], axis=0)
            fill = recolor.integers(0, 256, 3) if variant == "plain" else np.full(3, 128)
            image = np.where(shapes[..., None], image, fill.astype(np.uint8))
        images.append(np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)))
        labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25, torch.tensor(labels)


def train_and_evaluate(train, val, num_classes: int, seconds: float, seed: int = 0) -> dict:
    """Trains small_bn_net + linear for ``seconds`` of wall clock; returns iterations and val top-1 (%)."""
    torch.manual_seed(seed)
    net = nn.Sequential(small_bn_net(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    (x_train, y_train), (x_val, y_val) = train, val
    generator = torch.Generator().manual_seed(seed)
    iterations, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        index = torch.randint(0, len(x_train), (32,), generator=generator)
        flip = torch.rand(32, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x_train[index].flip(3), x_train[index])
        loss = F.cross_entropy(net(x), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iterations += 1
    net.eval()
    with torch.no_grad():
        top1 = float((net(x_val).argmax(1) == y_val).float().mean()) * 100
    return {"iterations": iterations, "val_top1": round(top1, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="training wall clock per variant")
    parser.add_argument("--size", type=int, default=64, help="input resolution of the CNN")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    spec = load_spec()
    for variant in args.variants:
        train = render_split(0, args.num_train, variant, args.size, spec)
        val = render_split(1, args.num_val, variant, args.size, spec)
        result = train_and_evaluate(train, val, len(spec["categories"]), args.seconds)
        print(json.dumps({"variant": variant, "seconds": args.seconds, "size": args.size,
                          "num_train": args.num_train, **result}), flush=True)


if __name__ == "__main__":
    main()
