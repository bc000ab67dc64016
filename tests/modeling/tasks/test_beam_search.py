"""Beam search / greedy decoding: exhaustive optimum, greedy == beam 1, KV cache == recomputation."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import up2  # noqa: F401
from up2.modeling.tasks import KVCache, beam_search, greedy_decode, reorder_state

V, EOS, BOS, MAX_LEN = 4, 3, 0, 4  # tokens 0..2 are words (0 doubles as bos), 3 is eos


class _Markov2:
    """Order-2 Markov scorer; the token before the last one is read from the *state*, so a wrong
    reordering of the state changes the scores."""

    def __init__(self, seed, batch_size):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(batch_size, V, V, V, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)

    def log_prob(self, b, seq):
        total, prev2, prev1 = 0.0, BOS, BOS
        for token in seq:
            total += float(self.table[b, prev2, prev1, token])
            prev2, prev1 = prev1, token
        return total

    def step(self, tokens, state):
        prev1 = tokens[:, 0]
        out = self.table[state["element"], state["prev"], prev1]
        return out, {"element": state["element"], "prev": prev1}


def _exhaustive(model, b, alpha=0.0):
    best = (-math.inf, None)
    for length in range(1, MAX_LEN + 1):
        for words in itertools.product(range(EOS), repeat=length - 1):
            endings = [[EOS]] + ([[w] for w in range(EOS)] if length == MAX_LEN else [])
            for seq in (list(words) + end for end in endings):
                score = model.log_prob(b, seq) / ((5 + len(seq)) / 6) ** alpha
                if score > best[0]:
                    best = (score, [t for t in seq if t != EOS])
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_beam_search_finds_exhaustive_optimum(alpha):
    batch = 5
    model = _Markov2(0, batch)
    state = {"element": torch.arange(batch), "prev": torch.full((batch,), BOS)}
    # at most 3 ** 3 = 27 live prefixes and 27 * 4 = 108 candidates per step: with beam 108 nothing is pruned
    # (an eos candidate ends a hypothesis only within the best `beam` candidates), so the search must be exact
    out = beam_search(model.step, state, batch, 108, MAX_LEN, BOS, EOS, length_penalty=alpha, vocab_size=V)
    for b in range(batch):
        score, seq = _exhaustive(model, b, alpha)
        assert out.sequences[b] == seq
        assert out.scores[b].item() == pytest.approx(score, abs=1e-9)


def test_small_beam_scores_are_consistent():
    batch = 6
    model = _Markov2(1, batch)
    state = {"element": torch.arange(batch), "prev": torch.full((batch,), BOS)}
    out = beam_search(model.step, state, batch, 2, MAX_LEN, BOS, EOS)
    for b in range(batch):
        seq = out.sequences[b]
        full = seq + [EOS] if len(seq) < MAX_LEN else seq
        assert out.scores[b].item() == pytest.approx(model.log_prob(b, full), abs=1e-9)  # state followed its beam
        assert out.scores[b].item() <= _exhaustive(model, b)[0] + 1e-12


def test_greedy_equals_beam_one():
    batch = 8
    model = _Markov2(2, batch)
    state = {"element": torch.arange(batch), "prev": torch.full((batch,), BOS)}
    greedy = greedy_decode(model.step, state, batch, MAX_LEN, BOS, EOS)
    beam = beam_search(model.step, state, batch, 1, MAX_LEN, BOS, EOS)
    assert greedy.sequences == beam.sequences
    assert torch.allclose(greedy.scores, beam.scores)


def test_reorder_state_pytree():
    cache = KVCache(1)
    cache.update(0, torch.arange(3.0).view(3, 1, 1, 1), torch.arange(3.0).view(3, 1, 1, 1) + 10)
    state = {"a": [torch.tensor([0, 1, 2]), (torch.tensor([[0], [1], [2]]), None)], "cache": cache}
    out = reorder_state(state, torch.tensor([2, 2, 0]))
    assert out["a"][0].tolist() == [2, 2, 0] and out["a"][1][0].flatten().tolist() == [2, 2, 0]
    assert out["a"][1][1] is None
    assert out["cache"].layers[0][0].flatten().tolist() == [2, 2, 0]
    assert out["cache"].layers[0][1].flatten().tolist() == [12, 12, 10]


class _ToyLM(torch.nn.Module):
    """Tiny 2-layer causal transformer (2 heads) with learned positions; optional KV cache."""

    def __init__(self, vocab=6, dim=8, heads=2, layers=2, positions=8):
        super().__init__()
        self.heads = heads
        self.embed, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(positions, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.ffn = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, start=0, cache=None):
        """tokens (N, L) at positions start..start+L-1 -> log-probs of the last position (N, V)."""
        n, length = tokens.shape
        x = self.embed(tokens) + self.pos(torch.arange(start, start + length))
        for i, (qkv, ffn) in enumerate(zip(self.qkv, self.ffn)):
            q, k, v = (t.view(n, length, self.heads, -1).transpose(1, 2) for t in qkv(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = cache.update(i, k, v)
            mask = torch.ones(length, k.shape[2], dtype=torch.bool).tril(k.shape[2] - length)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, length, -1)
            x = x + torch.tanh(ffn(x))
        return self.head(x[:, -1]).log_softmax(-1)


@pytest.mark.parametrize("beam", [1, 3])
def test_kv_cached_decoding_equals_recomputation(beam):
    torch.manual_seed(0)
    model = _ToyLM().double().eval()
    batch, max_len, bos, eos = 3, 6, 0, 5
    logs = {"cached": [], "full": []}

    def cached_step(tokens, state):
        lp = model(tokens, start=state["length"][0].item(), cache=state["cache"])
        logs["cached"].append(lp)
        return lp, {"cache": state["cache"], "length": state["length"] + 1}

    def full_step(tokens, state):
        prefix = torch.cat([state["prefix"], tokens], dim=1)
        lp = model(prefix)
        logs["full"].append(lp)
        return lp, {"prefix": prefix}

    with torch.no_grad():
        if beam == 1:
            cached = greedy_decode(cached_step, {"cache": KVCache(2), "length": torch.zeros(batch, dtype=torch.long)},
                                   batch, max_len, bos, eos)
            full = greedy_decode(full_step, {"prefix": torch.zeros(batch, 0, dtype=torch.long)}, batch, max_len, bos,
                                 eos)
        else:
            init_cache = KVCache(2)
            cached = beam_search(cached_step, {"cache": init_cache, "length": torch.zeros(batch, dtype=torch.long)},
                                 batch, beam, max_len, bos, eos)
            full = beam_search(full_step, {"prefix": torch.zeros(batch, 0, dtype=torch.long)}, batch, beam, max_len,
                               bos, eos)
    assert cached.sequences == full.sequences
    assert torch.allclose(cached.scores, full.scores, atol=1e-6)
    assert len(logs["cached"]) == len(logs["full"])
    for a, b in zip(logs["cached"], logs["full"]):
        assert torch.allclose(a, b, atol=1e-6)
    # the reference: rescoring each returned sequence from scratch gives its score
    for b, seq in enumerate(cached.sequences):
        prefix, total = [bos], 0.0
        for token in seq + ([eos] if len(seq) < max_len else []):
            total += model(torch.tensor([prefix])).squeeze(0)[token].item()
            prefix.append(token)
        assert cached.scores[b].item() == pytest.approx(total, abs=1e-9)
