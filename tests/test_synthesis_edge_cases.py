"""Edge cases of irnet_ray.synthesis that the main tests leave open (found by mutation testing,
docs/testing.md): argument checks at their bounds, the config reaching every helper, and small
hand-worked examples of the helpers. Expected values are worked out by hand in comments."""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import irnet_ray.synthesis as synthesis
from irnet_ray.config import SynthesisConfig
from irnet_ray.synthesis import (
    _instances_from_components,
    cam_connected_components,
    connected_components,
    instance_map,
    instances_from_segments,
    keep_largest,
    keep_top_scores,
    labels_from_scores,
    random_walk,
    random_walk_batch,
    refine_displacement,
    synthesize_labels,
    synthesize_labels_batch,
    transition_matrix,
    upsample_to_image,
    walk_inputs,
)

DEFAULTS = SynthesisConfig()


def test_function_defaults_equal_the_config_by_signature_and_by_behaviour():
    """The keyword defaults of the helpers are the paper's values, as in SynthesisConfig: by
    signature, and by behaviour (a call without them equals one with the config's values)."""
    expected = {
        transition_matrix: {"radius": DEFAULTS.radius, "beta": DEFAULTS.beta},
        random_walk: {"radius": DEFAULTS.radius, "beta": DEFAULTS.beta, "steps": DEFAULTS.steps},
        random_walk_batch: {"radius": DEFAULTS.radius, "beta": DEFAULTS.beta, "steps": DEFAULTS.steps},
        refine_displacement: {"iterations": DEFAULTS.displacement_iterations},
        instance_map: {"iterations": DEFAULTS.displacement_iterations, "threshold": DEFAULTS.centroid_threshold},
    }
    for function, defaults in expected.items():
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in defaults} == defaults, function.__name__
    boundary = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    explicit = transition_matrix(boundary, radius=DEFAULTS.radius, beta=DEFAULTS.beta).to_dense()
    assert torch.equal(transition_matrix(boundary).to_dense(), explicit)
    scores = torch.zeros(1, 2, 8)
    scores[0, 0, 0] = 1.0
    walked = random_walk(scores, boundary, radius=DEFAULTS.radius, beta=DEFAULTS.beta, steps=DEFAULTS.steps)
    assert torch.equal(random_walk(scores, boundary), walked)
    assert torch.equal(random_walk_batch([scores], [boundary])[0], walked)
    # a field that turns around the centre never settles: every iteration counts
    ys, xs = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    field = torch.stack([(xs - 4) * 0.3, -(ys - 4) * 0.3])
    explicit = refine_displacement(field, DEFAULTS.displacement_iterations)
    assert torch.equal(refine_displacement(field), explicit)


# ----------------------------------------------------------------------------- random walk


def test_one_step_walk_on_two_pixels():
    """Eq. 12-13 by hand on a 1 x 2 map (radius 2: one pair). B = [0.5, 0]: a = 1 - 0.5 = 0.5,
    a^beta = 0.5 with beta 1; T = [[1, .5], [.5, 1]] / 1.5; seeds s * (1 - B) = [0.5, 0];
    one step: [0.5 / 1.5, 0.25 / 1.5] = [1/3, 1/6]. Float64 in, float64 out (NumPy)."""
    scores = np.array([[[1.0, 0.0]]])
    out = random_walk(scores, np.array([[0.5, 0.0]]), radius=2, beta=1.0, steps=1)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, [[[1 / 3, 1 / 6]]], rtol=1e-6)
    # zero steps: the seeds themselves
    np.testing.assert_allclose(random_walk(scores, np.array([[0.5, 0.0]]), radius=2, steps=0), [[[0.5, 0.0]]])
    # a 1 x 1 map is not empty
    assert random_walk(np.ones((1, 1, 1)), np.zeros((1, 1)), steps=3).shape == (1, 1, 1)


