"""Attention masks of the unified decoder: literal expected matrices, and training == incremental decoding."""
import torch
import torch.nn.functional as F

import up2  # noqa: F401
from up2.modeling.decoder import (
    IMAGE_POSITION_ID, bidirectional_mask, caption_decoding_step, caption_position_ids, caption_training_mask,
    to_additive_mask,
)


def _b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_bidirectional_with_padding():
    pad = _b([[0, 0, 0], [0, 0, 1]])
    expected = _b([
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]],  # padding query sees itself only besides the real tokens
    ])
    assert torch.equal(bidirectional_mask(pad), expected)


def test_caption_training_mask_literal():
    # [<SPE>, i1, i2, w0, w1, w2, s0, s1, s2]
    expected = _b([
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # <SPE>
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # i1
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # i2
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # w0
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # w1
        [1, 1, 1, 1, 1, 1, 0, 0, 0],  # w2
        [1, 1, 1, 0, 0, 0, 1, 0, 0],  # s0 -> predicts w0
        [1, 1, 1, 1, 0, 0, 0, 1, 0],  # s1 -> predicts w1
        [1, 1, 1, 1, 1, 0, 0, 0, 1],  # s2 -> predicts w2
    ])
    assert torch.equal(caption_training_mask(2, 3), expected)
    assert caption_position_ids(2, 3).tolist() == [-1, -1, -1, 0, 1, 2, 0, 1, 2]
    assert IMAGE_POSITION_ID == -1


def test_caption_training_mask_padding():
    image_pad = _b([[0, 1]])  # i2 is padding
    word_pad = _b([[0, 0, 1]])  # w2 is padding
    expected = _b([
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # padded i2 still sees itself
        [1, 1, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 1, 0, 0, 0],  # padded w2 sees itself
        [1, 1, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 1, 0, 0, 0, 1, 0],
        [1, 1, 0, 1, 1, 0, 0, 0, 1],
    ])
    assert torch.equal(caption_training_mask(2, 3, image_pad, word_pad), expected[None])


def test_caption_decoding_steps_literal():
    image_pad = _b([[0, 0], [0, 1]])
    step0 = caption_decoding_step(0, 3, image_pad)
    assert torch.equal(step0.attn_mask, _b([[[1, 1, 1, 1]], [[1, 1, 0, 1]]]))
    assert step0.position_ids.tolist() == [0] and step0.num_keep == 0
    # step 2: cache = [<SPE>, i1, i2, w0], new = [w1, s2]
    step2 = caption_decoding_step(2, 3, image_pad)
    assert torch.equal(step2.attn_mask, _b([
        [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]],
        [[1, 1, 0, 1, 1, 0], [1, 1, 0, 1, 1, 1]],
    ]))
    assert step2.position_ids.tolist() == [1, 2] and step2.num_keep == 1


def test_additive_mask():
    add = to_additive_mask(_b([[1, 0]]))
    assert add[0, 0] == 0 and add[0, 1] == float("-inf")


class _ToyDecoder(torch.nn.Module):
    """Two single-head attention layers with a text position embedding; keys/values can be cached."""

    def __init__(self, dim=8, positions=8):
        super().__init__()
        self.pos = torch.nn.Embedding(positions, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))

    def embed(self, x, position_ids):
        text = position_ids >= 0
        return x + self.pos(position_ids.clamp(min=0)) * text[:, None]

    def forward(self, x, mask, cache=None, num_keep=None):
        """x (L, d), mask (L, K) with K = cached + L; cache: list of (k, v) per layer, updated in place."""
        for layer, qkv in enumerate(self.qkv):
            q, k, v = qkv(x).chunk(3, dim=-1)
            if cache is not None:
                if cache[layer] is not None:
                    k_all, v_all = torch.cat([cache[layer][0], k]), torch.cat([cache[layer][1], v])
                else:
                    k_all, v_all = k, v
                cache[layer] = (k_all[:k_all.shape[0] - x.shape[0] + num_keep],
                                v_all[:v_all.shape[0] - x.shape[0] + num_keep])
                k, v = k_all, v_all
            x = x + F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None])[0]
        return x


def test_incremental_decoding_matches_training_sequence():
    torch.manual_seed(0)
    model = _ToyDecoder().double()
    n, T = 2, 4
    image = torch.randn(1 + n, 8, dtype=torch.float64)
    words, spe = torch.randn(T, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    pos = caption_position_ids(n, T)
    seq = model.embed(torch.cat([image, words, spe.expand(T, -1)]), pos)
    full = model(seq, caption_training_mask(n, T))
    cache = [None, None]
    image_side = model.embed(image, pos[:1 + n])
    model(image_side, bidirectional_mask(torch.zeros(1, 1 + n, dtype=torch.bool))[0], cache, num_keep=1 + n)
    for t in range(T):
        step = caption_decoding_step(t, 1 + n)
        tokens = spe[None] if t == 0 else torch.stack([words[t - 1], spe])
        out = model(model.embed(tokens, step.position_ids), step.attn_mask[0], cache, step.num_keep)
        assert torch.allclose(out[-1], full[1 + n + T + t], atol=1e-12), t
        if t > 0:  # the committed word's features equal its features in the training sequence
            assert torch.allclose(out[0], full[1 + n + t - 1], atol=1e-12), t
        assert cache[0][0].shape[0] == 1 + n + max(t, 0)
