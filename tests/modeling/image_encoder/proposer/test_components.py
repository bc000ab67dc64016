"""Shapes, padding handling and exact semantics of the proposer's parts (encoder, query selection,
decoder, mask branch eq. 8, fusion eq. 9)."""
import pytest
import torch
import torch.nn.functional as F

import up2  # noqa: F401
from up2.modeling.image_encoder.position_encoding import sine_encoding_of_coordinates
from up2.modeling.image_encoder.proposer.decoder import DeformableDecoder
from up2.modeling.image_encoder.proposer.denoising import prepare_contrastive_denoising
from up2.modeling.image_encoder.proposer.encoder import DeformableEncoder, valid_ratios_of
from up2.modeling.image_encoder.proposer.fusion import ProposalFusion, mask_pooled_features
from up2.modeling.image_encoder.proposer.mask_branch import MaskBranch
from up2.modeling.image_encoder.proposer.query_selection import TwoStageQuerySelection, encoder_proposals

D = 32
SHAPES = [(8, 10), (4, 5), (2, 3), (1, 2)]  # strides 8..64 of a 64 x 80 padded batch


def _levels(batch=2, valid=((64, 80), (48, 56))):
    torch.manual_seed(0)
    srcs = [torch.randn(batch, D, h, w) for h, w in SHAPES]
    masks = []
    for h, w in SHAPES:
        mask = torch.ones(batch, h, w, dtype=torch.bool)
        for b, (vh, vw) in enumerate(valid):
            mask[b, :max(1, round(vh / 64 * h)), :max(1, round(vw / 80 * w))] = False
        masks.append(mask)
    return srcs, masks


def _encoder():
    return DeformableEncoder(hidden_dim=D, num_layers=2, num_levels=4, nheads=4, n_points=2, dim_feedforward=64,
                             dropout=0.0, msda_impl="pytorch")


def test_encoder_shapes_and_padding():
    srcs, masks = _levels()
    enc = _encoder().eval()
    out = enc(srcs, masks)
    total = sum(h * w for h, w in SHAPES)
    assert out["memory"].shape == (2, total, D)
    assert out["padding_mask"].shape == (2, total)
    assert out["spatial_shapes"].tolist() == [list(s) for s in SHAPES]
    assert out["level_start_index"].tolist() == [0, 80, 100, 106]
    assert out["valid_ratios"].shape == (2, 4, 2)
    assert torch.allclose(out["valid_ratios"][0], torch.ones(4, 2))
    assert torch.allclose(out["valid_ratios"][1, 0], torch.tensor([7 / 10, 6 / 8]))
    levels = DeformableEncoder.split_levels(out["memory"], out["shapes"])
    assert [tuple(level.shape) for level in levels] == [(2, D, h, w) for h, w in SHAPES]
    # Content of padded pixels must not change the valid pixels' output.
    srcs2 = [s.clone() for s in srcs]
    for s, m in zip(srcs2, masks):
        s[m.unsqueeze(1).expand_as(s)] = 100.0
    out2 = enc(srcs2, masks)
    valid = ~out["padding_mask"]
    assert torch.allclose(out["memory"][valid], out2["memory"][valid], atol=1e-4)
    assert torch.isfinite(out["memory"]).all()


def test_valid_ratios_of():
    mask = torch.ones(1, 4, 8, dtype=torch.bool)
    mask[0, :3, :2] = False
    assert valid_ratios_of(mask).tolist() == [[0.25, 0.75]]


