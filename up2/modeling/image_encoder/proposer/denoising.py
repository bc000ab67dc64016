"""Contrastive query denoising (DINO / MaskDINO) for a class-agnostic proposer.

Layout of the decoder queries during training: the T_dn = num_groups * group_size denoising (DN)
queries first, then the N matching queries. Each group holds ``2 * single_pad`` queries
(``single_pad`` = the largest ground-truth count of the batch, at least 1): positions
``[0, single_pad)`` are positive copies of the ground truth (box noise below lambda), positions
``[single_pad, 2 * single_pad)`` negative copies (box noise in [lambda, 2 lambda)), and copies for
j >= G_b in an image are padding.

Content ("label") of a DN query: the proposer classifies objectness only, so the content embedding
is a learned 2-entry label embedding owned by the decoder, index ``DN_LABEL_FOREGROUND`` (1) for a
ground-truth copy and ``DN_LABEL_BACKGROUND`` (0) otherwise. Label noise (DINO applies it to positive
and negative copies alike) flips a copy's content to background with probability
``label_noise_ratio / 2``; padding queries have background content and a zero box and are marked in
``padding_mask``. Box noise follows DINO: each xyxy corner moves by ``u * (w/2 or h/2) * scale``
with random sign, u in [0, 1) for positives and [1, 2) for negatives, and is clamped to [0, 1].
"""
import logging
from typing import Dict, Optional, Sequence

import torch
from torchvision.ops import box_convert

__all__ = ["build_dn_attention_mask", "prepare_contrastive_denoising", "split_denoising_outputs",
           "DN_LABEL_BACKGROUND", "DN_LABEL_FOREGROUND"]

logger = logging.getLogger(__name__)

DN_LABEL_BACKGROUND = 0
DN_LABEL_FOREGROUND = 1


def build_dn_attention_mask(num_matching_queries: int, num_groups: int, group_size: int,
                            device=None) -> torch.Tensor:
    """Self-attention mask of the decoder with DN queries first.

    Matching queries see only matching queries; a DN query sees its own group and the matching
    queries (as in DN-DETR / DINO), never another group.

    Returns:
        (T, T) bool, True = attention blocked, T = num_groups * group_size + num_matching_queries.
    """
    num_dn = num_groups * group_size
    total = num_dn + num_matching_queries
    group = torch.arange(total, device=device) // max(group_size, 1)
    is_dn = torch.arange(total, device=device) < num_dn
    blocked = is_dn[:, None] & is_dn[None, :] & (group[:, None] != group[None, :])  # across DN groups
    blocked |= ~is_dn[:, None] & is_dn[None, :]  # matching queries never see DN queries
    return blocked


