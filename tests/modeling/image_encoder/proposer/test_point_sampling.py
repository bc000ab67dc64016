"""Point sampling at normalised coordinates and Mask2Former importance sampling."""
import math

import pytest
import torch

from up2.modeling.image_encoder.proposer.point_sampling import importance_split, point_sample, sample_uncertain_points


def bilinear_by_hand(image, x, y):
    """Bilinear value of a (H, W) image at normalised (x, y), align_corners=False, border extended."""
    height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    value = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            value += wy * wx * float(image[min(max(yy, 0), height - 1), min(max(xx, 0), width - 1)])
    return value


def test_point_sample_pixel_centres_and_bilinear():
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 5, 7)
    # pixel centres give the pixel values exactly
    rows, cols = torch.tensor([0, 4, 2]), torch.tensor([0, 6, 3])
    coords = torch.stack([(cols + 0.5) / 7, (rows + 0.5) / 5], dim=-1).expand(2, 3, 2)
    out = point_sample(maps, coords)
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out, maps[:, :, rows, cols])
    # arbitrary points match the hand-written bilinear formula
    coords = torch.cat([torch.rand(2, 11, 2), torch.tensor([[0.0, 0.0], [1.0, 0.03]]).expand(2, 2, 2)], 1)
    out = point_sample(maps, coords)
    for n in range(2):
        for c in range(3):
            for p in range(13):
                expected = bilinear_by_hand(maps[n, c], float(coords[n, p, 0]), float(coords[n, p, 1]))
                assert abs(float(out[n, c, p]) - expected) < 1e-5


def test_point_sample_constant_map_is_constant_up_to_the_border():
    ones = torch.ones(1, 1, 4, 6)
    corners = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.999, 0.001]]])
    torch.testing.assert_close(point_sample(ones, corners), torch.ones(1, 1, 4))


def test_point_sample_bad_shapes():
    with pytest.raises(ValueError, match="point_coords"):
        point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4))


@pytest.mark.parametrize("num_points,ratio,beta", [(20, 3.0, 0.75), (7, 2.0, 0.5), (10, 1.0, 0.0), (9, 3.0, 1.0)])
def test_importance_split_counts(num_points, ratio, beta):
    oversampled, uncertain, rand = importance_split(num_points, ratio, beta)
    assert oversampled == math.ceil(num_points * ratio)
    assert uncertain == math.ceil(beta * num_points)
    assert uncertain + rand == num_points


def test_sample_uncertain_points_picks_most_uncertain_of_candidates():
    torch.manual_seed(1)
    logits = torch.randn(3, 1, 16, 16) * 4
    num_points, ratio, beta = 20, 3.0, 0.75
    points = sample_uncertain_points(logits, num_points, ratio, beta, generator=torch.Generator().manual_seed(5))
    assert points.shape == (3, 20, 2) and points.dtype == torch.float32
    assert points.min() >= 0 and points.max() <= 1
    num_candidates, num_uncertain, num_random = importance_split(num_points, ratio, beta)
    assert (num_uncertain, num_random) == (15, 5)
    # Replay the generator: the candidates are its first draw.
    candidates = torch.rand((3, num_candidates, 2), generator=torch.Generator().manual_seed(5))
    for n in range(3):
        cand_unc = torch.tensor([-abs(bilinear_by_hand(logits[n, 0], float(x), float(y))) for x, y in candidates[n]])
        chosen = points[n, :num_uncertain]
        # every chosen point is a candidate, and the chosen set is the num_uncertain most uncertain
        match = (chosen[:, None, :] == candidates[n][None]).all(-1)
        assert match.any(1).all()
        chosen_idx = match.float().argmax(1)
        threshold = cand_unc.sort(descending=True).values[num_uncertain - 1]
        assert (cand_unc[chosen_idx] >= threshold - 1e-6).all()
        assert len(set(chosen_idx.tolist())) == num_uncertain
        # the remaining points are fresh uniform points, not candidates
        rest = points[n, num_uncertain:]
        assert not (rest[:, None, :] == candidates[n][None]).all(-1).any()


def test_sample_uncertain_points_accepts_3d_and_is_deterministic():
    logits = torch.randn(2, 8, 8)
    a = sample_uncertain_points(logits, 12, 3, 0.75, generator=torch.Generator().manual_seed(0))
    b = sample_uncertain_points(logits, 12, 3, 0.75, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 12, 2)
    torch.testing.assert_close(a, b)