@pytest.mark.parametrize(
    ("scores", "boundary", "kwargs", "message"),
    [
        ([[[1.0]]], np.zeros((1, 1)), {}, "scores must be a torch.Tensor or numpy.ndarray, got list"),
        (np.ones((1, 2)), np.zeros((1, 2)), {}, "scores must have 3 dimensions"),
        (np.ones((1, 1, 2)), np.zeros(2), {}, "boundary must have 2 dimensions"),
        (np.ones((1, 0, 2)), np.zeros((0, 2)), {}, "boundary must not be empty"),
        (np.ones((1, 1, 2)), np.array([[0.5, 1.5]]), {}, r"boundary values must lie in \[0, 1\]"),
        (np.ones((1, 1, 2)), np.array([[-0.5, 0.5]]), {}, r"boundary values must lie in \[0, 1\]"),
        (np.ones((1, 1, 2)), np.array([[np.nan, 0.5]]), {}, r"boundary values must lie in \[0, 1\]"),
        (np.array([[[np.inf, 0.0]]]), np.zeros((1, 2)), {}, "scores must be finite"),
        (np.ones((1, 1, 2)), np.zeros((1, 2)), {"radius": 1}, "radius must be an integer >= 2, got 1"),
        (np.ones((1, 1, 2)), np.zeros((1, 2)), {"radius": 2.5}, "radius must be an integer >= 2"),
        (np.ones((1, 1, 2)), np.zeros((1, 2)), {"beta": 0.0}, "beta must be > 0, got 0.0"),
        (np.ones((1, 1, 2)), np.zeros((1, 2)), {"steps": -1}, "steps must be a non-negative integer, got -1"),
        (np.ones((1, 1, 2)), np.zeros((1, 2)), {"steps": 1.0}, "steps must be a non-negative integer"),
    ],
)
def test_walk_inputs_are_checked_by_name(scores, boundary, kwargs, message):
    """Every walk argument is checked with a message naming it and the allowed values."""
    with pytest.raises(ValueError, match=message):
        random_walk(scores, boundary, **kwargs)


def test_walk_arguments_at_their_lower_bounds_are_accepted():
    """radius 2, a small beta and zero steps are valid walks."""
    out = random_walk(np.ones((1, 1, 2)), np.zeros((1, 2)), radius=2, beta=0.5, steps=0)
    np.testing.assert_array_equal(out, np.ones((1, 1, 2)))
    with pytest.raises(ValueError, match="got 1 score stacks but 2 boundary maps"):
        random_walk_batch([np.ones((1, 1, 2))], [np.zeros((1, 2))] * 2)


# ----------------------------------------------------------------------------- displacement


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (np.zeros((2, 2)), "displacement must have 3 dimensions"),
        (np.zeros((2, 0, 3), np.float32), r"displacement must not be empty, got \(2, 0, 3\)"),
        (np.zeros((2, 3, 0), np.float32), r"displacement must not be empty, got \(2, 3, 0\)"),
        (np.full((2, 1, 1), np.nan, np.float32), "displacement must be finite"),
    ],
)
def test_bad_displacement_fields_are_refused(field, message):
    """An empty, non-finite or wrongly shaped field is refused with its own message."""
    with pytest.raises(ValueError, match=message):
        refine_displacement(field)


@pytest.mark.parametrize("iterations", [-1, 1.5])
def test_iterations_must_be_a_non_negative_integer(iterations):
    """Negative or fractional iteration counts are refused; zero is allowed (below)."""
    with pytest.raises(ValueError, match="iterations must be a non-negative integer"):
        refine_displacement(np.zeros((2, 2, 2), np.float32), iterations)