def _rand(shape, generator, device):
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def prepare_contrastive_denoising(targets: Sequence[Dict[str, torch.Tensor]], *, num_matching_queries: int,
                                  num_dn_queries: int = 100, box_noise_scale: float = 1.0,
                                  label_noise_ratio: float = 0.5, generator: Optional[torch.Generator] = None,
                                  device=None) -> Optional[Dict]:
    """Noised positive and negative box queries of every ground truth, for training.

    Args:
        targets: B dicts with ``boxes`` (G_b, 4) cxcywh normalised.
        num_matching_queries: N, the decoder's matching queries (for the attention mask).
        num_dn_queries: budget of DN queries; num_groups = max(1, num_dn_queries // (2 * single_pad)).
            0 disables denoising (returns None).
        box_noise_scale: lambda of the box noise (Table 7: 1.0).
        label_noise_ratio: 2 x the probability of flipping a copy's content to background (Table 7: 0.5).
        generator: random generator (on any device).
        device: device of the outputs (default: the device of the first target's boxes).

    Returns:
        None if ``num_dn_queries == 0``, else a dict:

        * ``boxes``: (B, T_dn, 4) noised cxcywh boxes in [0, 1] (zero for padding); the decoder
          typically uses ``inverse_sigmoid(boxes)`` as reference points;
        * ``labels``: (B, T_dn) int64 content indices (0 background, 1 foreground);
        * ``padding_mask``: (B, T_dn) bool, True for padding queries;
        * ``attn_mask``: (T_dn + N, T_dn + N) bool, :func:`build_dn_attention_mask`;
        * ``dn_meta``: ``num_dn_groups``, ``single_pad``, ``group_size`` (= 2 * single_pad),
          ``num_dn_queries`` (T_dn), ``positive_idx`` / ``negative_idx`` (per image (num_groups * G_b,)
          query indices, group-major) and ``matched_indices`` (per image ``(positive_idx, gt_idx)`` with
          gt_idx = arange(G_b) repeated per group): what :class:`ProposalCriterion` reads.

        A batch without ground truth still gets DN queries (single_pad = 1, all padding), so the
        structure of the decoder's outputs and the loss keys do not depend on the annotations.
    """
    if num_dn_queries < 0 or box_noise_scale < 0 or not 0 <= label_noise_ratio <= 1:
        raise ValueError(f"prepare_contrastive_denoising: invalid num_dn_queries={num_dn_queries}, "
                         f"box_noise_scale={box_noise_scale} or label_noise_ratio={label_noise_ratio}")
    if num_dn_queries == 0:
        return None
    if device is None:
        device = targets[0]["boxes"].device if len(targets) else torch.device("cpu")
    sizes = [len(t["boxes"]) for t in targets]
    batch = len(targets)
    single_pad = max(max(sizes, default=0), 1)
    group_size = 2 * single_pad
    num_groups = max(1, num_dn_queries // group_size)
    num_dn = num_groups * group_size

    # Ground truth padded to single_pad, repeated for positive and negative copies of every group.
    gt = torch.zeros((batch, single_pad, 4), device=device)
    valid = torch.zeros((batch, single_pad), dtype=torch.bool, device=device)
    for b, target in enumerate(targets):
        gt[b, :sizes[b]] = target["boxes"].to(device=device, dtype=torch.float32)
        valid[b, :sizes[b]] = True
    gt = gt.unsqueeze(1).expand(batch, num_groups, single_pad, 4)
    gt = torch.stack([gt, gt], dim=2).reshape(batch, num_dn, 4)  # group-major: [pos..., neg...] per group
    valid = valid[:, None, None, :].expand(batch, num_groups, 2, single_pad).reshape(batch, num_dn)
    negative = (torch.arange(num_dn, device=device) % group_size >= single_pad).expand(batch, num_dn)

    # Box noise (DINO): corners move by u * half-size * scale, u in [0,1) (pos) or [1,2) (neg).
    xyxy = box_convert(gt, "cxcywh", "xyxy")
    half = torch.cat([gt[..., 2:], gt[..., 2:]], dim=-1) / 2
    magnitude = _rand((batch, num_dn, 4), generator, device) + negative.unsqueeze(-1).float()
    sign = _rand((batch, num_dn, 4), generator, device).ge(0.5).float() * 2 - 1
    noised = (xyxy + sign * magnitude * half * box_noise_scale).clamp(0.0, 1.0)
    boxes = box_convert(noised, "xyxy", "cxcywh") * valid.unsqueeze(-1)

    # Label noise: flip a ground-truth copy's content to background with probability ratio / 2.
    flip = _rand((batch, num_dn), generator, device) < label_noise_ratio * 0.5
    labels = (valid & ~flip).long() * DN_LABEL_FOREGROUND

    positive_idx, negative_idx, matched = [], [], []
    for size in sizes:
        offsets = torch.arange(num_groups, device=device)[:, None] * group_size
        pos = (offsets + torch.arange(size, device=device)[None]).reshape(-1)
        positive_idx.append(pos)
        negative_idx.append(pos + single_pad)
        matched.append((pos, torch.arange(size, device=device).repeat(num_groups)))
    dn_meta = {"num_dn_groups": num_groups, "single_pad": single_pad, "group_size": group_size,
               "num_dn_queries": num_dn, "positive_idx": positive_idx, "negative_idx": negative_idx,
               "matched_indices": matched}
    return {"boxes": boxes, "labels": labels, "padding_mask": ~valid,
            "attn_mask": build_dn_attention_mask(num_matching_queries, num_groups, group_size, device),
            "dn_meta": dn_meta}


def split_denoising_outputs(tensor: torch.Tensor, dn_meta: Optional[Dict]):
    """Splits a (B, T_dn + N, ...) decoder output into its DN part (B, T_dn, ...) and matching part.

    Returns ``(None, tensor)`` when ``dn_meta`` is None (no denoising).
    """
    if dn_meta is None:
        return None, tensor
    num_dn = dn_meta["num_dn_queries"]
    return tensor[:, :num_dn], tensor[:, num_dn:]
