"""Contrastive denoising queries and the decoder self-attention mask."""
import pytest
import torch
from torchvision.ops import box_convert

from up2.modeling.image_encoder.proposer.denoising import (build_dn_attention_mask, prepare_contrastive_denoising,
                                             split_denoising_outputs)


def test_attention_mask_tiny_case():
    # 2 DN groups of 2 queries, then 2 matching queries; True = blocked.
    expected = torch.tensor([
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(build_dn_attention_mask(2, 2, 2), expected)
    assert not build_dn_attention_mask(3, 0, 4).any()  # no DN: nothing blocked


def test_attention_mask_three_groups_brute_force():
    mask = build_dn_attention_mask(num_matching_queries=4, num_groups=3, group_size=4)
    assert mask.shape == (16, 16) and mask.dtype == torch.bool
    for i in range(16):
        for j in range(16):
            if i >= 12:
                assert mask[i, j] == (j < 12)
            else:
                assert mask[i, j] == (j < 12 and i // 4 != j // 4)


def test_queries_layout_noise_ranges_and_meta():
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.1, 0.3], [0.5, 0.5, 0.3, 0.1]])},
               {"boxes": torch.tensor([[0.45, 0.55, 0.2, 0.1]])}]
    scale = 0.5
    dn = prepare_contrastive_denoising(targets, num_matching_queries=5, num_dn_queries=20, box_noise_scale=scale,
                                       label_noise_ratio=0.0, generator=torch.Generator().manual_seed(0))
    meta = dn["dn_meta"]
    assert (meta["single_pad"], meta["group_size"], meta["num_dn_groups"], meta["num_dn_queries"]) == (3, 6, 3, 18)
    assert dn["boxes"].shape == (2, 18, 4) and dn["labels"].shape == (2, 18)
    assert torch.equal(dn["attn_mask"], build_dn_attention_mask(5, 3, 6))
    assert meta["positive_idx"][0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert meta["negative_idx"][1].tolist() == [3, 9, 15]
    pos, gt = meta["matched_indices"][1]
    assert pos.tolist() == [0, 6, 12] and gt.tolist() == [0, 0, 0]
    # padding: image 1 slots 1, 2 of both halves in every group
    padding = torch.zeros(2, 18, dtype=torch.bool)
    for g in range(3):
        padding[1, [g * 6 + 1, g * 6 + 2, g * 6 + 4, g * 6 + 5]] = True
    assert torch.equal(dn["padding_mask"], padding)
    assert (dn["labels"][padding] == 0).all() and (dn["labels"][~padding] == 1).all()  # no label noise
    assert (dn["boxes"][padding] == 0).all()
    # noise of each corner, relative to half the gt size * scale: [0, 1) positives, [1, 2) negatives
    for b, target in enumerate(targets):
        for idx, low, high in ((meta["positive_idx"][b], 0.0, 1.0), (meta["negative_idx"][b], 1.0, 2.0)):
            gt_boxes = target["boxes"].repeat(3, 1)
            half = torch.cat([gt_boxes[:, 2:], gt_boxes[:, 2:]], 1) / 2 * scale
            shift = (box_convert(dn["boxes"][b, idx], "cxcywh", "xyxy") - box_convert(gt_boxes, "cxcywh", "xyxy"))
            ratio = shift.abs() / half
            assert (ratio >= low - 1e-5).all() and (ratio < high + 1e-5).all()


def test_label_noise_deterministic_and_about_the_ratio():
    targets = [{"boxes": torch.rand(50, 4) * 0.3 + 0.3}]
    run = lambda seed: prepare_contrastive_denoising(  # noqa: E731
        targets, num_matching_queries=3, num_dn_queries=1000, label_noise_ratio=0.5,
        generator=torch.Generator().manual_seed(seed))
    a, b = run(1), run(1)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["boxes"], b["boxes"])
    flipped = 1 - a["labels"].float().mean().item()  # 1000 queries, no padding
    assert 0.18 < flipped < 0.32  # expected 0.25


def test_empty_batch_still_has_queries_and_disabled():
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    dn = prepare_contrastive_denoising(targets, num_matching_queries=4, num_dn_queries=10)
    meta = dn["dn_meta"]
    assert meta["single_pad"] == 1 and meta["num_dn_groups"] == 5 and dn["padding_mask"].all()
    assert all(len(p) == 0 and len(g) == 0 for p, g in meta["matched_indices"])
    assert prepare_contrastive_denoising(targets, num_matching_queries=4, num_dn_queries=0) is None
    with pytest.raises(ValueError, match="label_noise_ratio"):
        prepare_contrastive_denoising(targets, num_matching_queries=4, label_noise_ratio=2.0)


def test_split_outputs():
    x = torch.arange(2 * 7).view(2, 7)
    dn_part, matching = split_denoising_outputs(x, {"num_dn_queries": 4})
    assert torch.equal(dn_part, x[:, :4]) and torch.equal(matching, x[:, 4:])
    assert split_denoising_outputs(x, None) == (None, x)
