"""Region proposer (MaskDINO-like, class-agnostic): matcher, criterion, point sampling, denoising."""
from up2.modeling.proposer.criterion import LOSS_NAMES, ProposalCriterion
from up2.modeling.proposer.denoising import (build_dn_attention_mask, prepare_contrastive_denoising,
                                             split_denoising_outputs)
from up2.modeling.proposer.matcher import HungarianMatcher, match_per_image_reference
from up2.modeling.proposer.point_sampling import importance_split, point_sample, sample_uncertain_points

__all__ = ["HungarianMatcher", "match_per_image_reference", "ProposalCriterion", "LOSS_NAMES",
           "build_dn_attention_mask", "prepare_contrastive_denoising", "split_denoising_outputs",
           "point_sample", "sample_uncertain_points", "importance_split"]
