"""Beam search and greedy decoding over a step function with a reorderable state (e.g. a KV cache).

``step_fn(tokens, state) -> (log_probs, new_state)``: ``tokens`` (N, 1) are the last chosen tokens of
the N = B*beam live hypotheses (``bos_id`` at the first call), ``log_probs`` (N, V) the next-token
log-probabilities, ``state`` any pytree (tensor, list, tuple, dict, None, or an object with
``index_select(dim, index)`` such as :class:`KVCache`) whose tensors have leading dim N; the search
reorders it so that row i always follows hypothesis i.

Scores: sum of log-probs divided by the GNMT length penalty ((5 + len) / 6) ** alpha, len counting the
generated tokens including eos; alpha = 0 gives the raw sum (Uni-Perceiver v1: beam 2, 21 tokens).
An eos candidate finishes a hypothesis only when it ranks among the ``beam`` best candidates of its
step (fairseq's rule; beam 1 is then exactly greedy). Finished hypotheses are kept (best ``beam`` per
element) until no live beam can beat the worst kept.
"""
import logging
from typing import Callable, List, NamedTuple, Optional

import torch

__all__ = ["beam_search", "greedy_decode", "reorder_state", "KVCache", "DecodeOutput"]

logger = logging.getLogger(__name__)


class DecodeOutput(NamedTuple):
    """sequences: B lists of token ids (no bos, no eos); scores: (B,) length-penalised scores."""

    sequences: List[List[int]]
    scores: torch.Tensor