def test_refinement_is_one_bilinear_step_per_iteration():
    """Eq. 10 for one iteration against torch's own bilinear sampler (grid_sample with
    align_corners=True samples in pixel units): c1 = clamp(x + D(x)), c2 = clamp(c1 + D(c1)),
    refined field c2 - x, positions clamped to the image."""
    generator = torch.Generator().manual_seed(0)
    field = (torch.rand(2, 5, 6, generator=generator) - 0.5) * 1.6  # |D| < 0.8
    ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), indexing="ij")
    cy, cx = (ys + field[0]).clamp(0, 4), (xs + field[1]).clamp(0, 5)
    grid = torch.stack([cx / 5 * 2 - 1, cy / 4 * 2 - 1], dim=-1)[None]  # (x, y) in [-1, 1]
    sampled = F.grid_sample(field[None], grid, mode="bilinear", align_corners=True)[0]
    expected = torch.stack([(cy + sampled[0]).clamp(0, 4) - ys, (cx + sampled[1]).clamp(0, 5) - xs])
    np.testing.assert_allclose(refine_displacement(field, iterations=1).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("iterations", [0, 2])
def test_centroids_are_kept_inside_the_image(iterations):
    """A field pointing far outside lands on the image's first / last row and column: the
    refined field is then exactly the offset to that border pixel."""
    ys, xs = np.mgrid[0:3, 0:4].astype(np.float32)
    out = refine_displacement(np.full((2, 3, 4), -9.0, np.float32), iterations)
    np.testing.assert_array_equal(out, np.stack([-ys, -xs]))
    out = refine_displacement(np.full((2, 3, 4), 9.0, np.float32), iterations)
    np.testing.assert_array_equal(out, np.stack([2 - ys, 3 - xs]))


def test_refinement_keeps_the_input_type():
    """Tensor in, tensor out; float64 in, float64 out."""
    out = refine_displacement(torch.zeros(2, 2, 2, dtype=torch.float64), 1)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64


def test_instance_map_by_hand():
    """A 1 x 7 field, no refinement. Candidates (|D| < 2.5): pixels 1 and 5; pixel 3 has
    |D| = |(1.5, 2)| = 2.5 exactly and is not one. Landings x + D (rows clamped to 0):
    0 -> 3, 1 -> 1, 2 -> 5, 3 -> 5, 4 -> 0, 5 -> 5, 6 -> 3. Groups: {1} (one pixel) is 1,
    {5} (three) is 2; pixels landing on no candidate are 0."""
    field = np.zeros((2, 1, 7), np.float32)
    field[1] = [3, 0, 3, 2, -4, 0, -3]
    field[0, 0, 3] = 1.5
    got = instance_map(field, iterations=0)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [[0, 1, 2, 2, 0, 2, 0]])
    # max_groups=1 keeps the larger group, renumbered 1
    np.testing.assert_array_equal(instance_map(field, iterations=0, max_groups=1), [[0, 0, 1, 1, 0, 1, 0]])


def test_instance_map_threshold_must_be_positive():
    """threshold 0 is refused with a message; a threshold below 1 is valid."""
    with pytest.raises(ValueError, match="threshold must be > 0, got 0"):
        instance_map(np.zeros((2, 2, 2), np.float32), threshold=0)
    assert instance_map(np.zeros((2, 2, 2), np.float32), iterations=0, threshold=0.5).max() == 1


def test_keep_largest_by_hand():
    """Counts [3, 5, 5, 0, 2], present but the last: limit 2 keeps index 1 and 2 (5, 5);
    the ties of 5 go to the lower index with limit 1; absent entries are never kept, even
    when a present entry has count 0."""
    counts = torch.tensor([3, 5, 5, 0, 2])
    present = torch.tensor([True, True, True, True, False])
    assert keep_largest(counts, present, 2).tolist() == [False, True, True, False, False]
    assert keep_largest(counts, present, 1).tolist() == [False, True, False, False, False]
    assert keep_largest(counts, present, 4).tolist() == [True, True, True, True, False]
    # many ties (beyond the sizes where an unstable sort keeps the order anyway)
    tied = torch.tensor([1, 2] * 20)
    assert keep_largest(tied, torch.ones(40, dtype=torch.bool), 3).nonzero().flatten().tolist() == [1, 3, 5]


def test_keep_top_scores_by_hand():
    """The limit highest scores, in index order; ties to the lower index; no cap at or above
    the number of scores."""
    np.testing.assert_array_equal(keep_top_scores(np.array([0.1, 0.7, 0.3, 0.9]), 2), [1, 3])
    np.testing.assert_array_equal(keep_top_scores(np.array([0.1, 0.7]), 2), [0, 1])
    np.testing.assert_array_equal(keep_top_scores(np.array([0.5, 0.9] * 10), 3), [1, 3, 5])


# ----------------------------------------------------------------------------- labels


def test_upsampling_is_bilinear_without_corner_alignment():
    """[0, 1] at stride 4 -> source x = (x' + 0.5) / 4 - 0.5, clamped to [0, 1]:
    0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1; cropped to the image size."""
    up = upsample_to_image(torch.tensor([[[0.0, 1.0]]]), (3, 7))
    assert up.shape == (1, 3, 7)
    np.testing.assert_allclose(up[0, 0].numpy(), [0, 0, 0.125, 0.375, 0.625, 0.875, 1.0], rtol=1e-6)


def test_labels_from_scores_uses_the_background_value():
    """Scores [0.2, 1.0] (already max 1) against background 0.3: background, class 1."""
    assert labels_from_scores(torch.tensor([[[0.2, 1.0]]]), 0.3).tolist() == [[0, 1]]


