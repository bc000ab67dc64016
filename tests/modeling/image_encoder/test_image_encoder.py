"""Image encoder: global + regional tokens, the IMAGE_TOKENS switch (paper Table 2), gradients."""
import pytest
import torch

from up2.modeling.image_encoder import ImageEncoder


def inputs():
    images = torch.randn(2, 3, 64, 96)
    padding = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding[1, :, 64:] = True  # second image is 64 x 64, padded to 96 wide
    masks = torch.zeros(1, 64, 96)
    masks[0, 10:30, 20:50] = 1
    targets = [{"boxes": torch.tensor([[35 / 96, 20 / 64, 30 / 96, 20 / 64]]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 64, 96)}]
    return images, padding, targets


@pytest.mark.parametrize("mode", ["both", "global", "regional"])
def test_tokens_per_mode_and_every_parameter_gets_a_gradient(mode, image_encoder_cfg_factory):
    torch.manual_seed(0)
    encoder = ImageEncoder(image_encoder_cfg_factory(mode)).train()
    images, padding, targets = inputs()
    out = encoder(images, padding, targets)
    num_global = 3 + 2 * 3  # M' pooled + flattened stride-32 level (64/32 x 96/32)
    assert out["regional_tokens"].shape == (2, 6, 32) and out["boxes"].shape == (2, 6, 4)
    expected = {"both": num_global + 6, "global": num_global, "regional": 6}[mode]
    assert out["image_tokens"].shape == (2, expected, 32)
    assert out["image_padding_mask"].shape == (2, expected)
    if mode != "regional":
        assert out["global_tokens"].shape == (2, num_global, 32)
        # the padded last column of image 1 is masked in the flattened part, nothing else
        flat = out["global_padding_mask"][1, 3:].view(2, 3)
        assert flat[:, 2].all() and not flat[:, :2].any() and not out["global_padding_mask"][0].any()
    else:
        assert encoder.global_pool is None and "global_tokens" not in out
    loss = sum(out["losses"].values()) + out["image_tokens"].sum()
    loss.backward()
    missing = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_unknown_mode_lists_choices(image_encoder_cfg_factory):
    with pytest.raises(ValueError, match="'global', 'regional'"):
        ImageEncoder(image_encoder_cfg_factory("tokens"))
