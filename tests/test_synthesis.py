import numpy as np
import pytest
import torch

from irnet_ray.affinity import pair_index
from irnet_ray.config import SynthesisConfig
from irnet_ray.synthesis import (
    instance_map,
    random_walk,
    random_walk_batch,
    refine_displacement,
    synthesize_labels,
    transition_matrix,
)


def dense_random_walk(scores: np.ndarray, boundary: np.ndarray, radius: int, beta: float, steps: int):
    """Eq. 12-13 written out with dense matrices, independently of the sparse implementation."""
    h, w = boundary.shape
    n = h * w
    ys, xs = np.divmod(np.arange(n), w)
    affinity = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dy, dx = ys[j] - ys[i], xs[j] - xs[i]
            if dy * dy + dx * dx >= radius * radius:
                continue
            if i == j:
                affinity[i, j] = 1.0
                continue
            # pixels k in the bounding box of the segment whose distance to the line is < 1
            strongest = 0.0
            for ky in range(min(ys[i], ys[j]), max(ys[i], ys[j]) + 1):
                for kx in range(min(xs[i], xs[j]), max(xs[i], xs[j]) + 1):
                    cross = dy * (kx - xs[i]) - dx * (ky - ys[i])
                    if cross * cross < dy * dy + dx * dx:
                        strongest = max(strongest, boundary[ky, kx])
            affinity[i, j] = 1.0 - strongest
    powered = affinity**beta
    transition = powered / powered.sum(axis=1, keepdims=True)  # T = S^-1 A^beta
    vec = (scores * (1.0 - boundary)).reshape(scores.shape[0], n).T
    result = np.linalg.matrix_power(transition, steps) @ vec
    return result.T.reshape(scores.shape), affinity


@pytest.mark.parametrize("shape,radius,steps", [((9, 11), 5, 256), ((12, 7), 3, 40), ((6, 6), 5, 1)])
def test_random_walk_matches_dense_equations(shape, radius, steps):
    rng = np.random.default_rng(0)
    boundary = rng.uniform(0, 1, shape) ** 3
    boundary[:, shape[1] // 2] = np.maximum(boundary[:, shape[1] // 2], 0.7)
    scores = rng.uniform(0, 1, (4, *shape))
    expected, affinity = dense_random_walk(scores, boundary, radius, 10.0, steps)
    got = random_walk(scores.astype(np.float32), boundary.astype(np.float32), radius=radius, steps=steps)
    assert isinstance(got, np.ndarray) and got.shape == scores.shape
    assert np.abs(affinity - affinity.T).max() == 0
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert relative < 1e-3
    same = (got.argmax(0) == expected.argmax(0)).mean()
    assert same >= 0.999


def test_transition_matrix_rows_sum_to_one_and_stay_sparse():
    boundary = torch.rand(20, 30)
    matrix = transition_matrix(boundary, radius=5, beta=10.0)
    dense_rows = torch.sparse.sum(matrix.to_sparse_coo(), dim=1).to_dense()
    assert torch.allclose(dense_rows, torch.ones(600), atol=1e-5)
    nnz_per_row = matrix.crow_indices().diff()
    assert int(nnz_per_row.max()) == 2 * pair_index(5).num_pairs + 1 == 69


def test_wall_of_boundary_stops_propagation():
    boundary = np.zeros((16, 24), np.float32)
    boundary[:, 12] = 1.0
    scores = np.zeros((1, 16, 24), np.float32)
    scores[0, 8, 3] = 1.0
    out = random_walk(scores, boundary, steps=256)
    assert out[0, :, 13:].max() == 0.0
    assert out[0, :, :12].min() > 0.0  # the left side filled up
    # T is row-stochastic: every step averages, so nothing exceeds the seed's value
    assert out[0].max() <= 1.0 + 1e-6


def test_random_walk_batch_equals_one_by_one_and_torch_in_torch_out():
    rng = np.random.default_rng(1)
    items = [(rng.random((k, h, w), dtype=np.float32), rng.random((h, w), dtype=np.float32) * 0.5)
             for k, h, w in [(2, 10, 13), (5, 7, 9), (1, 15, 6)]]
    batch = random_walk_batch([torch.from_numpy(s) for s, _ in items], [torch.from_numpy(b) for _, b in items], steps=30)
    for (s, b), got in zip(items, batch):
        assert isinstance(got, torch.Tensor)
        np.testing.assert_allclose(got.numpy(), random_walk(s, b, steps=30), rtol=1e-5, atol=1e-7)


def test_random_walk_handles_large_maps():
    # 1024 x 1024 image -> 256 x 256 at stride 4; the dense matrix would hold 2^32 entries.
    out = random_walk(torch.rand(3, 256, 256), torch.rand(256, 256) * 0.2, steps=4)
    assert out.shape == (3, 256, 256)


@pytest.mark.parametrize(
    "scores,boundary,message",
    [
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), "3 dimensions"),
        (np.zeros((1, 4, 4), np.float32), np.zeros((4, 5), np.float32), "share h, w"),
        (np.zeros((1, 4, 4), np.int64), np.zeros((4, 4), np.float32), "floating-point"),
        (np.zeros((1, 4, 4), np.float32), np.full((4, 4), 1.5, np.float32), r"\[0, 1\]"),
        ([[0.0]], np.zeros((4, 4), np.float32), "torch.Tensor or numpy"),
    ],
)
def test_random_walk_rejects_bad_input(scores, boundary, message):
    with pytest.raises(ValueError, match=message):
        random_walk(scores, boundary)