def test_walk_inputs_of_two_classes_and_three_groups():
    """M_ck = M_c * [I == k], class-major: K = 2 CAMs, G = 3 groups on a 1 x 3 map."""
    cams = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]])
    groups = torch.tensor([[0, 2, 2]])
    out = walk_inputs(cams, groups, 3)
    expected = [[1, 2, 3], [4, 5, 6], [1, 0, 0], [0, 0, 0], [0, 2, 3], [4, 0, 0], [0, 0, 0], [0, 5, 6]]
    assert out[:, 0].tolist() == expected


def test_instances_keep_types_shapes_and_the_small_component_rule():
    """Components of exactly min_size pixels keep their score, smaller ones get 0; the cap
    applies; outputs are bool / int64 / float32, also when there are no instances."""
    scores = np.array([[[0.9, 0.8, 0.0, 0.4]]], np.float32)
    segments = np.array([[1, 1, 0, 1]])  # two components: 2 pixels (max 0.9), 1 pixel (0.4)
    got = instances_from_segments(scores, segments, np.array([3]), min_size=2)
    np.testing.assert_allclose(got.scores, [0.9, 0.0])
    assert got.masks.dtype == bool and got.classes.dtype == np.int64 and got.scores.dtype == np.float32
    assert got.classes.tolist() == [3, 3]
    capped = instances_from_segments(scores, segments, np.array([3]), min_size=1, max_instances=1)
    np.testing.assert_allclose(capped.scores, [0.9])
    empty = instances_from_segments(scores, np.zeros((1, 4), np.int64), np.array([3]), min_size=1)
    assert empty.masks.shape == (0, 1, 4) and empty.masks.dtype == bool
    assert empty.classes.dtype == np.int64 and empty.scores.dtype == np.float32


def test_cam_components_below_the_size_fraction_score_zero():
    """min_fraction is a fraction of the image: 0.05 of 20 pixels = 1 pixel is kept, a
    fraction 0.1 (2 pixels) zeroes the one-pixel component."""
    labels = np.zeros((4, 5), np.int64)
    labels[0, 0] = 2
    cams = np.full((1, 4, 5), 0.6, np.float32)
    assert cam_connected_components(labels, cams, [2], min_fraction=0.05).scores.tolist() == [pytest.approx(0.6)]
    assert cam_connected_components(labels, cams, [2], min_fraction=0.1).scores.tolist() == [0.0]


# ----------------------------------------------------------------------------- synthesize_labels


def small_inputs():
    """One class on an image of 9 x 14 pixels (stride-4 grid 3 x 4: not square, and neither size
    a multiple of 4)."""
    cams = torch.zeros(1, 3, 4)
    cams[0, 1, 1] = 1.0
    return cams, torch.zeros(3, 4), torch.zeros(2, 3, 4), (9, 14)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cams": torch.zeros(3, 4)}, "cams must have 3 dimensions"),
        ({"classes": [1, 2]}, "got 1 CAMs but 2 class ids"),
        ({"classes": [0]}, r"class ids are 1-based, got \[0\]"),
        ({"boundary": torch.zeros(3)}, "boundary must have 2 dimensions"),
        ({"boundary": torch.zeros(3, 3)}, r"boundary \(3, 3\) and displacement \(2, 3, 4\) must be at stride 4"),
        ({"displacement": torch.zeros(2, 3, 3)}, r"boundary \(3, 4\) and displacement \(2, 3, 3\)"),
        ({"cams": torch.zeros(1, 3, 3)}, r"cams must be \(K, 3, 4\), got \(1, 3, 3\)"),
    ],
)
def test_synthesis_inputs_are_checked(change, message):
    """CAM / class counts, class ids and the stride-4 shapes (ceil(9 / 4) = 3, also for a size
    that is not a multiple of 4) are checked with a message naming the bad input."""
    cams, boundary, displacement, size = small_inputs()
    inputs = {"cams": cams, "classes": [1], "boundary": boundary, "displacement": displacement, **change}
    with pytest.raises(ValueError, match=message):
        synthesize_labels(inputs["cams"], inputs["classes"], inputs["boundary"], inputs["displacement"], size)


def test_synthesis_with_class_1_and_with_no_class():
    """Class id 1 is valid; no class gives empty labels of the image's size; outputs are
    uint8 semantic maps and the stride-4 instance map."""
    cams, boundary, displacement, size = small_inputs()
    got = synthesize_labels(cams, [1], boundary, displacement, size, SynthesisConfig(steps=2))
    assert got.semantic.dtype == np.uint8 and got.semantic.shape == size and got.semantic.max() == 1
    assert got.instance_map is not None and got.instance_map.shape == (3, 4)
    none = synthesize_labels(torch.zeros(0, 3, 4), [], boundary, displacement, size)
    assert none.semantic.shape == size and none.instance_map.shape == (3, 4) and len(none.instances) == 0


