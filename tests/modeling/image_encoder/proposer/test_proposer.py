"""Output contract of DeformableRegionProposer and of the class-agnostic ProposalDetector."""
import logging

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

import up2  # noqa: F401
import up2.modeling  # noqa: F401
from up2.config import add_up2_config
from up2.modeling.build import build_proposer
from up2.modeling.image_encoder.proposer.criterion import LOSS_NAMES
from up2.modeling.image_encoder.proposer.proposer import DeformableRegionProposer
from up2.modeling.image_encoder.proposer import targets as proposer_targets

INPUT_SHAPE = {f"res{i + 2}": ShapeSpec(channels=8 * 2 ** i, stride=4 * 2 ** i) for i in range(4)}
N, O, DEC_LAYERS = 20, 8, 2


def _cfg():
    cfg = get_cfg()
    add_up2_config(cfg)
    p = cfg.MODEL.UP2.PROPOSER
    p.HIDDEN_DIM, p.ENC_LAYERS, p.DEC_LAYERS, p.DIM_FEEDFORWARD, p.NHEADS = 32, 1, DEC_LAYERS, 64, 4
    p.ENC_N_POINTS = p.DEC_N_POINTS = 2
    p.NUM_QUERIES, p.TOPK_QUERIES, p.MASK_DIM, p.FUSION_MASK_POOL_SIZE, p.DN_NUM_QUERIES = N, O, 16, 7, 8
    cfg.MODEL.UP2.LOSS.NUM_POINTS = 64
    cfg.MODEL.UP2.MSDA_IMPL = "pytorch"
    return cfg


def _inputs(batch_sizes=((64, 96), (48, 64)), padded=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    features = {name: torch.randn(len(batch_sizes), spec.channels, padded[0] // spec.stride,
                                  padded[1] // spec.stride, generator=g) for name, spec in INPUT_SHAPE.items()}
    padding = torch.ones(len(batch_sizes), *padded, dtype=torch.bool)
    for b, (h, w) in enumerate(batch_sizes):
        padding[b, :h, :w] = False
    masks = torch.zeros(2, *padded)
    masks[0, 10:30, 20:50] = 1
    masks[1, 40:60, 5:25] = 1
    targets = [{"boxes": torch.tensor([[35 / 96, 20 / 64, 30 / 96, 20 / 64], [15 / 96, 50 / 64, 20 / 96, 20 / 64]]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, *padded)}]
    return features, padding, targets


@pytest.fixture(scope="module")
def proposer():
    torch.manual_seed(0)
    model = build_proposer(_cfg(), INPUT_SHAPE)
    assert isinstance(model, DeformableRegionProposer)
    return model


def test_proposer_output_contract_and_gradients(proposer):
    proposer.train()
    features, padding, targets = _inputs()
    out = proposer(features, padding, targets)
    assert out["regional_tokens"].shape == (2, O, 32)
    assert out["boxes"].shape == (2, O, 4)
    assert out["masks"].shape == (2, O, 16, 24)  # stride 4
    assert out["objectness"].shape == (2, O)
    assert out["keep_indices"].shape == (2, O)
    assert out["last_level"].shape == (2, 32, 2, 3)  # stride 32 (F'3), padded 64 x 96 -> 2 x 3
    assert out["last_level_mask"].shape == (2, 2, 3)
    assert out["predictions"]["pred_logits"].shape == (2, N, 1)
    assert out["predictions"]["pred_masks"].shape == (2, N, 16, 24)
    # kept tokens are the top-O final-layer queries by objectness
    logits = out["predictions"]["pred_logits"][..., 0]
    assert torch.equal(out["objectness"], logits.gather(1, out["keep_indices"]))
    assert torch.equal(out["objectness"], logits.topk(O, dim=1).values)
    # matches: two for image 0, none for image 1; token indices point at the same queries
    assert [len(p) for p, _ in out["matched_indices"]] == [2, 0]
    for (q, g), (t, g2) in zip(out["matched_indices"], out["matched_token_indices"]):
        kept = torch.isin(q, out["keep_indices"][0]) if len(q) else q.bool()
        assert len(t) == int(kept.sum())
    for t, g2 in out["matched_token_indices"][:1]:
        assert torch.equal(out["keep_indices"][0, t].sort().values,
                           out["matched_indices"][0][0][torch.isin(out["matched_indices"][0][0],
                                                                   out["keep_indices"][0])].sort().values)
    losses = out["losses"]
    suffixes = [""] + [f"_{i}" for i in range(DEC_LAYERS - 1)] + ["_enc", "_dn"] + [
        f"_dn_{i}" for i in range(DEC_LAYERS - 1)]
    assert set(losses) == {name + s for name in LOSS_NAMES for s in suffixes}
    assert all(torch.isfinite(v) for v in losses.values())
    proposer.zero_grad()
    (sum(losses.values()) + out["regional_tokens"].sum()).backward()
    missing = [n for n, p in proposer.named_parameters() if p.grad is None]
    assert missing == []
    # fusion gets nothing from the losses alone (it only feeds the regional tokens)
    proposer.zero_grad()
    out = proposer(features, padding, targets)
    sum(out["losses"].values()).backward()
    missing = {n.split(".")[0] for n, p in proposer.named_parameters() if p.grad is None}
    assert missing == {"fusion"}


def test_proposer_loss_keys_without_annotations(proposer):
    proposer.train()
    features, padding, targets = _inputs()
    keys_with = set(proposer(features, padding, targets)["losses"])
    empty = [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 64, 96)}] * 2
    out = proposer(features, padding, empty)
    assert set(out["losses"]) == keys_with
    proposer.zero_grad()
    (sum(out["losses"].values()) + out["regional_tokens"].sum()).backward()
    assert [n for n, p in proposer.named_parameters() if p.grad is None] == []


def test_proposer_inference_has_no_losses(proposer):
    proposer.eval()
    features, padding, _ = _inputs()
    with torch.no_grad():
        out = proposer(features, padding)
    assert "losses" not in out and out["regional_tokens"].shape == (2, O, 32)


@pytest.mark.parametrize("groups", [32, 8])
def test_proposer_norm_groups_from_config(groups):
    cfg = _cfg()
    cfg.MODEL.UP2.PROPOSER.NORM_GROUPS = groups
    model = build_proposer(cfg, INPUT_SHAPE)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    # every projected level (4 + the extra one) and the mask branch's lateral / output convs
    assert len(norms) >= 6 and {m.num_groups for m in norms} == {groups}


@pytest.mark.parametrize("groups", [0, 5])
def test_proposer_rejects_norm_groups_not_dividing_width(groups):
    cfg = _cfg()
    cfg.MODEL.UP2.PROPOSER.NORM_GROUPS = groups
    with pytest.raises(ValueError, match=f"NORM_GROUPS \\({groups}\\).*HIDDEN_DIM \\(32\\)"):
        build_proposer(cfg, INPUT_SHAPE)


def _detector_cfg():
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "ProposalDetector"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.UP2.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


def _sample(h, w, boxes, out_size):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, int(y0):int(y1), int(x0):int(x1)] = True
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    return {"image": torch.rand(3, h, w) * 255, "instances": inst, "height": out_size[0], "width": out_size[1]}