def ideal_field(centres, labels):
    """Displacement (dy, dx) from each pixel to the centre of its instance (0 on background)."""
    h, w = labels.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((2, h, w), np.float32)
    for k, (cy, cx) in enumerate(centres, start=1):
        field[0][labels == k] = (cy - ys)[labels == k]
        field[1][labels == k] = (cx - xs)[labels == k]
    return field


def test_instance_map_separates_touching_discs():
    h, w = 40, 60
    ys, xs = np.mgrid[0:h, 0:w]
    centres = [(20, 20), (20, 37)]  # radius 9 discs, touching at x ~ 28..29
    labels = np.zeros((h, w), np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        labels[((ys - cy) ** 2 + (xs - cx) ** 2 <= 81) & (labels == 0)] = k
    assert ((labels[:, :-1] == 1) & (labels[:, 1:] == 2)).any()  # they touch
    result = instance_map(ideal_field(centres, labels), iterations=100, threshold=2.5)
    ids = [np.unique(result[labels == k]) for k in (1, 2)]
    assert all(len(i) == 1 and i[0] > 0 for i in ids)  # each disc in exactly one instance
    assert ids[0][0] != ids[1][0]


def _shrunk_noisy_field(centres, labels, cap: float, seed: int = 0) -> np.ndarray:
    """Vectors towards each pixel's centre, at most ``cap`` long (a real IRNet field falls short
    far from the centre), with 10% noise on their length and direction."""
    h, w = labels.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((2, h, w), np.float32)
    for k, (cy, cx) in enumerate(centres, start=1):
        dy, dx = cy - ys, cx - xs
        scale = np.minimum(np.hypot(dy, dx), cap) / np.maximum(np.hypot(dy, dx), 1e-6)
        field[0][labels == k], field[1][labels == k] = (dy * scale)[labels == k], (dx * scale)[labels == k]
    rng = np.random.default_rng(seed)
    return (field * rng.uniform(0.9, 1.1, field.shape) + rng.normal(0, 0.1, field.shape) * (labels > 0)).astype(
        np.float32)  # fmt: skip


def test_instance_map_refines_a_shrunk_noisy_field():
    """Eq. 10 at work: from the rim of a disc one step of the field lands between the rim and the
    centroid (on no candidate); the refinement carries every pixel to its own disc's centroid."""
    h, w = 40, 60
    ys, xs = np.mgrid[0:h, 0:w]
    centres = [(20, 20), (20, 37)]
    labels = np.zeros((h, w), np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        labels[((ys - cy) ** 2 + (xs - cx) ** 2 <= 81) & (labels == 0)] = k
    field = _shrunk_noisy_field(centres, labels, cap=3.0)
    one_step = np.rint(np.stack([ys, xs]) + field).astype(int)
    rim = labels > 0
    assert (np.hypot(*field[:, one_step[0][rim], one_step[1][rim]]) >= 2.5).any()  # a step is not enough
    result = instance_map(field, iterations=100, threshold=2.5)
    ids = [np.unique(result[labels == k]) for k in (1, 2)]
    assert all(len(i) == 1 and i[0] > 0 for i in ids), ids  # each disc whole, in one instance
    assert ids[0][0] != ids[1][0]


def test_refinement_converges_on_radial_field():
    # A noisy, shrunk radial field: one step of it does not reach the centre, refinement does.
    h, w = 33, 33
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = (16.0, 16.0)
    field = np.stack([(centre[0] - ys) * 0.3, (centre[1] - xs) * 0.3]).astype(np.float32)
    field += np.random.default_rng(0).normal(0, 0.05, field.shape).astype(np.float32)
    before = np.hypot(ys + field[0] - centre[0], xs + field[1] - centre[1])
    refined = refine_displacement(field, iterations=100)
    after = np.hypot(ys + refined[0] - centre[0], xs + refined[1] - centre[1])
    assert before.max() > 10
    assert after.max() < 0.5


def test_instance_map_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(2, h, w\)"):
        instance_map(np.zeros((3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        instance_map(np.zeros((2, 5, 5), np.int32))


def test_synthesize_labels_on_two_touching_same_class_objects():
    # Stride-4 maps of a 64 x 96 image: two touching squares of class 3 (no class boundary between
    # them, only around them), CAM only on a small part of each square.
    H, W = 64, 96
    h, w = 16, 24
    labels = np.zeros((h, w), np.int32)
    labels[4:12, 3:11] = 1
    labels[4:12, 11:19] = 2
    boundary = np.zeros((h, w), np.float32)
    objects = labels > 0
    ring = ~objects & (np.roll(objects, 1, 0) | np.roll(objects, -1, 0) | np.roll(objects, 1, 1) | np.roll(objects, -1, 1))
    boundary[ring] = 1.0
    cam = np.zeros((1, h, w), np.float32)
    cam[0, 6:9, 5:8] = 1.0
    cam[0, 6:9, 14:17] = 1.0  # mirror image of the first seed: each instance wins its own half
    field = ideal_field([(7.5, 6.5), (7.5, 14.5)], labels)
    out = synthesize_labels(cam, [3], boundary, field, (H, W), SynthesisConfig(steps=64))
    assert out.semantic.shape == (H, W) and set(np.unique(out.semantic)) <= {0, 3}
    up = np.kron(labels, np.ones((4, 4), np.int32))
    # the walk fills both squares (much more than the seeds) without leaking far outside
    assert (out.semantic[up > 0] == 3).mean() > 0.8
    assert (out.semantic[up == 0] == 3).mean() < 0.1
    scored = out.instances.scores > 0
    assert scored.sum() == 2
    masks = out.instances.masks[scored]
    for k in (1, 2):
        overlap = [(m & (up == k)).sum() / (up == k).sum() for m in masks]
        assert max(overlap) > 0.7
    assert (out.instances.classes == 3).all()