def test_synthesis_passes_its_config_to_every_helper(monkeypatch):
    """Every SynthesisConfig field used by synthesize_labels reaches the helper it is for."""
    calls = {}

    def spy(name):
        original = getattr(synthesis, name)

        def wrapper(*args, **kwargs):
            calls.setdefault(name, []).append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(synthesis, name, wrapper)

    for name in ("instance_map", "random_walk", "labels_from_scores", "instances_from_segments"):
        spy(name)
    config = dataclasses.replace(
        DEFAULTS, radius=3, beta=4.0, steps=2, displacement_iterations=7, centroid_threshold=1.5, max_groups=5,
        max_instances=6, sem_background_threshold=0.3, ins_background_threshold=0.4, min_instance_fraction=0.02,
    )  # fmt: skip
    cams, boundary, displacement, size = small_inputs()
    got = synthesize_labels(cams, [1], boundary, displacement, size, config)
    (_, kwargs), = calls["instance_map"]
    assert kwargs == {"iterations": 7, "threshold": 1.5, "max_groups": 5}
    (_, kwargs), = calls["random_walk"]
    assert kwargs == {"radius": 3, "beta": 4.0, "steps": 2}
    assert [args[1] for args, _ in calls["labels_from_scores"]] == [0.3, 0.4]
    (_, kwargs), = calls["instances_from_segments"]
    assert kwargs == {"min_size": pytest.approx(0.02 * 9 * 14), "max_instances": 6}
    np.testing.assert_array_equal(got.instance_map, instance_map(displacement, iterations=7, threshold=1.5))


def test_the_walk_emits_no_warnings():
    """torch's beta warnings about sparse CSR tensors are silenced where the matrix is built."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        random_walk(np.ones((1, 3, 3), np.float32), np.zeros((3, 3), np.float32), steps=1)


# ----------------------------------------------------------------------------- batched synthesis


def test_a_batch_with_an_image_without_classes_and_a_tall_one():
    """synthesize_labels_batch: an image without classes gets empty labels of its own size and
    the documented types; a tall image (rows > columns) and a second image of another size in
    the same batch are labelled as synthesize_labels labels them alone; timings are added to."""
    field = np.zeros((2, 1, 7), np.float32)
    field[1] = [3, 0, 3, 2, -4, 0, -3]
    field[0, 0, 3] = 1.5  # the field of test_instance_map_by_hand
    tall = torch.zeros(2, 5, 2)
    tall[0, :2], tall[0, 3:] = 1.0, -1.0  # two groups: rows 0-1 point down, 3-4 up, to row 2
    config = SynthesisConfig(steps=4, displacement_iterations=0)
    strip_cam = torch.tensor([[[1.0, 0, 0, 0, 1, 0, 1]]])  # on the pixels of group 0 (no centroid)
    cams = [torch.rand(1, 5, 2, generator=torch.Generator().manual_seed(1)), strip_cam, torch.ones(0, 2, 2)]
    classes = [torch.tensor([2]), torch.tensor([1]), torch.tensor([], dtype=torch.long)]
    boundaries = [torch.zeros(5, 2), torch.zeros(1, 7), torch.zeros(2, 2)]
    displacements = [tall, torch.from_numpy(field), torch.zeros(2, 2, 2)]
    sizes = [(20, 8), (4, 28), (7, 6)]
    timings = {"walk": 5.0, "instances": 7.0}
    got = synthesize_labels_batch(cams, classes, boundaries, displacements, sizes, config, timings)
    assert set(timings) == {"walk", "instances"}
    assert 5.0 < timings["walk"] < 5.0 + 60 and 7.0 < timings["instances"] < 7.0 + 60
    np.testing.assert_array_equal(got[1].instance_map, [[0, 1, 2, 2, 0, 2, 0]])  # as worked out by hand
    for n in (0, 1):
        expected = synthesize_labels(cams[n], classes[n], boundaries[n], displacements[n], sizes[n], config)
        np.testing.assert_array_equal(got[n].semantic, expected.semantic)
        np.testing.assert_array_equal(got[n].instance_map, expected.instance_map)
        np.testing.assert_array_equal(got[n].instances.masks, expected.instances.masks)
        np.testing.assert_array_equal(got[n].instances.classes, expected.instances.classes)
        np.testing.assert_allclose(got[n].instances.scores, expected.instances.scores, rtol=1e-6)
        assert got[n].semantic.dtype == np.uint8 and got[n].instance_map.dtype == np.int32
    empty = got[2]
    assert empty.semantic.shape == (7, 6) and empty.semantic.dtype == np.uint8
    assert empty.instance_map.shape == (2, 2) and empty.instance_map.dtype == np.int32
    assert empty.instances.masks.shape == (0, 7, 6) and empty.instances.masks.dtype == bool
    assert empty.instances.classes.dtype == np.int64 and empty.instances.scores.dtype == np.float32
    assert empty.instances.scores.shape == (0,) and empty.instances.classes.shape == (0,)
    # the tall image alone: a canvas taller than wide
    alone = synthesize_labels_batch(cams[:1], classes[:1], boundaries[:1], displacements[:1], sizes[:1], config)[0]
    np.testing.assert_array_equal(alone.semantic, got[0].semantic)
    # fresh timings, and a 1 x 1 stride-4 grid
    timings = {}
    started = time.perf_counter()
    one = synthesize_labels_batch([torch.ones(1, 1, 1)], [torch.tensor([1])], [torch.zeros(1, 1)],
                                  [torch.zeros(2, 1, 1)], [(4, 4)], config, timings)[0]  # fmt: skip
    elapsed = time.perf_counter() - started
    assert 0 <= timings["walk"] and 0 <= timings["instances"] and timings["walk"] + timings["instances"] <= elapsed
    assert one.instance_map.tolist() == [[1]] and one.semantic.shape == (4, 4)


def test_a_batch_of_two_refined_fields_equals_the_reference():
    """Eq. 10 for two fields of different sizes at once (one canvas, per-image limits) gives
    each image's instance map as instance_map gives it alone."""
    generator = torch.Generator().manual_seed(2)
    fields = [(torch.rand(2, 5, 3, generator=generator) - 0.5) * 6, (torch.rand(2, 2, 6, generator=generator) - 0.5) * 6]
    config = SynthesisConfig(steps=2, displacement_iterations=2)
    got = synthesize_labels_batch([torch.ones(1, 5, 3), torch.ones(1, 2, 6)], [torch.tensor([1])] * 2,
                                  [torch.zeros(5, 3), torch.zeros(2, 6)], fields, [(20, 12), (8, 24)], config)  # fmt: skip
    for labels, field in zip(got, fields):
        np.testing.assert_array_equal(labels.instance_map, instance_map(field, iterations=2))