def test_proposal_detector_train_and_inference_at_original_size():
    torch.manual_seed(0)
    model = build_model(_detector_cfg())
    batch = [_sample(64, 80, [[10, 10, 40, 30], [50, 20, 70, 60]], (128, 160)), _sample(56, 64, [], (112, 128))]
    model.train()
    losses = model(batch)
    model.zero_grad()
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        results = model(batch)
    for res, (h, w) in zip(results, [(128, 160), (112, 128)]):
        inst = res["instances"]
        assert inst.image_size == (h, w)
        assert len(inst) == 10
        assert inst.pred_masks.shape == (10, h, w) and inst.pred_masks.dtype == torch.bool
        assert (inst.pred_classes == 0).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert torch.all(inst.scores[:-1] >= inst.scores[1:])
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()


def test_degenerate_boxes_dropped_with_warning(caplog):
    inst = Instances((40, 50))
    inst.gt_boxes = Boxes(torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 5.0, 9.0], [3.0, 4.0, 8.0, 4.0]]))
    masks = torch.zeros(3, 40, 50, dtype=torch.bool)
    masks[0, 2:22, 1:11] = True
    inst.gt_masks = BitMasks(masks)
    proposer_targets._DEGENERATE["count"] = 0
    with caplog.at_level(logging.WARNING, logger=proposer_targets.__name__):
        targets = proposer_targets.instances_to_targets([inst], (64, 64), "cpu")
    assert len(targets[0]["boxes"]) == 1 and targets[0]["masks"].shape == (1, 64, 64)
    assert torch.allclose(targets[0]["boxes"][0], torch.tensor([6 / 50, 12 / 40, 10 / 50, 20 / 40]))
    assert targets[0]["masks"][0, 2:22, 1:11].all() and targets[0]["masks"].sum() == 200
    assert proposer_targets._DEGENERATE["count"] == 2
    assert any("Dropped 2 ground-truth box(es) of zero area" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=proposer_targets.__name__):
        proposer_targets.instances_to_targets([inst], (64, 64), "cpu")  # 4 so far: not logged again
    assert not caplog.records


def test_proposer_fusion_feature_levels_from_config():
    cfg = _cfg()
    cfg.MODEL.UP2.PROPOSER.FUSION_FEATURE_LEVELS = ["res4", "res5"]
    torch.manual_seed(0)
    model = build_proposer(cfg, INPUT_SHAPE).eval()
    assert model.fusion.feature_proj.in_features == 32 + 64  # res4 + res5 channels
    features, padding, _ = _inputs()
    with torch.no_grad():
        tokens = model(features, padding)["regional_tokens"]
        model.fusion.feature_proj.bias.add_(1.0)  # the term reaches the tokens
        assert torch.allclose(model(features, padding)["regional_tokens"], tokens + 1.0, atol=1e-5)
    cfg.MODEL.UP2.PROPOSER.FUSION_FEATURE_LEVELS = ["res6"]
    with pytest.raises(ValueError, match=r"FUSION_FEATURE_LEVELS: \['res6'\] not among"):
        build_proposer(cfg, INPUT_SHAPE)
