"""Tests for the built-in synthetic benchmark (irnet_ray.data.synthetic)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from irnet_ray.data.synthetic import (
    CLASS_NAMES,
    SyntheticConfig,
    SyntheticDataset,
    SyntheticSample,
    class_names,
    colorize_labels,
    generate_sample,
    preview_grid,
)

CROSS = ndimage.generate_binary_structure(2, 1)


@lru_cache(maxsize=None)
def _samples(n: int = 128, seed: int = 0) -> tuple[SyntheticSample, ...]:
    return tuple(SyntheticDataset(SyntheticConfig(num_images=n, seed=seed)))


def _same_class_touching(sample: SyntheticSample) -> bool:
    """True if two instances of the same class have 4-adjacent (or overlapping) masks."""
    k = sample.num_instances
    for a in range(1, k + 1):
        grown = ndimage.binary_dilation(sample.instances == a, structure=CROSS)
        for b in range(a + 1, k + 1):
            if sample.instance_classes[a - 1] == sample.instance_classes[b - 1] and np.any(
                grown & (sample.instances == b)
            ):
                return True
    return False


# ----------------------------------------------------------------------------- determinism


def test_same_config_and_index_give_identical_sample():
    cfg = SyntheticConfig(num_images=8, seed=3)
    a = generate_sample(cfg, 5)
    b = generate_sample(cfg, 5)
    c = SyntheticDataset(cfg)[5]
    for other in (b, c):
        assert other.image_id == a.image_id == "synthetic-3-000005"
        for name in ("image", "classes", "semantic", "instances", "instance_classes", "marks"):
            np.testing.assert_array_equal(getattr(a, name), getattr(other, name))


def test_sample_depends_only_on_seed_and_index():
    # Not on num_images, nor on which other samples were generated before.
    small = SyntheticDataset(SyntheticConfig(num_images=4, seed=1))
    big = SyntheticDataset(SyntheticConfig(num_images=100, seed=1))
    _ = big[50]
    np.testing.assert_array_equal(small[2].image, big[2].image)
    np.testing.assert_array_equal(small[2].instances, big[2].instances)


def test_different_seeds_and_indices_differ():
    a = generate_sample(SyntheticConfig(seed=0), 0)
    b = generate_sample(SyntheticConfig(seed=1), 0)
    c = generate_sample(SyntheticConfig(seed=0), 1)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image_id != b.image_id != c.image_id


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("image_size", [(128, 128), (64, 96)])
def test_dtypes_and_shapes(image_size):
    cfg = SyntheticConfig(num_images=4, image_size=image_size)
    for s in SyntheticDataset(cfg):
        h, w = image_size
        assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
        assert s.semantic.shape == (h, w) and s.semantic.dtype == np.uint8
        assert s.instances.shape == (h, w) and s.instances.dtype == np.int32
        assert s.marks is not None and s.marks.shape == (h, w) and s.marks.dtype == np.int32
        assert s.classes.dtype == np.int64 and s.instance_classes.dtype == np.int64
        assert s.image.std() > 10  # not blank


def test_ground_truth_is_consistent():
    for s in _samples()[:48]:
        k = s.num_instances
        assert 1 <= k <= 4
        # instance ids are exactly 1..K, all present
        assert set(np.unique(s.instances).tolist()) - {0} == set(range(1, k + 1))
        # semantic label == class of the instance at every pixel; background where no instance
        lut = np.concatenate([[0], s.instance_classes])
        np.testing.assert_array_equal(s.semantic, lut[s.instances])
        # classes == set of classes in the semantic map, sorted, in 1..C
        present = np.unique(s.semantic)
        np.testing.assert_array_equal(s.classes, present[present > 0])
        assert s.classes.min() >= 1 and s.classes.max() <= 4
        assert 1 <= len(s.classes) <= 3
        np.testing.assert_array_equal(s.label_vector(4).nonzero()[0] + 1, s.classes)
        for i in range(1, k + 1):
            mask = s.instances == i
            assert mask.sum() >= 60, "instance too small"
            _, n_comp = ndimage.label(mask, structure=CROSS)
            assert n_comp == 1, "visible instance mask must be connected"
        # marks lie inside their own instance
        on = s.marks > 0
        np.testing.assert_array_equal(s.marks[on], s.instances[on])


def test_every_instance_has_a_visible_mark_covering_only_a_fraction_of_it():
    fractions = []
    for s in _samples()[:64]:
        for i in range(1, s.num_instances + 1):
            area = (s.instances == i).sum()
            mark = (s.marks == i).sum()
            assert mark > 0, "every instance keeps (most of) its discriminative mark visible"
            fractions.append(mark / area)
    fractions = np.asarray(fractions)
    assert fractions.max() <= 0.45
    assert fractions.min() >= 0.05
    assert 0.12 <= fractions.mean() <= 0.32


def test_marks_are_class_specific_and_bodies_are_not():
    # The mark colour is (almost) fixed per class, while body colours vary across instances of a class.
    mark_means: dict[int, list[np.ndarray]] = {}
    body_means: dict[int, list[np.ndarray]] = {}
    for s in _samples()[:64]:
        img = s.image.astype(np.float64)
        for i, c in enumerate(s.instance_classes.tolist(), start=1):
            body = (s.instances == i) & (s.marks == 0)
            inner = ndimage.binary_erosion(body, structure=CROSS, iterations=2)
            if inner.sum() < 20:
                continue
            body_means.setdefault(c, []).append(img[inner].mean(axis=0))
            mark_means.setdefault(c, []).append(img[s.marks == i].mean(axis=0))
    for c in body_means:
        if len(body_means[c]) < 4:
            continue
        body_spread = np.linalg.norm(np.std(body_means[c], axis=0))
        mark_spread = np.linalg.norm(np.std(mark_means[c], axis=0))
        assert body_spread > 2 * mark_spread, (c, body_spread, mark_spread)
    # Different classes have clearly different mark colours.
    centres = {c: np.mean(v, axis=0) for c, v in mark_means.items()}
    cs = sorted(centres)
    for a in cs:
        for b in cs:
            if a < b:
                assert np.linalg.norm(centres[a] - centres[b]) > 30


# ----------------------------------------------------------------------------- dataset statistics


def test_dataset_statistics():
    samples = _samples()
    n = len(samples)
    touching = sum(_same_class_touching(s) for s in samples)
    assert touching >= 0.2 * n, f"only {touching}/{n} images with a touching same-class pair"
    assert sum(len(s.classes) >= 2 for s in samples) >= 0.25 * n
    counts = np.bincount(np.concatenate([s.classes for s in samples]), minlength=5)[1:]
    assert np.all(counts >= 0.1 * n), counts
    sizes = {s.num_instances for s in samples}
    assert sizes == {1, 2, 3, 4}


def test_touching_probability_controls_same_class_contacts():
    always = SyntheticDataset(SyntheticConfig(num_images=12, touching_probability=1.0, seed=7))
    assert all(_same_class_touching(s) for s in always)
    never = SyntheticDataset(SyntheticConfig(num_images=24, touching_probability=0.0, seed=7))
    assert not any(_same_class_touching(s) for s in never)


@pytest.mark.parametrize("num_classes", [1, 8])
def test_class_count_range(num_classes):
    ds = SyntheticDataset(SyntheticConfig(num_images=16, num_classes=num_classes))
    for s in ds:
        assert s.classes.min() >= 1 and s.classes.max() <= num_classes
        assert len(s.classes) <= min(3, num_classes)


# ----------------------------------------------------------------------------- API / validation


def test_class_names():
    assert len(CLASS_NAMES) >= 8 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert class_names(4) == CLASS_NAMES[:4]
    assert SyntheticDataset(SyntheticConfig(num_classes=3)).class_names == CLASS_NAMES[:3]
    with pytest.raises(ValueError):
        class_names(0)
    with pytest.raises(ValueError):
        class_names(len(CLASS_NAMES) + 1)


def test_dataset_indexing():
    ds = SyntheticDataset(SyntheticConfig(num_images=3))
    assert len(ds) == 3
    np.testing.assert_array_equal(ds[-1].image, ds[2].image)
    assert [s.image_id for s in ds[0:2]] == [ds[0].image_id, ds[1].image_id]
    assert ds[np.int64(1)].image_id == ds[1].image_id
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    with pytest.raises(ValueError):
        generate_sample(ds.config, -1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_images=0), "num_images"),
        (dict(image_size=(31, 128)), "image_size"),
        (dict(image_size=(128, 16)), "image_size"),
        (dict(image_size=(128,)), "image_size"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=len(CLASS_NAMES) + 1), "num_classes"),
        (dict(touching_probability=1.5), "touching_probability"),
        (dict(min_instances=3, max_instances=2), "min_instances"),
        (dict(object_size=(30.0, 20.0)), "object_size"),
        (dict(mark_fraction=(0.0, 0.2)), "mark_fraction"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_config_is_hashable_and_normalised():
    cfg = SyntheticConfig(image_size=[96, 112])
    assert cfg.image_size == (96, 112)
    assert hash(cfg) == hash(SyntheticConfig(image_size=(96, 112)))


def test_visualisation_helpers():
    samples = list(_samples()[:3])
    grid = preview_grid(samples, columns=2)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    col = colorize_labels(samples[0].instances)
    assert col.shape == samples[0].instances.shape + (3,)
    assert np.all(col[samples[0].instances == 0] == 0)