def test_instances_from_components_by_hand():
    """Components 1..3 (raster order) of segments 2, 1, 1: instances in segment order, then
    raster order (components 2, 3, 1); a component below min_size (2 pixels) scores 0; the cap
    keeps the best, in their order; types bool / int64 / float32."""
    ids = np.array([[1, 1, 2], [0, 3, 3]])
    segment = np.array([0, 2, 1, 1])
    size = np.array([0, 2, 1, 2])
    best = np.array([-np.inf, 0.9, 0.4, 0.7], np.float32)
    classes = np.array([5, 7])  # segment 1 is class 5, segment 2 class 7
    got = _instances_from_components(ids, segment, size, best, classes, 2, None)
    np.testing.assert_allclose(got.scores, [0.0, 0.7, 0.9])
    assert got.classes.tolist() == [5, 5, 7]
    np.testing.assert_array_equal(got.masks, [ids == 2, ids == 3, ids == 1])
    assert got.masks.dtype == bool and got.classes.dtype == np.int64 and got.scores.dtype == np.float32
    capped = _instances_from_components(ids, segment, size, best, classes, 2, 2)
    np.testing.assert_allclose(capped.scores, [0.7, 0.9])
    np.testing.assert_array_equal(capped.masks, [ids == 3, ids == 1])


def test_connected_components_defaults_and_checks():
    """The default method numbers components as scipy does; an empty batch stays empty; a bad
    shape or method is refused with a message."""
    labels = torch.tensor([[[1, 0, 1], [1, 0, 0]]])
    assert connected_components(labels).tolist() == [[[1, 0, 2], [1, 0, 0]]]
    assert connected_components(torch.zeros(0, 3, 3, dtype=torch.long)).shape == (0, 3, 3)
    with pytest.raises(ValueError, match=r"labels must be \(N, h, w\), got \(3, 3\)"):
        connected_components(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="method must be auto, scipy or torch, got 'cuda'"):
        connected_components(labels, method="cuda")
