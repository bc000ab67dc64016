"""Proposer losses against hand-computed values; empty images, loss keys and gradients."""
import math

import pytest
import torch
from detectron2.config import get_cfg

from up2.config import add_up2_config
from up2.modeling.image_encoder.proposer import criterion as criterion_module
from up2.modeling.image_encoder.proposer.criterion import LOSS_NAMES, ProposalCriterion
from up2.modeling.image_encoder.proposer.denoising import prepare_contrastive_denoising
from up2.modeling.image_encoder.proposer.matcher import HungarianMatcher

WEIGHTS = {"loss_objectness": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def make_criterion(num_points=16, **kwargs):
    matcher = HungarianMatcher(cost_objectness=2, cost_bbox=5, cost_giou=2, cost_mask=5, cost_dice=5,
                               num_points=num_points)
    return ProposalCriterion(matcher=matcher, weight_dict=WEIGHTS, num_points=num_points, **kwargs)


def focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    if target:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p ** gamma * -math.log(1 - p)


def giou_xyxy(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def softplus(x):
    return math.log1p(math.exp(x))


def test_hand_computed_losses_two_queries_one_gt():
    # query 0 is close to the gt box, query 1 far: the matcher must pick query 0.
    gt_box = [0.5, 0.5, 0.4, 0.2]
    pred = [[0.55, 0.45, 0.3, 0.3], [0.1, 0.9, 0.1, 0.1]]
    logits = [0.3, -1.2]
    c = 0.7  # constant mask logit of query 0: every point gives the same value (exact at any location)
    outputs = {"pred_logits": torch.tensor([[[logits[0]], [logits[1]]]]),
               "pred_boxes": torch.tensor([pred]),
               "pred_masks": torch.stack([torch.full((6, 6), c), torch.full((6, 6), -3.0)])[None]}
    targets = [{"boxes": torch.tensor([gt_box]), "masks": torch.ones(1, 24, 24, dtype=torch.bool)}]
    losses, indices = make_criterion()(outputs, targets, return_indices=True)
    assert indices[0][0].tolist() == [0] and indices[0][1].tolist() == [0]
    num_boxes = 1.0
    expected_obj = (focal(logits[0], 1) + focal(logits[1], 0)) / num_boxes
    expected_l1 = sum(abs(a - b) for a, b in zip(pred[0], gt_box)) / num_boxes
    xyxy = lambda b: [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]  # noqa: E731
    expected_giou = (1 - giou_xyxy(xyxy(pred[0]), xyxy(gt_box))) / num_boxes
    p, num_points = 1 / (1 + math.exp(-c)), 16
    expected_bce = softplus(-c)
    expected_dice = 1 - (2 * num_points * p + 1) / (num_points * p + num_points + 1)
    assert set(losses) == set(LOSS_NAMES)
    assert losses["loss_objectness"].item() == pytest.approx(2.0 * expected_obj, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * expected_l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2.0 * expected_giou, rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(5.0 * expected_bce, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(5.0 * expected_dice, rel=1e-5)


def test_mask_losses_at_known_points():
    # pred 4x4 logits, gt 8x8 = nearest upsampling of a 4x4 mask; points at pred pixel centres are exact.
    pred = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 2.0, -1.0, -0.5], [1.5, 1.0, -3.0, 2.5], [-1.0, 0.2, 0.3, 0.4]])
    low = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    gt = low.repeat_interleave(2, 0).repeat_interleave(2, 1)
    cells = [(0, 0), (1, 1), (2, 2), (3, 0), (0, 3), (2, 1)]  # (row, col)
    coords = torch.tensor([[[(j + 0.5) / 4, (i + 0.5) / 4] for i, j in cells]])
    pred_masks = torch.stack([torch.zeros(4, 4), pred])[None]  # query 1 matched
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "masks": gt[None]}]
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    out = make_criterion().loss_masks(pred_masks, targets, indices, num_boxes=2.0, point_coords=coords)
    xs = [float(pred[i, j]) for i, j in cells]
    ts = [float(low[i, j]) for i, j in cells]
    bce = sum(softplus(-x) * t + softplus(x) * (1 - t) for x, t in zip(xs, ts)) / len(xs)
    sig = [1 / (1 + math.exp(-x)) for x in xs]
    dice = 1 - (2 * sum(s * t for s, t in zip(sig, ts)) + 1) / (sum(sig) + sum(ts) + 1)
    assert out["loss_mask"].item() == pytest.approx(bce / 2.0, rel=1e-5)
    assert out["loss_dice"].item() == pytest.approx(dice / 2.0, rel=1e-5)


def full_outputs(batch, num_queries, num_layers, gen, dn_meta=None, hw=8):
    """Leaf prediction tensors of a complete proposer output (final, aux, enc without masks, dn)."""
    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    def boxes(n):
        return (torch.rand(batch, n, 4, generator=gen) * 0.4 + 0.1).requires_grad_()

    def layer(n, masks=True):
        d = {"pred_logits": leaf(batch, n, 1), "pred_boxes": boxes(n)}
        if masks:
            d["pred_masks"] = leaf(batch, n, hw, hw)
        return d

    outputs = layer(num_queries)
    outputs["aux_outputs"] = [layer(num_queries) for _ in range(num_layers - 1)]
    outputs["enc_outputs"] = layer(num_queries, masks=False)
    if dn_meta is not None:
        dn = layer(dn_meta["num_dn_queries"])
        dn["aux_outputs"] = [layer(dn_meta["num_dn_queries"]) for _ in range(num_layers - 1)]
        dn["dn_meta"] = dn_meta
        outputs["dn_outputs"] = dn
    return outputs


