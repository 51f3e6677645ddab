import numpy as np
import pytest
import torch

from irnet_ray.affinity import boundary_to_affinity, pair_index, pair_labels, pair_valid_mask
from irnet_ray.losses import irnet_losses


def test_pair_counts_match_the_disc():
    # |forward pairs| = (lattice points with 0 < |d| < r) / 2
    for radius in (2, 5, 10):
        disc = sum(1 for y in range(-radius, radius + 1) for x in range(-radius, radius + 1)
                   if 0 < y * y + x * x < radius * radius)
        assert pair_index(radius).num_pairs * 2 == disc
    assert pair_index(5).num_pairs == 34  # 68 neighbours + self = 69 entries per row of A


def test_paths_run_from_i_to_j_and_are_symmetric():
    index = pair_index(10)
    for (dy, dx), path in zip(index.offsets, index.paths):
        assert (0, 0) in path and (dy, dx) in path
        assert {(dy - y, dx - x) for y, x in path} == set(path)


def test_affinity_is_one_minus_the_strongest_boundary_on_the_line():
    boundary = torch.zeros(9, 9)
    boundary[4, 6] = 0.8
    index = pair_index(5)
    affinity = boundary_to_affinity(boundary, index)
    k = index.offsets.index((0, 4))
    assert affinity[k, 4, 3] == pytest.approx(0.2)  # (4,3) -> (4,7) crosses (4,6)
    assert affinity[k, 4, 0] == pytest.approx(1.0)  # (4,0) -> (4,4) does not
    k = index.offsets.index((2, 0))
    assert affinity[k, 2, 6] == pytest.approx(0.2)  # (2,6) -> (4,6) ends on it


def test_pair_labels_follow_eq_3_and_4():
    labels = torch.tensor([[[0, 0, 1, 1, 255, 2]]], dtype=torch.uint8)
    sets = pair_labels(labels, pair_index(2))  # radius 2: offsets (0,1), (1,-1), (1,0), (1,1)
    k = pair_index(2).offsets.index((0, 1))
    assert sets.bg_positive[0, k, 0].tolist() == [True, False, False, False, False, False]
    assert sets.fg_positive[0, k, 0].tolist() == [False, False, True, False, False, False]
    assert sets.negative[0, k, 0].tolist() == [False, True, False, False, False, False]  # 255 and edge excluded
    assert not (sets.fg_positive & sets.negative).any()


def ideal_field(labels: np.ndarray) -> np.ndarray:
    h, w = labels.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((2, h, w), np.float32)
    for k in np.unique(labels[(labels > 0) & (labels < 255)]):
        m = labels == k
        field[0][m] = ys[m].mean() - ys[m]
        field[1][m] = xs[m].mean() - xs[m]
    return field


def test_losses_vanish_for_ideal_outputs_and_not_otherwise():
    labels = np.zeros((20, 24), np.uint8)
    labels[3:12, 2:10] = 1
    labels[5:15, 13:22] = 2
    labels[16:18, :] = 255
    index = pair_index(5)
    sets = pair_labels(torch.from_numpy(labels)[None], index)
    obj = labels > 0
    ring = obj ^ (obj & np.roll(obj, 1, 0) & np.roll(obj, -1, 0) & np.roll(obj, 1, 1) & np.roll(obj, -1, 1))
    # every pixel pair of different labels crosses a full boundary pixel
    boundary = torch.from_numpy(np.where(ring & (labels < 255), 1.0, 0.0).astype(np.float32))
    field = torch.from_numpy(ideal_field(labels))
    good = irnet_losses(boundary[None], field[None], sets, index)
    assert good.displacement_fg.item() < 1e-4 and good.displacement_bg.item() == 0
    assert good.boundary_neg.item() < 1e-3
    # the ring sits inside the objects, so fg pairs touching it see a boundary: positive loss
    bad = irnet_losses(torch.full_like(boundary, 0.5)[None], torch.zeros_like(field)[None], sets, index)
    assert bad.displacement_fg.item() > 1.0
    assert bad.boundary.item() == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2) + np.log(2), rel=1e-3)


def test_losses_give_gradients_to_both_branches():
    labels = torch.randint(0, 3, (2, 16, 16), dtype=torch.uint8)
    index = pair_index(4)
    boundary = torch.rand(2, 16, 16, requires_grad=True)
    field = torch.randn(2, 2, 16, 16, requires_grad=True)
    irnet_losses(boundary, field, pair_labels(labels, index), index).total.backward()
    assert boundary.grad.abs().sum() > 0 and field.grad.abs().sum() > 0


def test_valid_mask_excludes_pairs_leaving_the_map():
    valid = pair_valid_mask(pair_index(3), 4, 5)
    k = pair_index(3).offsets.index((0, 2))
    assert valid[k, :, 3:].sum() == 0 and valid[k, :, :3].all()
