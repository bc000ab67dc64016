"""Two-stage query selection (paper Appendix A; Deformable DETR two-stage, DINO mixed selection).

Every encoder pixel of level l is a proposal: a box centred on the pixel (normalised by the valid,
unpadded extent of the image) with width = height = 0.05 * 2**l. The pixel's encoded feature goes
through ``Linear + LayerNorm``; an objectness head (``Linear(d, 1)``) scores it and a box MLP predicts
a delta added to the proposal in inverse-sigmoid space. The top-N pixels by objectness become the
decoder queries: content = selected feature (detached) + one of N learned query embeddings,
reference box = the refined box (detached). The selected predictions, with gradient, are the
``enc_outputs`` supervised by the criterion.
"""
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from torch import nn

__all__ = ["TwoStageQuerySelection", "MLP", "inverse_sigmoid", "encoder_proposals"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps]."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def encoder_proposals(shapes: List[Tuple[int, int]], valid_ratios: torch.Tensor, padding_mask: torch.Tensor,
                      base_size: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor box of every encoder pixel.

    Args:
        shapes: L pairs (H_l, W_l).
        valid_ratios: (B, L, 2) (w, h) valid fraction of each level.
        padding_mask: (B, S) bool, True at padded pixels.
        base_size: side of level-0 proposals; level l uses base_size * 2**l.

    Returns:
        ``(proposals (B, S, 4) cxcywh in [0, 1], valid (B, S) bool)``: a proposal is valid when its
        pixel is not padding and all coordinates lie in (0.01, 0.99).
    """
    device = valid_ratios.device
    batch = valid_ratios.shape[0]
    boxes = []
    for level, (height, width) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(width, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        scale_w = (valid_ratios[:, level, 0] * width).view(batch, 1)
        scale_h = (valid_ratios[:, level, 1] * height).view(batch, 1)
        cx = xs.reshape(1, -1) / scale_w
        cy = ys.reshape(1, -1) / scale_h
        wh = torch.full_like(cx, base_size * 2.0 ** level)
        boxes.append(torch.stack([cx, cy, wh, wh], dim=-1))
    proposals = torch.cat(boxes, dim=1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    return proposals, valid


class TwoStageQuerySelection(nn.Module):
    """Per-pixel objectness + box on the encoder output, and top-N query selection.

    Args:
        hidden_dim: d.
        num_queries: N, queries given to the decoder (``NUM_QUERIES``).
    """

    @configurable
    def __init__(self, *, hidden_dim: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_norm = nn.LayerNorm(hidden_dim)
        self.objectness = nn.Linear(hidden_dim, 1)
        self.box_delta = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        nn.init.zeros_(self.box_delta.layers[-1].weight)
        nn.init.zeros_(self.box_delta.layers[-1].bias)
        nn.init.constant_(self.objectness.bias, -4.6)  # prior probability 0.01 (focal loss convention)

    @classmethod
    def from_config(cls, cfg):
        return {"hidden_dim": cfg.MODEL.UP2.PROPOSER.HIDDEN_DIM, "num_queries": cfg.MODEL.UP2.PROPOSER.NUM_QUERIES}

    def forward(self, memory: torch.Tensor, padding_mask: torch.Tensor, shapes: List[Tuple[int, int]],
                valid_ratios: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            memory: (B, S, d) encoder output.
            padding_mask: (B, S) bool, True at padding.
            shapes: L pairs (H_l, W_l) of the levels in ``memory``.
            valid_ratios: (B, L, 2).

        Returns:
            dict with

            * ``content``: (B, N, d) decoder content queries (selected features detached + query embeddings);
            * ``reference_boxes``: (B, N, 4) cxcywh in [0, 1], detached;
            * ``topk_indices``: (B, N) long indices into S, by decreasing objectness;
            * ``enc_outputs``: ``pred_logits`` (B, N, 1), ``pred_boxes`` (B, N, 4) and ``features`` (B, N, d)
              of the selected pixels, with gradient;
            * ``all_logits``: (B, S, 1) objectness logits of every pixel (invalid pixels included);
            * ``valid``: (B, S) bool, pixels that may be selected (not padding, proposal inside the image).
        """
        batch, num_pixels, _ = memory.shape
        if num_pixels < self.num_queries:
            raise ValueError(f"TwoStageQuerySelection: the encoder has {num_pixels} pixels for {self.num_queries} "
                             "queries (MODEL.UP2.PROPOSER.NUM_QUERIES); use larger images or fewer queries")
        proposals, valid = encoder_proposals(shapes, valid_ratios, padding_mask)
        proposals = proposals.to(memory.dtype)
        features = memory.masked_fill(~valid.unsqueeze(-1), 0.0)
        features = self.enc_norm(self.enc_output(features))
        logits = self.objectness(features)  # (B, S, 1)
        boxes_unact = self.box_delta(features) + inverse_sigmoid(proposals)
        scores = logits[..., 0].detach().float().masked_fill(~valid, float("-inf"))
        topk = scores.topk(self.num_queries, dim=1).indices  # (B, N)
        gather = lambda t: t.gather(1, topk.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        sel_features, sel_logits, sel_boxes = gather(features), gather(logits), gather(boxes_unact).sigmoid()
        content = sel_features.detach() + self.query_embed.weight.unsqueeze(0).to(memory.dtype)
        return {"content": content, "reference_boxes": sel_boxes.detach(), "topk_indices": topk,
                "enc_outputs": {"pred_logits": sel_logits, "pred_boxes": sel_boxes, "features": sel_features},
                "all_logits": logits, "valid": valid}