def leaves(outputs):
    found = [v for k, v in outputs.items() if k.startswith("pred_")]
    for aux in outputs.get("aux_outputs", []):
        found += leaves(aux)
    for key in ("enc_outputs", "dn_outputs"):
        if key in outputs:
            found += leaves(outputs[key])
    return found


def make_targets(counts, gen, hw=16):
    return [{"boxes": torch.rand(n, 4, generator=gen) * 0.4 + 0.2, "masks": torch.rand(n, hw, hw, generator=gen) > 0.5,
             "labels": torch.zeros(n, dtype=torch.long)} for n in counts]


EXPECTED_KEYS = (set(LOSS_NAMES) | {f"{k}_{i}" for k in LOSS_NAMES for i in (0, 1)}
                 | {"loss_objectness_enc", "loss_bbox_enc", "loss_giou_enc"}
                 | {f"{k}_dn" for k in LOSS_NAMES} | {f"{k}_dn_{i}" for k in LOSS_NAMES for i in (0, 1)})


@pytest.mark.parametrize("counts", [[0, 0], [0, 3], [2, 1]])
def test_keys_finite_and_gradients_for_every_prediction(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    targets = make_targets(counts, gen)
    dn = prepare_contrastive_denoising(targets, num_matching_queries=5, num_dn_queries=8, generator=gen)
    outputs = full_outputs(2, 5, 3, gen, dn["dn_meta"])
    losses = make_criterion()(outputs, targets)
    assert set(losses) == EXPECTED_KEYS  # identical for empty and non-empty batches
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    if sum(counts) == 0:
        for key in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_bbox_dn", "loss_mask_dn_1"):
            assert losses[key].item() == 0.0
    sum(losses.values()).backward()
    for tensor in leaves(outputs):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def test_denoising_losses_use_dn_meta():
    gen = torch.Generator().manual_seed(0)
    targets = make_targets([2, 1], gen)
    dn = prepare_contrastive_denoising(targets, num_matching_queries=4, num_dn_queries=8, generator=gen)
    meta = dn["dn_meta"]
    assert meta["num_dn_groups"] == 2 and meta["num_dn_queries"] == 8
    dn_out = {"pred_logits": torch.randn(2, 8, 1, generator=gen), "pred_boxes": torch.rand(2, 8, 4, generator=gen),
              "dn_meta": meta}
    outputs = {"pred_logits": torch.randn(2, 4, 1), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.2,
               "dn_outputs": dn_out}
    losses = make_criterion()(outputs, targets)
    num_boxes = 3.0 * 2  # total gt x groups
    # positive queries: group g, slot j -> g * 4 + j; everything else (negatives, padding) has target 0
    positives = {0: {0, 1, 4, 5}, 1: {0, 4}}
    expected = sum(focal(float(dn_out["pred_logits"][b, q, 0]), q in positives[b]) for b in range(2) for q in range(8))
    assert losses["loss_objectness_dn"].item() == pytest.approx(2.0 * expected / num_boxes, rel=1e-5)
    gt = {0: [0, 1, 0, 1], 1: [0, 0]}
    l1 = sum(float((dn_out["pred_boxes"][b, q] - targets[b]["boxes"][g]).abs().sum())
             for b in range(2) for q, g in zip(sorted(positives[b]), gt[b]))
    assert losses["loss_bbox_dn"].item() == pytest.approx(5.0 * l1 / num_boxes, rel=1e-5)


def test_num_boxes_all_reduced(monkeypatch):
    monkeypatch.setattr(criterion_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(5.0))  # the other rank has 5 boxes
    targets = make_targets([1, 0], torch.Generator().manual_seed(0))
    assert make_criterion().get_num_boxes(targets, torch.device("cpu")).item() == pytest.approx(3.0)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t)
    assert make_criterion().get_num_boxes(make_targets([0], torch.Generator()), "cpu").item() == 1.0


def test_from_config_and_no_deep_supervision():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.UP2.LOSS.NUM_POINTS = 16
    cfg.MODEL.UP2.LOSS.DEEP_SUPERVISION = False
    criterion = ProposalCriterion(cfg)
    assert criterion.weight_dict == WEIGHTS and criterion.matcher.num_points == 16
    assert criterion.oversample_ratio == 3.0 and criterion.importance_sample_ratio == 0.75
    gen = torch.Generator().manual_seed(0)
    losses = criterion(full_outputs(2, 4, 3, gen), make_targets([1, 2], gen))
    assert set(losses) == set(LOSS_NAMES)
    with pytest.raises(ValueError, match="weight_dict"):
        ProposalCriterion(matcher=criterion.matcher, weight_dict={"loss_bbox": 1.0})


def test_losses_fp32_under_autocast():
    gen = torch.Generator().manual_seed(3)
    targets = make_targets([2, 1], gen)
    outputs = full_outputs(2, 4, 2, gen)
    half = {k: v.detach().bfloat16() if torch.is_tensor(v) else v for k, v in outputs.items()}
    half["aux_outputs"] = []
    del half["enc_outputs"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = make_criterion()(half, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_whole_criterion_step_has_one_host_transfer(host_transfer_counter):
    """Matching of the final layer, 2 aux layers and the encoder output, plus all losses (incl. DN):
    one device-to-host copy in total."""
    gen = torch.Generator().manual_seed(4)
    targets = make_targets([2, 0, 3], gen)
    dn = prepare_contrastive_denoising(targets, num_matching_queries=5, num_dn_queries=12, generator=gen)
    outputs = full_outputs(3, 5, 3, gen, dn["dn_meta"])
    with host_transfer_counter() as counter:
        losses = make_criterion()(outputs, targets)
    assert counter.count == 1 and set(losses) == EXPECTED_KEYS
