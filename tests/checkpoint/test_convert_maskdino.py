"""Weight conversion from MaskDINO: names land on the right up2 parameters, reordered where the layouts differ
(encoder levels, box-embedding coordinates, decoder norms); the command line's report."""
import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import up2.modeling  # noqa: F401
from up2.checkpoint import AtomicCheckpointer
from up2.checkpoint.conversion import compare_with_model, convert_state_dict
from up2.checkpoint.convert import main
from up2.config import add_up2_config
from up2.layers import MSDeformAttn
from up2.modeling.image_encoder.position_encoding import sine_encoding_of_coordinates

D, HEADS, LEVELS, POINTS, FFN, MASK_DIM, DEC_LAYERS, CLASSES = 64, 4, 4, 4, 256, 64, 3, 7
CHANNELS = (64, 128, 256, 512)  # ResNet-18: res2..res5


def _maskdino_state_dict(backbone_state, order, seed=0):
    """A MaskDINO checkpoint as its modules name it (MaskDINOEncoder + MaskDINODecoder, TWO_STAGE,
    NUM_FEATURE_LEVELS 3 + 1 downsampled level, NORM GN), at the sizes of the R18 shapes config."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"backbone." + k: v.clone() for k, v in backbone_state.items()}
    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."

    def linear(name, out_features, in_features):
        sd[name + ".weight"], sd[name + ".bias"] = r(out_features, in_features), r(out_features)

    def layer_norm(name):
        sd[name + ".weight"], sd[name + ".bias"] = r(D), r(D)

    def deform_attn(name):
        linear(name + ".sampling_offsets", HEADS * LEVELS * POINTS * 2, D)
        linear(name + ".attention_weights", HEADS * LEVELS * POINTS, D)
        linear(name + ".value_proj", D, D)
        linear(name + ".output_proj", D, D)

    encoder_inputs = CHANNELS[1:] if order == "low2high" else CHANNELS[1:][::-1]
    for j, channels in enumerate(encoder_inputs):
        sd[pd + f"input_proj.{j}.0.weight"], sd[pd + f"input_proj.{j}.0.bias"] = r(D, channels, 1, 1), r(D)
        layer_norm(pd + f"input_proj.{j}.1")
    sd[pd + "input_proj.3.0.weight"], sd[pd + "input_proj.3.0.bias"] = r(D, CHANNELS[-1], 3, 3), r(D)
    layer_norm(pd + "input_proj.3.1")
    sd[pd + "transformer.level_embed"] = r(LEVELS, D)
    deform_attn(pd + "transformer.encoder.layers.0.self_attn")
    layer_norm(pd + "transformer.encoder.layers.0.norm1")
    linear(pd + "transformer.encoder.layers.0.linear1", FFN, D)
    linear(pd + "transformer.encoder.layers.0.linear2", D, FFN)
    layer_norm(pd + "transformer.encoder.layers.0.norm2")
    sd[pd + "adapter_1.weight"] = r(D, CHANNELS[0], 1, 1)  # Detectron2 Conv2d with GN: no bias
    layer_norm(pd + "adapter_1.norm")
    sd[pd + "layer_1.weight"] = r(D, D, 3, 3)
    layer_norm(pd + "layer_1.norm")
    sd[pd + "mask_features.weight"], sd[pd + "mask_features.bias"] = r(MASK_DIM, D, 1, 1), r(MASK_DIM)

    linear(pr + "enc_output", D, D)
    layer_norm(pr + "enc_output_norm")
    linear(pr + "class_embed", CLASSES, D)
    sd[pr + "label_enc.weight"] = r(CLASSES, D)
    for k, (out_f, in_f) in enumerate([(D, D), (D, D), (MASK_DIM, D)]):
        linear(pr + f"mask_embed.layers.{k}", out_f, in_f)
    layer_norm(pr + "decoder_norm")
    sd[pr + "decoder.norm.weight"], sd[pr + "decoder.norm.bias"] = sd[pr + "decoder_norm.weight"], sd[
        pr + "decoder_norm.bias"]
    for k, (out_f, in_f) in enumerate([(D, D), (D, D), (4, D)]):  # one box MLP shared by all layers
        linear(pr + f"_bbox_embed.layers.{k}", out_f, in_f)
        for i in range(DEC_LAYERS):
            for owner in ("bbox_embed", "decoder.bbox_embed"):
                for p in ("weight", "bias"):
                    sd[pr + f"{owner}.{i}.layers.{k}.{p}"] = sd[pr + f"_bbox_embed.layers.{k}.{p}"]
    linear(pr + "decoder.ref_point_head.layers.0", D, 2 * D)
    linear(pr + "decoder.ref_point_head.layers.1", D, D)
    for i in range(DEC_LAYERS):
        layer = pr + f"decoder.layers.{i}."
        deform_attn(layer + "cross_attn")
        layer_norm(layer + "norm1")
        sd[layer + "self_attn.in_proj_weight"], sd[layer + "self_attn.in_proj_bias"] = r(3 * D, D), r(3 * D)
        linear(layer + "self_attn.out_proj", D, D)
        layer_norm(layer + "norm2")
        linear(layer + "linear1", FFN, D)
        linear(layer + "linear2", D, FFN)
        layer_norm(layer + "norm3")
    sd["criterion.empty_weight"] = torch.ones(CLASSES + 1)
    return sd


MASKDINO_CLASS_HEADS = ["sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias",
                        "sem_seg_head.predictor.label_enc.weight", "criterion.empty_weight"]
# up2 parameters with no MaskDINO counterpart: binary objectness heads, DN label embedding, the mask
# branch's H convolution on F1_enc, the fusion layers, and the query embeddings (LEARN_TGT: False).
UP2_ONLY = sorted(f"proposer.{k}" for k in [
    "query_selection.objectness.weight", "query_selection.objectness.bias", "query_selection.query_embed.weight",
    "decoder.objectness_head.weight", "decoder.objectness_head.bias", "decoder.label_embed.weight",
    "mask_branch.lateral.0.weight", "mask_branch.lateral.0.bias", "mask_branch.lateral.1.weight",
    "mask_branch.lateral.1.bias", "fusion.box_proj.weight", "fusion.box_proj.bias", "fusion.mask_proj.weight",
    "fusion.mask_proj.bias"])
CONFIG = "configs/shapes/proposal_detector_R18.yaml"


@pytest.fixture(scope="module")
def proposal_detector():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.DEVICE, cfg.MODEL.UP2.MSDA_IMPL = "cpu", "pytorch"
    assert (cfg.MODEL.UP2.PROPOSER.HIDDEN_DIM, cfg.MODEL.UP2.PROPOSER.NHEADS) == (D, HEADS)
    return build_model(cfg).eval()


@pytest.mark.parametrize("order", ["high2low", "low2high"])
def test_maskdino_names_land_on_up2_parameters(proposal_detector, order):
    backbone_state = {k[len("backbone."):]: v for k, v in proposal_detector.state_dict().items()
                      if k.startswith("backbone.")}
    source = _maskdino_state_dict(backbone_state, order)
    converted, unmatched = convert_state_dict("maskdino", source, prefix="", num_heads=HEADS)
    assert unmatched == MASKDINO_CLASS_HEADS
    result = proposal_detector.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == UP2_ONLY

    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    same = {  # MaskDINO name -> up2 name, value unchanged
        pd + "transformer.encoder.layers.0.self_attn.value_proj.weight": "encoder.layers.0.self_attn.value_proj.weight",
        pd + "transformer.encoder.layers.0.linear1.weight": "encoder.layers.0.linear1.weight",
        pd + "transformer.encoder.layers.0.norm2.bias": "encoder.layers.0.norm2.bias",
        pd + "input_proj.3.0.weight": "input_projection.extra.0.0.weight",
        pd + "input_proj.3.1.bias": "input_projection.extra.0.1.bias",
        pd + "adapter_1.weight": "input_projection.lateral.0.0.weight",
        pd + "adapter_1.norm.weight": "input_projection.lateral.0.1.weight",
        pd + "layer_1.weight": "mask_branch.refine.0.weight",
        pd + "layer_1.norm.bias": "mask_branch.refine.1.bias",
        pd + "mask_features.weight": "mask_branch.refine.3.weight",
        pr + "decoder.layers.0.cross_attn.output_proj.weight": "decoder.layers.0.cross_attn.output_proj.weight",
        pr + "decoder.layers.0.self_attn.in_proj_weight": "decoder.layers.0.self_attn.in_proj_weight",
        pr + "decoder.layers.0.norm2.weight": "decoder.layers.0.norm1.weight",  # after self-attention
        pr + "decoder.layers.0.norm1.weight": "decoder.layers.0.norm2.weight",  # after cross-attention
        pr + "decoder.layers.2.norm3.bias": "decoder.layers.2.norm3.bias",
        pr + "decoder.layers.1.linear2.weight": "decoder.layers.1.linear2.weight",
        pr + "decoder.ref_point_head.layers.1.weight": "decoder.ref_point_head.layers.1.weight",
        pr + "decoder_norm.weight": "decoder.norm.weight",
        pr + "bbox_embed.1.layers.2.weight": "decoder.box_heads.1.layers.2.weight",
        pr + "_bbox_embed.layers.0.bias": "query_selection.box_delta.layers.0.bias",
        pr + "mask_embed.layers.2.weight": "decoder.mask_embed.layers.2.weight",
        pr + "enc_output.weight": "query_selection.enc_output.weight",
        pr + "enc_output_norm.bias": "query_selection.enc_norm.bias",
    }
    # input projections: high2low lists res5, res4, res3; low2high res3, res4, res5
    lateral = {0: 3, 1: 2, 2: 1} if order == "high2low" else {0: 1, 1: 2, 2: 3}
    for j, i in lateral.items():
        same[pd + f"input_proj.{j}.0.weight"] = f"input_projection.lateral.{i}.0.weight"
        same[pd + f"input_proj.{j}.1.weight"] = f"input_projection.lateral.{i}.1.weight"
    state = proposal_detector.state_dict()
    for src, dst in same.items():
        assert torch.equal(state["proposer." + dst], source[src]), (src, dst)
    # GroupNorm convolutions without bias in MaskDINO get zero biases
    assert not state["proposer.input_projection.lateral.0.0.bias"].any()
    assert not state["proposer.mask_branch.refine.0.bias"].any()
    level_embed = source[pd + "transformer.level_embed"]
    expected = level_embed.flip(0) if order == "high2low" else level_embed
    assert torch.equal(state["proposer.encoder.level_embed"], expected)
    assert torch.equal(state["backbone.res4.1.conv2.weight"], source["backbone.res4.1.conv2.weight"])


def _deform_attn(state, prefix):
    attn = MSDeformAttn(D, LEVELS, HEADS, POINTS, impl="pytorch").eval()
    attn.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return attn


def test_maskdino_high2low_attention_reads_levels_in_up2_order(proposal_detector):
    """MaskDINO's deformable attention over levels by decreasing stride = up2's over increasing stride."""
    backbone_state = {k[len("backbone."):]: v for k, v in proposal_detector.state_dict().items()
                      if k.startswith("backbone.")}
    source = _maskdino_state_dict(backbone_state, "high2low", seed=3)
    converted, _ = convert_state_dict("maskdino", source, prefix="", num_heads=HEADS)
    g = torch.Generator().manual_seed(4)
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2)]  # strides 8..64
    maps = [torch.randn(1, h * w, D, generator=g) for h, w in shapes]
    query = torch.randn(1, 5, D, generator=g)
    ref = torch.rand(1, 5, 1, 2, generator=g).expand(-1, -1, LEVELS, -1)

    def run(attn, level_order):
        spatial = torch.tensor([shapes[i] for i in level_order])
        start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
        return attn(query, ref, torch.cat([maps[i] for i in level_order], 1), spatial, start)

    for src, dst in [("sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.",
                      "proposer.encoder.layers.0.self_attn."),
                     ("sem_seg_head.predictor.decoder.layers.1.cross_attn.", "proposer.decoder.layers.1.cross_attn.")]:
        with torch.no_grad():
            maskdino_out = run(_deform_attn(source, src), [3, 2, 1, 0])
            up2_out = run(_deform_attn(converted, dst), [0, 1, 2, 3])
        torch.testing.assert_close(up2_out, maskdino_out, rtol=1e-5, atol=1e-5)


def _dino_box_sine(boxes, num_feats):
    """DINO's box embedding, written independently: (y, x, w, h), each as interleaved sin/cos of
    2 pi c / 10000^(2 floor(i/2) / num_feats)."""
    dim_t = 10000 ** (2 * (torch.arange(num_feats) // 2) / num_feats)
    parts = []
    for c in (boxes[..., 1], boxes[..., 0], boxes[..., 2], boxes[..., 3]):
        angles = c[..., None] * 2 * math.pi / dim_t
        parts.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


def test_maskdino_ref_point_head_reads_up2_box_embedding(proposal_detector):
    backbone_state = {k[len("backbone."):]: v for k, v in proposal_detector.state_dict().items()
                      if k.startswith("backbone.")}
    source = _maskdino_state_dict(backbone_state, "low2high", seed=5)
    converted, _ = convert_state_dict("maskdino", source, prefix="", num_heads=HEADS)
    boxes = torch.rand(2, 7, 4, generator=torch.Generator().manual_seed(6))
    name = "sem_seg_head.predictor.decoder.ref_point_head.layers.0."
    expected = F.linear(_dino_box_sine(boxes, D // 2), source[name + "weight"], source[name + "bias"])
    head = "proposer.decoder.ref_point_head.layers.0."
    actual = F.linear(sine_encoding_of_coordinates(boxes, D // 2), converted[head + "weight"], converted[head + "bias"])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_maskdino_cli_report_lists_missing_model_keys(tmp_path, proposal_detector, caplog):
    backbone_state = {k[len("backbone."):]: v for k, v in proposal_detector.state_dict().items()
                      if k.startswith("backbone.")}
    source, output = tmp_path / "maskdino.pth", tmp_path / "up2.pth"
    torch.save({"model": _maskdino_state_dict(backbone_state, "high2low"), "iteration": 1}, source)
    logger = logging.getLogger("up2.checkpoint.convert")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="up2.checkpoint.convert"):
            main(["--source", "maskdino", "--input", str(source), "--output", str(output), "--prefix", "", "--num-heads", str(HEADS),
                  "--report", "--config-file", CONFIG, "MODEL.UP2.MSDA_IMPL", "pytorch"])
    finally:
        logger.removeHandler(caplog.handler)
    text = caplog.text
    for key in UP2_ONLY + MASKDINO_CLASS_HEADS:
        assert key in text, key
    assert "shape differs" not in text and "does not have" not in text
    saved = torch.load(output, weights_only=True)["model"]
    assert sorted(compare_with_model(saved, proposal_detector)["missing"]) == UP2_ONLY

    # the output declares what it initialises: it loads strictly, the up2-only modules keep their values
    declared = torch.load(output, weights_only=True)["initialised_prefixes"]
    assert "backbone." in declared and not any(key.startswith(tuple(declared)) for key in UP2_ONLY)
    model = copy.deepcopy(proposal_detector)
    AtomicCheckpointer(model).load(str(output))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert all(torch.equal(state[k], proposal_detector.state_dict()[k]) for k in UP2_ONLY)


def test_maskdino_swin_backbone_and_unsupported_layouts(timm_swin, official_swin_checkpoint):
    official = official_swin_checkpoint["model"]
    source = {"backbone." + k: v for k, v in official.items() if not k.startswith(("head.", "norm."))}
    source.update({f"backbone.norm{i}.weight": torch.ones(96 * 2 ** i) for i in range(4)})
    source.update({f"sem_seg_head.pixel_decoder.input_proj.{j}.0.weight": torch.zeros(D, c, 1, 1)
                   for j, c in enumerate((768, 384, 192))})
    converted, unmatched = convert_state_dict("maskdino", source, prefix="image_encoder.")
    assert torch.equal(converted["image_encoder.backbone.swin.layers.2.downsample.reduction.weight"],
                       timm_swin.state_dict()["layers.2.downsample.reduction.weight"])
    assert "image_encoder.proposer.input_projection.lateral.1.0.weight" in converted  # the 192-channel res3
    assert sorted(k for k in unmatched if "norm" in k) == [f"backbone.norm{i}.weight" for i in range(4)]
    assert all(k.endswith(("relative_position_index", "attn_mask")) for k in unmatched if "norm" not in k)

    four_scales = {f"sem_seg_head.pixel_decoder.input_proj.{j}.0.weight": torch.zeros(D, c, 1, 1)
                   for j, c in enumerate(CHANNELS)}
    with pytest.raises(ValueError, match="res3..res5"):
        convert_state_dict("maskdino", four_scales)
    conflicting = dict(_maskdino_state_dict({}, "low2high"))
    conflicting["sem_seg_head.predictor.decoder.norm.weight"] = torch.zeros(D)
    with pytest.raises(ValueError, match="decoder.norm.weight"):
        convert_state_dict("maskdino", conflicting, num_heads=HEADS)
    with pytest.raises(ValueError, match="heads"):
        convert_state_dict("maskdino", _maskdino_state_dict({}, "high2low"), num_heads=3)