def test_query_selection_top_n_by_objectness():
    srcs, masks = _levels()
    enc = _encoder().eval()
    out = enc(srcs, masks)
    sel = TwoStageQuerySelection(hidden_dim=D, num_queries=10)
    torch.nn.init.normal_(sel.objectness.weight)
    res = sel(out["memory"], out["padding_mask"], out["shapes"], out["valid_ratios"])
    assert res["content"].shape == (2, 10, D)
    assert res["reference_boxes"].shape == (2, 10, 4)
    assert not res["reference_boxes"].requires_grad and res["enc_outputs"]["pred_boxes"].requires_grad
    logits = res["all_logits"][..., 0].detach().masked_fill(~res["valid"], float("-inf"))
    expected = logits.sort(dim=1, descending=True).values[:, :10]
    chosen = logits.gather(1, res["topk_indices"])
    assert torch.equal(chosen, expected)
    assert torch.equal(res["enc_outputs"]["pred_logits"][..., 0], chosen)
    assert not (~res["valid"]).gather(1, res["topk_indices"]).any()  # never a padded pixel
    # content = selected feature (detached) + learned query embedding
    feats = res["enc_outputs"]["features"]
    assert torch.allclose(res["content"], feats.detach() + sel.query_embed.weight)
    # zero-initialised box delta: boxes are the anchors (wh = 0.05 * 2**level)
    proposals, _ = encoder_proposals(out["shapes"], out["valid_ratios"], out["padding_mask"])
    anchors = proposals.gather(1, res["topk_indices"].unsqueeze(-1).expand(-1, -1, 4))
    assert torch.allclose(res["reference_boxes"], anchors, atol=1e-4)


def test_encoder_proposal_sizes():
    ratios = torch.ones(1, 4, 2)
    mask = torch.zeros(1, sum(h * w for h, w in SHAPES), dtype=torch.bool)
    proposals, valid = encoder_proposals(SHAPES, ratios, mask)
    starts = [0, 80, 100, 106]
    for level, start in enumerate(starts):
        assert proposals[0, start, 2].item() == pytest.approx(0.05 * 2 ** level)
    assert torch.allclose(proposals[0, 0, :2], torch.tensor([0.5 / 10, 0.5 / 8]))


def _decoder(layers=2, dn=True):
    return DeformableDecoder(hidden_dim=D, num_layers=layers, num_levels=4, nheads=4, n_points=2,
                             dim_feedforward=64, dropout=0.0, mask_dim=16, dn_enabled=dn, msda_impl="pytorch")


def test_decoder_shapes_refinement_and_dn_mask():
    srcs, masks = _levels()
    out = _encoder().eval()(srcs, masks)
    dec = _decoder(layers=3).eval()
    for head in dec.box_heads:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}, {"boxes": torch.zeros(0, 4)}]
    dn = prepare_contrastive_denoising(targets, num_matching_queries=6, num_dn_queries=4)
    dn_content, dn_boxes = dec.denoising_queries(dn)
    assert dn_content.shape == (2, 4, D)
    content = torch.cat([dn_content, torch.randn(2, 6, D)], 1)
    ref = torch.cat([dn_boxes, torch.rand(2, 6, 4) * 0.5 + 0.25], 1)
    args = (out["memory"], out["padding_mask"], out["spatial_shapes"], out["level_start_index"], out["valid_ratios"])
    res = dec(content, ref, *args, attn_mask=dn["attn_mask"])
    assert len(res["boxes"]) == 3
    assert res["hidden"][0].shape == (2, 10, D)
    assert res["logits"][-1].shape == (2, 10, 1)
    assert res["mask_embeds"][-1].shape == (2, 10, 16)
    assert all(((b > 0) & (b < 1)).all() for b in res["boxes"])
    # layer i refines layer i-1's box: sigmoid(head_i(h_i) + logit(box_{i-1}))
    logit = torch.logit(res["boxes"][0].clamp(1e-5, 1 - 1e-5))
    assert torch.allclose(res["boxes"][1], (dec.box_heads[1](res["hidden"][1]) + logit).sigmoid(), atol=1e-5)
    # The attention mask isolates matching queries from DN queries: changing DN content leaves them unchanged.
    content2 = content.clone()
    content2[:, :4] += 5.0
    res2 = dec(content2, ref, *args, attn_mask=dn["attn_mask"])
    assert torch.allclose(res["hidden"][-1][:, 4:], res2["hidden"][-1][:, 4:], atol=1e-5)
    assert not torch.allclose(res["hidden"][-1][:, :4], res2["hidden"][-1][:, :4], atol=1e-3)


