#!/usr/bin/env python
"""A plain image classifier on the classification task of a UPv2 config: how fast does the data teach
a from-scratch network WITHOUT any of UPv2 (no proposer, decoder, text, similarity head)?

    python tools/reference_classifier.py --config-file configs/shapes/up2_multitask_R18.yaml \\
        --iters 300 [--net backbone|small_bn] [--lr 1e-3] [KEY VALUE ...]

``backbone``: the config's own image backbone (``MODEL.BACKBONE``, e.g. the ResNet-18 GN of the shapes
demo), global average pooling of its last feature map, a linear layer; ``small_bn``: eight 3x3 conv +
BatchNorm + ReLU layers (32-256 channels), the same head. Both train with AdamW on the task's own train
loader (same mapper, crops, batch size) with cross-entropy, then report top-1 on the task's test
dataset. This is the yardstick for ``tools/single_task_training.py``: if the plain network does not
learn within N iterations either, the data and the budget are the limit, not UPv2's formulation.
Prints one JSON line.
"""
import argparse
import json
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import up2  # noqa: F401  (before detectron2)
import up2.data  # noqa: F401
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_backbone

from up2.config import load_config, get_task_entries
from up2.data.build import build_task_test_loader, build_task_train_loader
from up2.modeling.preprocessing import batch_images


def small_bn_net() -> nn.Module:
    layers, channels = [], 3
    for width in (32, 64, 128, 256):
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class PlainClassifier(nn.Module):
    """features (B, C, h, w) -> mean over h, w -> linear -> (B, num_classes) logits."""

    def __init__(self, cfg, net: str, num_classes: int):
        super().__init__()
        if net == "backbone":
            self.backbone = build_backbone(cfg)
            last = self.backbone._out_features[-1]
            self.features = lambda x: self.backbone(x)[last]
            width = self.backbone.output_shape()[last].channels
        elif net == "small_bn":
            self.backbone = small_bn_net()
            self.features = self.backbone
            width = 256
        else:
            raise ValueError(f"--net must be 'backbone' or 'small_bn', got {net!r}")
        self.classifier = nn.Linear(width, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, batched_inputs):
        images, _ = batch_images(batched_inputs, self.pixel_mean, self.pixel_std, 32)
        return self.classifier(self.features(images.tensor).mean((2, 3)))


def run(cfg, net: str, iters: int, lr: float, task_name: str = "", window: int = 20, seed: int = 0) -> dict:
    entries = [e for e in get_task_entries(cfg) if e.type == "classification" and (not task_name or e.name == task_name)]
    if not entries:
        raise KeyError(f"No classification task {task_name!r} in DATASETS.UP2.TASKS")
    entry = entries[0]
    torch.manual_seed(seed)
    train_loader = iter(build_task_train_loader(cfg, entry))
    first = next(train_loader)
    num_classes = len(MetadataCatalog.get(entry.train_datasets[0]).thing_classes)
    model = PlainClassifier(cfg, net, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    losses, start, batch = [], time.perf_counter(), first
    model.train()
    for _ in range(iters):
        labels = torch.tensor([int(x["label"]) for x in batch])
        loss = F.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        batch = next(train_loader)
    seconds = (time.perf_counter() - start) / iters
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for name in entry.test_datasets:
            for batch in build_task_test_loader(cfg, name, "classification"):
                labels = torch.tensor([int(x["label"]) for x in batch])
                correct += int((model(batch).argmax(1) == labels).sum())
                total += len(batch)
    window = min(window, len(losses))
    return {"net": net, "iters": iters, "lr": lr, "first_loss": round(sum(losses[:window]) / window, 4),
            "last_loss": round(sum(losses[-window:]) / window, 4),
            "test_top1": round(100.0 * correct / max(total, 1), 2), "test_images": total,
            "seconds_per_iter": round(seconds, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--net", default="backbone", choices=("backbone", "small_bn"))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--task", default="", help="NAME of the classification entry (default: the first)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    result = run(cfg, args.net, args.iters, args.lr, args.task)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
