"""The region proposer of UPv2 (paper §4.1, Appendix A): a class-agnostic MaskDINO-like network that
turns backbone features into O regional tokens with their boxes, masks and objectness.

Data flow (d = ``HIDDEN_DIM``, N = ``NUM_QUERIES``, O = ``TOPK_QUERIES``)::

    res2..res5 --InputProjection--> F'0 (s4), F'1 (s8), F'2 (s16), F'3 (s32), F'4 (s64, extra conv)
    F'1..F'4 --DeformableEncoder--> memory (F1_enc..F4_enc)
    memory --TwoStageQuerySelection--> N content queries + reference boxes, enc_outputs
    [DN queries ;] N queries --DeformableDecoder--> per layer hidden, boxes, objectness, mask embeds
    masks = MaskBranch.predict(mask_embeds, R(G(F0) + H(F1_enc)))      (eq. 8, G = InputProjection of res2)
    final layer --ProposalFusion--> top-O regional tokens                 (eq. 9)

``last_level`` (for global pooling, eq. 3) is F'3: the projected stride-32 level, i.e. the last
backbone scale F_L at width d (the stride-64 F'4 is an extra level made by the proposer, not a backbone
scale).
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from up2.modeling.build import PROPOSER_REGISTRY
from up2.modeling.image_encoder.input_projection import InputProjection
from up2.modeling.image_encoder.proposer.criterion import ProposalCriterion
from up2.modeling.image_encoder.proposer.decoder import DeformableDecoder
from up2.modeling.image_encoder.proposer.denoising import prepare_contrastive_denoising, split_denoising_outputs
from up2.modeling.image_encoder.proposer.encoder import DeformableEncoder
from up2.modeling.image_encoder.proposer.fusion import ProposalFusion
from up2.modeling.image_encoder.proposer.mask_branch import MaskBranch
from up2.modeling.image_encoder.proposer.query_selection import TwoStageQuerySelection

__all__ = ["DeformableRegionProposer", "level_padding_masks", "map_indices_to_tokens"]

logger = logging.getLogger(__name__)


def level_padding_masks(padding_mask: torch.Tensor, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """(B, H, W) image padding mask -> one (B, H_l, W_l) bool mask per map (nearest downsampling)."""
    mask = padding_mask[None].float()
    return [F.interpolate(mask, size=m.shape[-2:]).to(torch.bool)[0] for m in maps]


def map_indices_to_tokens(indices, keep_indices: torch.Tensor, num_queries: int):
    """Maps matched ``(query_idx, gt_idx)`` over the N queries to the O kept regional tokens.

    Args:
        indices: B pairs of (M_b,) long tensors, query indices in [0, N).
        keep_indices: (B, O) indices into N of the kept tokens.
        num_queries: N.

    Returns:
        B pairs ``(token_idx, gt_idx)``: matches whose query is among the kept tokens, token_idx in [0, O),
        in the order of ``indices``.
    """
    batch, num_kept = keep_indices.shape
    inverse = torch.full((batch, num_queries), -1, dtype=torch.long, device=keep_indices.device)
    inverse.scatter_(1, keep_indices, torch.arange(num_kept, device=keep_indices.device).expand(batch, -1))
    mapped = []
    for b, (pred_idx, gt_idx) in enumerate(indices):
        pos = inverse[b, pred_idx.to(inverse.device)]
        kept = pos >= 0
        mapped.append((pos[kept], gt_idx.to(inverse.device)[kept]))
    return mapped


@PROPOSER_REGISTRY.register()
class DeformableRegionProposer(nn.Module):
    """Class-agnostic region proposer (see the module docstring).

    Args:
        input_projection: backbone levels -> d, plus the extra stride-64 level.
        encoder, query_selection, decoder, mask_branch, fusion: the parts.
        criterion: the proposer losses.
        num_queries: N.
        fusion_feature_levels: backbone levels pooled under the masks in the fusion (``FUSION_FEATURE_LEVELS``).
        dn_enabled, dn_num_queries, dn_box_noise_scale, dn_label_noise_ratio: contrastive denoising.
    """

    @configurable
    def __init__(self, *, input_projection: InputProjection, encoder: DeformableEncoder,
                 query_selection: TwoStageQuerySelection, decoder: DeformableDecoder, mask_branch: MaskBranch,
                 fusion: ProposalFusion, criterion: ProposalCriterion, num_queries: int,
                 fusion_feature_levels: Sequence[str] = (), dn_enabled: bool = True,
                 dn_num_queries: int = 100, dn_box_noise_scale: float = 1.0, dn_label_noise_ratio: float = 0.5):
        super().__init__()
        if len(input_projection.strides) != encoder.num_levels + 1:
            raise ValueError(f"DeformableRegionProposer: the input projection gives {len(input_projection.strides)} "
                             f"levels; the encoder needs NUM_FEATURE_LEVELS + 1 = {encoder.num_levels + 1} "
                             "(the stride-4 level feeds the mask branch only)")
        self.input_projection, self.encoder, self.query_selection = input_projection, encoder, query_selection
        self.decoder, self.mask_branch, self.fusion, self.criterion = decoder, mask_branch, fusion, criterion
        self.num_queries = num_queries
        self.fusion_feature_levels = tuple(fusion_feature_levels)
        self.dn_enabled, self.dn_num_queries = dn_enabled, dn_num_queries
        self.dn_box_noise_scale, self.dn_label_noise_ratio = dn_box_noise_scale, dn_label_noise_ratio

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        prop = cfg.MODEL.UP2.PROPOSER
        in_features = list(cfg.MODEL.UP2.BACKBONE.OUT_FEATURES)
        num_extra = prop.NUM_FEATURE_LEVELS + 1 - len(in_features)
        if num_extra < 0:
            raise ValueError(f"MODEL.UP2.PROPOSER.NUM_FEATURE_LEVELS={prop.NUM_FEATURE_LEVELS} with "
                             f"{len(in_features)} backbone levels {in_features}: expected at most "
                             f"{len(in_features) - 1} + extra levels")
        if not 0 < prop.TOPK_QUERIES <= prop.NUM_QUERIES:
            raise ValueError(f"MODEL.UP2.PROPOSER.TOPK_QUERIES ({prop.TOPK_QUERIES}) must be in "
                             f"[1, NUM_QUERIES={prop.NUM_QUERIES}]")
        if prop.NORM_GROUPS < 1 or prop.HIDDEN_DIM % prop.NORM_GROUPS:
            raise ValueError(f"MODEL.UP2.PROPOSER.NORM_GROUPS ({prop.NORM_GROUPS}) must be >= 1 and divide "
                             f"HIDDEN_DIM ({prop.HIDDEN_DIM})")
        feature_levels = list(prop.FUSION_FEATURE_LEVELS)
        unknown = [name for name in feature_levels if name not in input_shape]
        if unknown:
            raise ValueError(f"MODEL.UP2.PROPOSER.FUSION_FEATURE_LEVELS: {unknown} not among the backbone's "
                             f"outputs {sorted(input_shape)}")
        return {
            "input_projection": InputProjection(input_shape, in_features, prop.HIDDEN_DIM, num_extra_levels=num_extra,
                                                num_groups=prop.NORM_GROUPS),
            "encoder": DeformableEncoder(cfg),
            "query_selection": TwoStageQuerySelection(cfg),
            "decoder": DeformableDecoder(cfg),
            "mask_branch": MaskBranch(prop.HIDDEN_DIM, prop.MASK_DIM, num_groups=prop.NORM_GROUPS),
            "fusion": ProposalFusion(prop.HIDDEN_DIM, prop.FUSION_MASK_POOL_SIZE, prop.TOPK_QUERIES,
                                     [input_shape[name].channels for name in feature_levels]),
            "criterion": ProposalCriterion(cfg),
            "num_queries": prop.NUM_QUERIES,
            "fusion_feature_levels": feature_levels,
            "dn_enabled": prop.DN_ENABLED,
            "dn_num_queries": prop.DN_NUM_QUERIES,
            "dn_box_noise_scale": prop.DN_BOX_NOISE_SCALE,
            "dn_label_noise_ratio": prop.DN_LABEL_NOISE_RATIO,
        }

    @property
    def strides(self) -> List[int]:
        """Strides of F'0..F'4."""
        return self.input_projection.strides

    def forward(self, features: Dict[str, torch.Tensor], padding_mask: torch.Tensor,
                targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None) -> Dict:
        """
        Args:
            features: backbone outputs, e.g. ``res2..res5`` (B, C_l, H/s_l, W/s_l).
            padding_mask: (B, H, W) bool, True at the padding of the batched images (H, W padded size).
            targets: training only: B dicts with ``boxes`` (G_b, 4) cxcywh normalised by the image size
                and ``masks`` (G_b, H, W) at the padded size. Denoising and losses need them.

        Returns:
            dict with

            * ``regional_tokens`` (B, O, d), ``boxes`` (B, O, 4) cxcywh normalised by the image size,
              ``masks`` (B, O, H/4, W/4) logits, ``objectness`` (B, O) logits, ``keep_indices`` (B, O)
              (indices of the kept tokens among the N final-layer queries);
            * ``last_level`` (B, d, H/32, W/32) = F'3 and ``last_level_mask`` (B, H/32, W/32) bool;
            * ``predictions``: the final decoder layer's N matching queries, ``pred_logits`` (B, N, 1),
              ``pred_boxes`` (B, N, 4), ``pred_masks`` (B, N, H/4, W/4) (what the detector evaluates);
            * with ``targets``: ``losses`` (dict of weighted scalar losses of :class:`ProposalCriterion`),
              ``matched_indices`` (B pairs (query_idx in [0, N), gt_idx): final-layer Hungarian matches) and
              ``matched_token_indices`` (B pairs (token_idx in [0, O), gt_idx): the same matches restricted
              to the kept tokens, token_idx indexing ``regional_tokens``; matches of dropped queries are left
              out).

            The fusion layers get their gradient from whatever consumes ``regional_tokens``; the losses
            reach every other parameter.
        """
        projected = self.input_projection(features)
        masks = level_padding_masks(padding_mask, projected)
        enc = self.encoder(projected[1:], masks[1:])
        f1_enc = DeformableEncoder.split_levels(enc["memory"], enc["shapes"])[0]
        pixel_features = self.mask_branch.pixel_features(projected[0], f1_enc)

        sel = self.query_selection(enc["memory"], enc["padding_mask"], enc["shapes"], enc["valid_ratios"])
        content, reference, attn_mask, dn = sel["content"], sel["reference_boxes"], None, None
        if targets is not None and self.dn_enabled and self.training:
            dn = prepare_contrastive_denoising(
                targets, num_matching_queries=self.num_queries, num_dn_queries=self.dn_num_queries,
                box_noise_scale=self.dn_box_noise_scale, label_noise_ratio=self.dn_label_noise_ratio,
                device=content.device)
        if dn is not None:
            dn_content, dn_boxes = self.decoder.denoising_queries(dn)
            content = torch.cat([dn_content.to(content.dtype), content], dim=1)
            reference = torch.cat([dn_boxes.to(reference.dtype), reference], dim=1)
            attn_mask = dn["attn_mask"]
        dec = self.decoder(content, reference, enc["memory"], enc["padding_mask"], enc["spatial_shapes"],
                           enc["level_start_index"], enc["valid_ratios"], attn_mask)

        dn_meta = dn["dn_meta"] if dn is not None else None
        # masks of the earlier layers (and the encoder's) serve only the losses: without targets only the
        # final layer's are computed (they feed the fusion and the predictions)
        num_layers = len(dec["logits"])
        layers = [{"pred_logits": logits, "pred_boxes": boxes,
                   "pred_masks": (self.mask_branch.predict(embeds, pixel_features)
                                  if targets is not None or index == num_layers - 1 else None)}
                  for index, (logits, boxes, embeds) in enumerate(zip(dec["logits"], dec["boxes"], dec["mask_embeds"]))]
        # per layer and output: (DN part or None, matching part); outputs not computed stay None
        split_layers = [{k: split_denoising_outputs(v, dn_meta) if v is not None else (None, None)
                         for k, v in layer.items()} for layer in layers]
        matching = [{k: parts[1] for k, parts in layer.items()} for layer in split_layers]
        predictions = matching[-1]
        outputs = dict(predictions)
        outputs["aux_outputs"] = matching[:-1]
        enc_sel = sel["enc_outputs"]
        if targets is not None:
            outputs["enc_outputs"] = {
                "pred_logits": enc_sel["pred_logits"], "pred_boxes": enc_sel["pred_boxes"],
                "pred_masks": self.mask_branch.predict(self.decoder.mask_embed(enc_sel["features"]), pixel_features)}
        if dn is not None:
            dn_layers = [{k: parts[0] for k, parts in layer.items()} for layer in split_layers]
            outputs["dn_outputs"] = dict(dn_layers[-1], aux_outputs=dn_layers[:-1], dn_meta=dn_meta)

        _, matching_hidden = split_denoising_outputs(dec["hidden"][-1], dn_meta)
        fused = self.fusion(matching_hidden, predictions["pred_boxes"], predictions["pred_masks"],
                            predictions["pred_logits"], [features[name] for name in self.fusion_feature_levels])
        result = dict(fused)
        result["last_level"], result["last_level_mask"] = projected[3], masks[3]
        result["predictions"] = predictions
        if targets is not None:
            losses, indices = self.criterion(outputs, targets, return_indices=True)
            result["losses"] = losses
            result["matched_indices"] = indices
            result["matched_token_indices"] = map_indices_to_tokens(indices, fused["keep_indices"], self.num_queries)
        return result
