"""Region proposer (MaskDINO-like, class-agnostic): encoder, query selection, decoder, mask branch,
fusion, matcher, criterion, point sampling, denoising; ``DeformableRegionProposer`` in PROPOSER_REGISTRY."""
from up2.modeling.image_encoder.proposer.criterion import LOSS_NAMES, ProposalCriterion
from up2.modeling.image_encoder.proposer.decoder import DeformableDecoder
from up2.modeling.image_encoder.proposer.denoising import (build_dn_attention_mask, prepare_contrastive_denoising,
                                                           split_denoising_outputs)
from up2.modeling.image_encoder.proposer.encoder import DeformableEncoder
from up2.modeling.image_encoder.proposer.fusion import ProposalFusion
from up2.modeling.image_encoder.proposer.mask_branch import MaskBranch
from up2.modeling.image_encoder.proposer.matcher import HungarianMatcher, match_per_image_reference
from up2.modeling.image_encoder.proposer.point_sampling import importance_split, point_sample, sample_uncertain_points
from up2.modeling.image_encoder.proposer.proposer import DeformableRegionProposer
from up2.modeling.image_encoder.proposer.query_selection import TwoStageQuerySelection

__all__ = ["HungarianMatcher", "match_per_image_reference", "ProposalCriterion", "LOSS_NAMES",
           "build_dn_attention_mask", "prepare_contrastive_denoising", "split_denoising_outputs",
           "point_sample", "sample_uncertain_points", "importance_split", "DeformableEncoder",
           "TwoStageQuerySelection", "DeformableDecoder", "MaskBranch", "ProposalFusion",
           "DeformableRegionProposer"]
