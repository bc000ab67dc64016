"""UnifiedDecoder on hand-built cases: with weights chosen so that attention is a plain average of the
normalised visible tokens, its outputs are worked out by hand for a causal mask and for padding; with
random weights it equals an independent pre-norm Transformer written here; embeddings add the modality
and only the given text positions."""
import math

import pytest
import torch
import torch.nn.functional as F

from up2.modeling.decoder import Segment, UnifiedDecoder
from up2.modeling.moe import FFN, MODALITY_IMAGE, MODALITY_TEXT, SIDE_INPUT

DIM = 4
U = torch.tensor([1.0, -1.0, 1.0, -1.0])  # LayerNorm(U) = U (mean 0, variance 1)
W = torch.tensor([1.0, 1.0, -1.0, -1.0])
LN_SCALE = 1 / math.sqrt(1 + 1e-5)  # LayerNorm's eps


def _decoder(num_heads=1, num_layers=1, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return UnifiedDecoder(dim=DIM, num_heads=num_heads, ffns=[FFN(DIM, 8) for _ in range(num_layers)], drop_path=0.0,
                          dropout=0.0, layer_scale=False, max_positions=8).eval()


def _averaging_decoder():
    """Queries and keys zero (uniform attention over the visible keys), values and output projection the
    identity, the FFN zero, no embeddings: output_i = x_i + mean_{j visible to i} LayerNorm(x_j)."""
    decoder = _decoder()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        layer = decoder.layers[0]
        for norm in (layer.norm1, layer.norm2):
            norm.weight.fill_(1.0)
        layer.attn.qkv.weight[2 * DIM:] = torch.eye(DIM)
        layer.attn.out_proj.weight.copy_(torch.eye(DIM))
        decoder.spe_token.copy_(2 * U)
    return decoder


def _image_segment(tokens, padding_mask=None):
    return Segment(tokens[None], MODALITY_IMAGE, SIDE_INPUT, False, padding_mask, None)


def test_causal_mask_output_known_answer():
    decoder = _averaging_decoder()
    a, b, c = U, -U, W  # sequence [<SPE> = 2U, a, b, c]
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    with torch.no_grad():
        out = decoder("classification", [_image_segment(torch.stack([a, b, c]))], attn_mask=causal)
    s = LN_SCALE
    expected = torch.stack([2 * U + s * U,                 # <SPE> sees itself
                            a + s * (U + U) / 2,           # a sees <SPE>, a
                            b + s * (U + U - U) / 3,       # b sees <SPE>, a, b
                            c + s * (U + U - U + W) / 4])  # c sees everything
    torch.testing.assert_close(out.hidden[0], expected, rtol=0, atol=1e-5)
    assert out.padding_mask.tolist() == [[False, False, False, False]]
    assert out.aux_loss.item() == 0.0


def test_default_mask_hides_padding_keys_known_answer():
    decoder = _averaging_decoder()
    a, b, c = U, -U, W
    padding = torch.tensor([[False, True, False]])  # b is padding
    with torch.no_grad():
        out = decoder("classification", [_image_segment(torch.stack([a, b, c]), padding)])
    s = LN_SCALE
    visible = s * (U + U + W)  # <SPE>, a, c
    expected = torch.stack([2 * U + visible / 3, a + visible / 3,
                            b + (visible - s * U) / 4,  # a padding query also sees itself
                            c + visible / 3])
    torch.testing.assert_close(out.hidden[0], expected, rtol=0, atol=1e-5)
    assert out.padding_mask.tolist() == [[False, False, True, False]]


def _reference_decoder(decoder, tokens, mask):
    """Pre-norm Transformer written from the definition: x + Attn(LN(x)), then x + FFN(LN(x)).

    tokens (B, L, d) already embedded; mask (B, L, L) bool, True = may attend."""
    x = tokens
    for layer in decoder.layers:
        heads = layer.attn.num_heads
        batch, length, dim = x.shape
        q, k, v = F.linear(F.layer_norm(x, (dim,), layer.norm1.weight, layer.norm1.bias), layer.attn.qkv.weight,
                           layer.attn.qkv.bias).split(dim, dim=-1)
        split = lambda t: t.reshape(batch, length, heads, dim // heads).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads)
        probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        attended = (probs @ split(v)).transpose(1, 2).reshape(batch, length, dim)
        x = x + F.linear(attended, layer.attn.out_proj.weight, layer.attn.out_proj.bias)
        normed = F.layer_norm(x, (dim,), layer.norm2.weight, layer.norm2.bias)
        x = x + layer.ffn.fc2(F.gelu(layer.ffn.fc1(normed)))
    return x


def test_random_weights_match_a_reference_transformer():
    decoder = _decoder(num_heads=2, num_layers=2, seed=0)
    image = torch.randn(1, 3, DIM)
    words = torch.randn(1, 2, DIM)
    positions = torch.tensor([0, 1])
    segments = [Segment(image, MODALITY_IMAGE, SIDE_INPUT),
                Segment(words, MODALITY_TEXT, SIDE_INPUT, True, None, positions)]
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[:4, 4:] = False  # <SPE> and the image do not see the words
    mask[4, 5] = False  # causal words
    with torch.no_grad():
        out = decoder("captioning", segments, attn_mask=mask).hidden
        types = decoder.type_embedding.weight
        # <SPE> is prepended as it is: no modality or position embedding
        embedded = torch.cat([decoder.spe_token, image + types[MODALITY_IMAGE],
                              words + types[MODALITY_TEXT] + decoder.position_embedding.weight[positions]], dim=1)
        expected = _reference_decoder(decoder, embedded, mask[None])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the image side does not depend on the words it may not see
    with torch.no_grad():
        changed = decoder("captioning", [segments[0], segments[1]._replace(tokens=words + 5)], attn_mask=mask).hidden
    torch.testing.assert_close(changed[:, :4], out[:, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, 4:], out[:, 4:])


def test_embeddings_add_modality_and_only_the_given_positions():
    decoder = _decoder(seed=1)
    tokens = torch.randn(1, 3, DIM)
    segment = Segment(tokens, MODALITY_TEXT, SIDE_INPUT, False, None, torch.tensor([0, -1, 2]))
    with torch.no_grad():
        embedded = decoder.embed_segment(segment)
        type_text, positions = decoder.type_embedding.weight[MODALITY_TEXT], decoder.position_embedding.weight
        expected = tokens + type_text + torch.stack([positions[0], torch.zeros(DIM), positions[2]])[None]
    torch.testing.assert_close(embedded, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="MAX_POSITIONS"):
        decoder.embed_segment(segment._replace(position_ids=torch.tensor([0, 1, 8])))