def test_mask_branch_equals_eq8():
    torch.manual_seed(0)
    branch = MaskBranch(D, 16)
    g_conv = torch.nn.Sequential(torch.nn.Conv2d(8, D, 1), torch.nn.GroupNorm(32, D))  # G
    f0 = torch.randn(2, 8, 16, 20)
    f1_enc = torch.randn(2, D, 8, 10)
    q = torch.randn(2, 5, 16)  # MLP(q)
    g = g_conv(f0)
    pixel = branch.pixel_features(g, f1_enc)
    masks = branch.predict(q, pixel)
    assert masks.shape == (2, 5, 16, 20)
    conv_h, gn_h = branch.lateral
    conv_r1, gn_r, _, conv_r2 = branch.refine
    h = F.interpolate(gn_h(conv_h(f1_enc)), size=(16, 20), mode="bilinear", align_corners=False)
    r = conv_r2(torch.relu(gn_r(conv_r1(g + h))))
    expected = (q[:, :, :, None, None] * r[:, None]).sum(2)
    assert torch.allclose(masks, expected, atol=1e-4)
    assert isinstance(conv_r1, torch.nn.Conv2d) and conv_r1.kernel_size == (3, 3)
    assert conv_h.kernel_size == (1, 1) and conv_r2.kernel_size == (1, 1)


def test_fusion_eq9_topk_and_detach():
    torch.manual_seed(0)
    fusion = ProposalFusion(D, pool_size=4, topk=3)
    q_sem = torch.randn(2, 6, D, requires_grad=True)
    boxes = torch.rand(2, 6, 4, requires_grad=True)
    masks = torch.randn(2, 6, 8, 8, requires_grad=True)
    objectness = torch.randn(2, 6, 1, requires_grad=True)
    out = fusion(q_sem, boxes, masks, objectness)
    assert out["regional_tokens"].shape == (2, 3, D)
    assert out["boxes"].shape == (2, 3, 4) and out["masks"].shape == (2, 3, 8, 8)
    assert out["objectness"].shape == (2, 3)
    assert torch.equal(out["keep_indices"], objectness[..., 0].topk(3, dim=1).indices)
    expected_all = (q_sem + fusion.box_proj(sine_encoding_of_coordinates(boxes, D // 4))
                    + fusion.mask_proj(F.adaptive_avg_pool2d(masks.sigmoid(), 4).flatten(2)))
    idx = out["keep_indices"]
    assert torch.allclose(out["regional_tokens"], expected_all.gather(1, idx[..., None].expand(-1, -1, D)), atol=1e-5)
    # no gradient reaches box / mask / objectness through the tokens; q_sem and the projections get one
    out["regional_tokens"].sum().backward()
    assert boxes.grad is None and masks.grad is None and objectness.grad is None
    assert q_sem.grad is not None and fusion.box_proj.weight.grad is not None
    assert fusion.mask_proj.weight.grad.abs().sum() > 0


def test_mask_pooled_features_known_answer():
    # a hard mask covering the left half of an 8 x 8 map: the average of the left half of each level
    masks = torch.full((1, 1, 8, 8), -50.0)
    masks[..., :4] = 50.0
    level = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    pooled = mask_pooled_features(masks, [level, level * 10])
    assert pooled.shape == (1, 1, 4)
    left = level[..., :2].mean(dim=(-2, -1))[0]  # (2,)
    assert torch.allclose(pooled[0, 0], torch.cat([left, left * 10]), atol=1e-4)
    # an empty mask does not divide by zero
    assert torch.isfinite(mask_pooled_features(torch.full((1, 1, 8, 8), -1e4), [level])).all()


def test_fusion_adds_projected_mask_pooled_features_with_gradient_to_the_features():
    torch.manual_seed(0)
    fusion = ProposalFusion(D, pool_size=4, topk=6, feature_channels=[5, 3])
    q_sem, boxes = torch.randn(2, 6, D), torch.rand(2, 6, 4)
    masks = torch.randn(2, 6, 8, 8)
    features = [torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 3, 2, 2, requires_grad=True)]
    out = fusion.fuse(q_sem, boxes, masks, features)
    paper = ProposalFusion(D, pool_size=4, topk=6)
    paper.load_state_dict({k: v for k, v in fusion.state_dict().items() if not k.startswith("feature_proj")})
    expected = paper.fuse(q_sem, boxes, masks) + fusion.feature_proj(mask_pooled_features(masks, features))
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    with pytest.raises(ValueError, match="FUSION_FEATURE_LEVELS"):
        fusion.fuse(q_sem, boxes, masks)
