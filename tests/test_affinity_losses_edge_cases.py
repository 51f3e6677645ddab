"""Edge cases of irnet_ray.affinity and irnet_ray.losses that the main tests leave open (found by
mutation testing, docs/testing.md). Expected values are worked out by hand in comments."""

from __future__ import annotations

import math

import pytest
import torch

from irnet_ray.affinity import _line_pixels, pair_index, pair_labels, pair_values
from irnet_ray.losses import _masked_mean, boundary_losses, irnet_losses


def test_line_pixels_by_hand():
    """Pi_ij of Eq. 7: pixels of the pair's bounding box closer than one pixel to the line,
    i.e. (dy * x - dx * y)^2 < dy^2 + dx^2, in raster order. Called directly: pair_index is
    cached, so a test through it may see paths computed before."""
    assert _line_pixels(0, 3) == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert _line_pixels(2, 0) == ((0, 0), (1, 0), (2, 0))
    # (2, 2): 4 (x - y)^2 < 8, i.e. |x - y| <= 1
    assert _line_pixels(2, 2) == ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2))
    # (3, -3): 9 (x + y)^2 < 18, i.e. |x + y| <= 1, with x in [-3, 0]
    assert _line_pixels(3, -3) == (
        (0, -1), (0, 0), (1, -2), (1, -1), (1, 0), (2, -3), (2, -2), (2, -1), (3, -3), (3, -2),
    )  # fmt: skip
    # (4, 3): pixel (1, 2) lies at distance exactly 1 (4 * 2 - 3 * 1 = 5 = |(4, 3)|): not on the path
    assert (1, 2) not in _line_pixels(4, 3) and (1, 1) in _line_pixels(4, 3)


def test_offsets_tensor_is_float32():
    """The displacement targets x_j - x_i are float32 (they are compared with float fields)."""
    offsets = pair_index(2).offsets_tensor()
    assert offsets.dtype == torch.float32
    assert offsets.tolist() == [[0.0, 1.0], [1.0, -1.0], [1.0, 0.0], [1.0, 1.0]]


def test_pair_values_outside_the_map_are_zero_by_default():
    """Far ends outside the map read 0 unless a fill is given."""
    maps = torch.ones(1, 1, 2)
    k = pair_index(2).offsets.index((0, 1))
    assert pair_values(maps, pair_index(2))[0, k, 0].tolist() == [1.0, 0.0]
    assert pair_values(maps, pair_index(2), fill=7.0)[0, k, 0].tolist() == [1.0, 7.0]


def test_pair_labels_needs_a_batch_dimension():
    """A label map without its batch dimension is refused, naming the shape it got."""
    with pytest.raises(ValueError, match=r"label_map must be \(N, h, w\), got \(3, 4\)"):
        pair_labels(torch.zeros(3, 4, dtype=torch.long), pair_index(2))


def test_masked_mean_of_a_single_element():
    """A set of one pair is averaged over one pair; an empty set gives 0."""
    values = torch.tensor([2.0, 4.0, 8.0])
    assert _masked_mean(values, torch.tensor([False, True, False])).item() == 4.0
    assert _masked_mean(values, torch.tensor([True, True, False])).item() == 3.0
    assert _masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_saturated_affinities_give_finite_losses():
    """Boundary 1 everywhere: every affinity is 0, so a positive pair costs -log(0 + eps) / 2
    (finite) and a negative pair -log(1 + eps - 0) ~ 0."""
    index = pair_index(2)
    labels = pair_labels(torch.tensor([[[1, 1, 0, 0]]]), index)  # pairs (0,1): fg, neg, bg
    fg, bg, neg = boundary_losses(torch.ones(1, 1, 4), labels, index)
    assert fg.item() == pytest.approx(-math.log(1e-5) / 2, rel=1e-4)
    assert bg.item() == pytest.approx(-math.log(1e-5) / 2, rel=1e-4)
    assert neg.item() == pytest.approx(0.0, abs=1e-4)


def test_total_loss_is_half_the_sum_of_its_parts():
    """Eq. 9 halved as the reference trains it: total = (L_fg^D + L_bg^D) / 2 + L^B / 2 with
    L^B = fg + bg + neg, every part non-zero here; the logged parts are those of
    boundary_losses."""
    index = pair_index(2)
    labels = pair_labels(torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0]]]), index)
    boundary = torch.full((1, 2, 4), 0.3)
    displacement = torch.rand(1, 2, 2, 4, generator=torch.Generator().manual_seed(0))
    parts = irnet_losses(boundary, displacement, labels, index).as_floats()
    assert min(abs(v) for v in parts.values()) > 1e-3
    fg, bg, neg = (t.item() for t in boundary_losses(boundary, labels, index))
    assert (parts["boundary_fg"], parts["boundary_bg"], parts["boundary_neg"]) == pytest.approx((fg, bg, neg))
    assert parts["boundary"] == pytest.approx(fg + bg + neg)
    displacement_sum = parts["displacement_fg"] + parts["displacement_bg"]
    assert parts["total"] == pytest.approx(displacement_sum / 2 + (fg + bg + neg) / 2)
