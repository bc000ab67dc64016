"""Hungarian matcher: brute-force optimum, batched vs per-image costs, one host transfer per step."""
import itertools
import math

import pytest
import torch
from detectron2.config import get_cfg

from up2.config import add_up2_config
from up2.modeling.image_encoder.proposer.matcher import HungarianMatcher, match_per_image_reference

ALPHA, GAMMA = 0.25, 2.0
WEIGHTS = dict(cost_objectness=2.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0, cost_dice=5.0)


def random_case(gt_counts, num_queries, seed, pred_hw=8, gt_scale=2):
    """Predictions on a pred_hw grid; gt masks: binary pred_hw masks upsampled by gt_scale (nearest)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(gt_counts)

    def boxes(n):
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        return torch.cat([centre, size], -1)

    outputs = {"pred_logits": torch.randn(batch, num_queries, 1, generator=g),
               "pred_boxes": torch.stack([boxes(num_queries) for _ in range(batch)]),
               "pred_masks": torch.randn(batch, num_queries, pred_hw, pred_hw, generator=g) * 2}
    targets = []
    for n in gt_counts:
        low = torch.rand(n, pred_hw, pred_hw, generator=g) > 0.5
        masks = low.repeat_interleave(gt_scale, 1).repeat_interleave(gt_scale, 2)
        targets.append({"boxes": boxes(n), "masks": masks, "labels": torch.zeros(n, dtype=torch.long)})
    return outputs, targets


def centre_points(batch, num_points, hw, seed):
    """Points at pixel centres of the hw x hw prediction grid (exact for both resolutions)."""
    g = torch.Generator().manual_seed(seed)
    ij = torch.randint(0, hw, (batch, num_points, 2), generator=g)
    return (ij.float() + 0.5) / hw


def hand_cost(logit, box, gt_box, pred_mask, gt_mask, coords, w=WEIGHTS):
    """Scalar cost of one (prediction, gt) pair from the formulas, in plain Python."""
    p = 1 / (1 + math.exp(-logit))
    focal = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8) - (1 - ALPHA) * p ** GAMMA * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box, gt_box))

    def xyxy(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    a, b = xyxy(box), xyxy(gt_box)
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    giou = inter / union - (hull - union) / hull
    xs, ts = [], []
    for x, y in coords:  # pixel centres: nearest pixel in each grid
        xs.append(float(pred_mask[int(y * pred_mask.shape[0]), int(x * pred_mask.shape[1])]))
        ts.append(float(gt_mask[int(y * gt_mask.shape[0]), int(x * gt_mask.shape[1])]))
    bce = sum(math.log1p(math.exp(-x)) * t + math.log1p(math.exp(x)) * (1 - t) for x, t in zip(xs, ts)) / len(xs)
    sig = [1 / (1 + math.exp(-x)) for x in xs]
    dice = 1 - (2 * sum(s * t for s, t in zip(sig, ts)) + 1) / (sum(sig) + sum(ts) + 1)
    return (w["cost_objectness"] * focal + w["cost_bbox"] * l1 - w["cost_giou"] * giou
            + w["cost_mask"] * bce + w["cost_dice"] * dice)


def hand_cost_matrix(outputs, targets, b, coords):
    q, n = outputs["pred_logits"].shape[1], len(targets[b]["boxes"])
    return [[hand_cost(float(outputs["pred_logits"][b, i, 0]), outputs["pred_boxes"][b, i].tolist(),
                       targets[b]["boxes"][j].tolist(), outputs["pred_masks"][b, i], targets[b]["masks"][j],
                       coords[b].tolist()) for j in range(n)] for i in range(q)]


def brute_force(cost):
    """Minimum total cost over all injective gt -> prediction assignments."""
    num_q, num_g = len(cost), len(cost[0])
    return min(sum(cost[perm[j]][j] for j in range(num_g)) for perm in itertools.permutations(range(num_q), num_g))


@pytest.mark.parametrize("seed,gt_counts,num_queries", [(0, [3, 0, 4], 6), (1, [1, 4], 5), (2, [4, 2, 0], 4)])
def test_matches_brute_force_optimum(seed, gt_counts, num_queries):
    outputs, targets = random_case(gt_counts, num_queries, seed)
    coords = centre_points(len(gt_counts), 10, 8, seed)
    matcher = HungarianMatcher(**WEIGHTS, num_points=10)
    indices = matcher(outputs, targets, point_coords=coords)
    batched = matcher.compute_cost(outputs, targets, point_coords=coords)
    for b, (pred_idx, gt_idx) in enumerate(indices):
        assert pred_idx.dtype == gt_idx.dtype == torch.int64
        if gt_counts[b] == 0:
            assert len(pred_idx) == len(gt_idx) == 0
            continue
        cost = hand_cost_matrix(outputs, targets, b, coords)
        torch.testing.assert_close(batched[b, :, :gt_counts[b]], torch.tensor(cost), rtol=1e-4, atol=1e-4)
        assert len(pred_idx) == gt_counts[b] and sorted(gt_idx.tolist()) == list(range(gt_counts[b]))
        assert pred_idx.tolist() == sorted(pred_idx.tolist())
        total = sum(cost[i][j] for i, j in zip(pred_idx.tolist(), gt_idx.tolist()))
        assert total == pytest.approx(brute_force(cost), abs=1e-6)


def test_batched_costs_equal_per_image_reference():
    outputs, targets = random_case([5, 0, 2, 7], 9, seed=3, pred_hw=12, gt_scale=3)
    coords = torch.rand(4, 50, 2, generator=torch.Generator().manual_seed(0))
    matcher = HungarianMatcher(**WEIGHTS, num_points=50)
    batched = matcher.compute_cost(outputs, targets, point_coords=coords)
    assert batched.shape == (4, 9, 7) and batched.dtype == torch.float32
    ref_indices, ref_costs = match_per_image_reference(matcher, outputs, targets, point_coords=coords,
                                                       return_costs=True)
    for b, t in enumerate(targets):
        n = len(t["boxes"])
        torch.testing.assert_close(batched[b, :, :n], ref_costs[b], rtol=1e-5, atol=1e-5)
        assert (batched[b, :, n:] == 0).all()
    for (p, g), (rp, rg) in zip(matcher(outputs, targets, point_coords=coords), ref_indices):
        assert p.tolist() == rp.tolist() and g.tolist() == rg.tolist()


def test_box_only_matching_ignores_masks():
    outputs, targets = random_case([3, 2], 6, seed=4)
    matcher = HungarianMatcher(**WEIGHTS, num_points=10)
    box_only = {k: v for k, v in outputs.items() if k != "pred_masks"}
    no_mask_weights = HungarianMatcher(**{**WEIGHTS, "cost_mask": 0.0, "cost_dice": 0.0}, num_points=10)
    expected = no_mask_weights.compute_cost(outputs, targets)
    torch.testing.assert_close(matcher.compute_cost(box_only, targets), expected)
    torch.testing.assert_close(matcher.compute_cost(outputs, targets, use_masks=False), expected)
    with pytest.raises(ValueError, match="pred_masks"):
        matcher(box_only, targets, use_masks=True)


def test_all_empty_batch_and_costs_fp32_under_autocast():
    outputs, targets = random_case([0, 0], 5, seed=5)
    matcher = HungarianMatcher(**WEIGHTS, num_points=10)
    assert all(len(p) == 0 and len(g) == 0 for p, g in matcher(outputs, targets))
    outputs, targets = random_case([2, 3], 5, seed=6)
    half = {k: v.bfloat16() for k, v in outputs.items()}
    coords = torch.rand(2, 10, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.compute_cost(half, targets, point_coords=coords)
    assert cost.dtype == torch.float32
    reference = matcher.compute_cost({k: v.float() for k, v in half.items()}, targets, point_coords=coords)
    torch.testing.assert_close(cost, reference)


def test_counter_detects_transfers(host_transfer_counter):
    x = torch.randn(3)
    with host_transfer_counter() as counter:
        x.sum().item()
        y = x.cpu()
        y.numpy()
        y[0].item()
    assert counter.count == 2


def test_one_host_transfer_per_step(host_transfer_counter):
    outputs, targets = random_case([3, 0, 4, 2], 6, seed=7)
    matcher = HungarianMatcher(**WEIGHTS, num_points=16)
    with host_transfer_counter() as counter:
        indices = matcher(outputs, targets)
    assert counter.count == 1
    assert [len(p) for p, _ in indices] == [3, 0, 4, 2]
    with host_transfer_counter() as counter:
        match_per_image_reference(matcher, outputs, targets)
    assert counter.count == 3  # the reference syncs once per image with ground truth


def test_from_config():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.UP2.LOSS.COST_GIOU = 3.0
    cfg.MODEL.UP2.LOSS.NUM_POINTS = 100
    matcher = HungarianMatcher(cfg)
    assert (matcher.cost_objectness, matcher.cost_bbox, matcher.cost_giou, matcher.cost_mask, matcher.cost_dice) == \
        (2.0, 5.0, 3.0, 5.0, 5.0)
    assert matcher.num_points == 100 and matcher.focal_alpha == 0.25 and matcher.focal_gamma == 2.0
    with pytest.raises(ValueError, match="costs"):
        HungarianMatcher(cost_objectness=0, cost_bbox=0, cost_giou=0, cost_mask=0, cost_dice=0)


def test_match_sets_equals_separate_calls_with_one_transfer(host_transfer_counter):
    outputs, targets = random_case([3, 0, 2], 6, seed=8)
    box_only, _ = random_case([3, 0, 2], 6, seed=9)
    del box_only["pred_masks"]
    sets = [outputs, box_only, random_case([3, 0, 2], 6, seed=10)[0]]
    matcher = HungarianMatcher(**WEIGHTS, num_points=16)
    with host_transfer_counter() as counter:
        together = matcher.match_sets(sets, targets, generator=torch.Generator().manual_seed(0))
    assert counter.count == 1
    gen = torch.Generator().manual_seed(0)  # same draws in the same order
    for got, preds in zip(together, sets):
        for (p, g), (sp, sg) in zip(got, matcher(preds, targets, generator=gen)):
            assert p.tolist() == sp.tolist() and g.tolist() == sg.tolist()