def reorder_state(state, index: torch.Tensor):
    """Selects rows ``index`` (leading dim) of every tensor of a pytree state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, dict):
        return {key: reorder_state(value, index) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        items = [reorder_state(value, index) for value in state]
        return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)
    if hasattr(state, "index_select"):
        return state.index_select(0, index)
    raise TypeError(f"reorder_state: unsupported state type {type(state).__name__}")


class KVCache:
    """Per-layer cached keys and values (N, H, L, Dh) of a causal transformer.

    Args:
        num_layers: layers of the model.
    """

    def __init__(self, num_layers: int):
        self.layers = [None] * num_layers

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor, num_keep: Optional[int] = None):
        """Appends new keys/values (N, H, L_new, Dh) of ``layer`` and returns all of them (cached + new).

        Only the first ``num_keep`` new positions are stored (default: all), e.g. 1 of ``[w, <spe>]``.
        """
        if self.layers[layer] is not None:
            key = torch.cat([self.layers[layer][0], key], dim=2)
            value = torch.cat([self.layers[layer][1], value], dim=2)
        drop = 0 if num_keep is None else key.shape[2] - (self.length(layer) + num_keep)
        self.layers[layer] = (key[:, :, :key.shape[2] - drop], value[:, :, :value.shape[2] - drop])
        return key, value

    def length(self, layer: int = 0) -> int:
        return 0 if self.layers[layer] is None else self.layers[layer][0].shape[2]

    def index_select(self, dim: int, index: torch.Tensor) -> "KVCache":
        """New cache whose rows (dim 0 only) are ``index`` of this one."""
        if dim != 0:
            raise ValueError("KVCache.index_select: only dim 0 (hypotheses) can be selected")
        out = KVCache(len(self.layers))
        out.layers = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.layers]
        return out


def _expand_state(state, batch_size: int, beam_size: int):
    """Repeats a state with leading dim B to B*beam (row b*beam + j = element b); B*beam is kept as is."""
    if beam_size == 1:
        return state
    probe = [state]
    while probe and not isinstance(probe[0], torch.Tensor):
        first = probe.pop(0)
        if isinstance(first, dict):
            probe.extend(first.values())
        elif isinstance(first, (list, tuple)):
            probe.extend(first)
        elif isinstance(first, KVCache):
            probe.extend(kv[0] for kv in first.layers if kv is not None)
    if probe and probe[0].shape[0] == batch_size * beam_size:
        return state
    index = torch.arange(batch_size).repeat_interleave(beam_size)
    return reorder_state(state, index.to(probe[0].device) if probe else index)


def beam_search(step_fn: Callable, init_state, batch_size: int, beam_size: int, max_length: int, bos_id: int,
                eos_id: int, length_penalty: float = 0.0, vocab_size: Optional[int] = None,
                device=None) -> DecodeOutput:
    """Beam search of at most ``max_length`` generated tokens (eos included).

    Args:
        step_fn: see the module docstring.
        init_state: state with leading dim B (repeated per beam) or B*beam.
        vocab_size: V (checked against ``log_probs`` when given).

    Returns:
        DecodeOutput with the best finished hypothesis of each element.
    """
    alpha, num = length_penalty, batch_size * beam_size
    state = _expand_state(init_state, batch_size, beam_size)
    tokens = torch.full((num, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch_size, beam_size), float("-inf"), device=device, dtype=torch.float64)
    scores[:, 0] = 0.0  # identical beams at the start: expand only the first
    history = torch.zeros(batch_size, beam_size, 0, dtype=torch.long, device=device)
    finished = [[] for _ in range(batch_size)]  # (score, tokens)
    done = [False] * batch_size
    for step in range(max_length):
        log_probs, state = step_fn(tokens, state)
        vocab = log_probs.shape[-1]
        if vocab_size is not None and vocab != vocab_size:
            raise ValueError(f"beam_search: step_fn returned {vocab} log-probs per row, expected {vocab_size}")
        candidates = (scores.unsqueeze(-1) + log_probs.view(batch_size, beam_size, vocab).to(scores.dtype))
        top_scores, top_index = candidates.view(batch_size, -1).topk(min(2 * beam_size, beam_size * vocab), dim=-1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == eos_id
        penalty = ((5.0 + step + 1) / 6.0) ** alpha
        # as in fairseq, an eos candidate ends a hypothesis only if it ranks among the best `beam` candidates
        # (so beam 1 is exactly greedy decoding)
        in_beam = torch.arange(top_scores.shape[1], device=top_scores.device) < beam_size
        for b, k in (is_eos & in_beam & torch.isfinite(top_scores)).nonzero().tolist():
            if not done[b]:
                seq = history[b, top_beam[b, k]].tolist()
                finished[b].append((float(top_scores[b, k]) / penalty, seq))
        live_scores = top_scores.masked_fill(is_eos, float("-inf"))
        if step == max_length - 1:  # unfinished hypotheses end here
            for b in range(batch_size):
                for k in range(live_scores.shape[1]):
                    if not done[b] and torch.isfinite(live_scores[b, k]):
                        finished[b].append((float(live_scores[b, k]) / penalty,
                                            history[b, top_beam[b, k]].tolist() + [int(top_token[b, k])]))
            break
        keep_scores, keep = live_scores.topk(beam_size, dim=-1)
        origin = top_beam.gather(1, keep)
        scores = keep_scores
        new_tokens = top_token.gather(1, keep)
        history = torch.cat([history.gather(1, origin[..., None].expand(-1, -1, history.shape[2])),
                             new_tokens[..., None]], dim=2)
        flat_origin = (origin + torch.arange(batch_size, device=origin.device)[:, None] * beam_size).view(-1)
        state = reorder_state(state, flat_origin)
        tokens = new_tokens.view(num, 1)
        best_future = scores.max(dim=1).values / ((5.0 + max_length) / 6.0) ** alpha  # log-probs <= 0
        for b in range(batch_size):
            finished[b] = sorted(finished[b], key=lambda item: -item[0])[:beam_size]
            if not done[b] and (not torch.isfinite(best_future[b]) or (
                    len(finished[b]) >= beam_size and finished[b][-1][0] >= float(best_future[b]))):
                done[b] = True
        if all(done):
            break
    sequences, best = [], []
    for b in range(batch_size):
        score, seq = max(finished[b], key=lambda item: item[0])
        sequences.append(seq)
        best.append(score)
    return DecodeOutput(sequences, torch.tensor(best, dtype=torch.float64))


def greedy_decode(step_fn: Callable, init_state, batch_size: int, max_length: int, bos_id: int, eos_id: int,
                  device=None) -> DecodeOutput:
    """Arg-max decoding of at most ``max_length`` tokens; scores are raw sums of log-probs (eos included)."""
    tokens = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    state, scores = init_state, torch.zeros(batch_size, device=device, dtype=torch.float64)
    alive = torch.ones(batch_size, dtype=torch.bool, device=device)
    sequences = [[] for _ in range(batch_size)]
    for _ in range(max_length):
        log_probs, state = step_fn(tokens, state)
        best_lp, best = log_probs.max(dim=-1)
        scores += torch.where(alive, best_lp.to(scores.dtype), torch.zeros_like(scores))
        for b in alive.nonzero().flatten().tolist():
            if int(best[b]) != eos_id:
                sequences[b].append(int(best[b]))
        alive &= best != eos_id
        if not bool(alive.any()):
            break
        tokens = torch.where(alive, best, torch.full_like(best, eos_id)).view(batch_size, 1)
    return DecodeOutput(sequences, scores)
