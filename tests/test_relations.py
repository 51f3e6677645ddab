import numpy as np
import pytest

from irnet_ray.config import RelationConfig
from irnet_ray.relations import IGNORE, crf_refine_labels, downsample_labels, ir_label_map


def two_region_image(rng):
    image = np.zeros((64, 80, 3), np.uint8)
    truth = np.zeros((64, 80), np.int64)
    yy, xx = np.mgrid[0:64, 0:80]
    truth[(yy - 32) ** 2 + (xx - 40) ** 2 < 20 ** 2] = 1
    image[truth == 0] = (40, 90, 40)
    image[truth == 1] = (200, 60, 50)
    noise = rng.normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), truth


def test_crf_improves_a_noisy_label_map():
    rng = np.random.default_rng(0)
    image, truth = two_region_image(rng)
    noisy = truth.copy()
    flip = rng.random(truth.shape) < 0.25
    noisy[flip] = 1 - noisy[flip]
    refined = crf_refine_labels(image, noisy, 2, RelationConfig())
    assert (noisy == truth).mean() < 0.8
    assert (refined == truth).mean() > 0.97


def test_ir_label_map_combines_confident_regions():
    rng = np.random.default_rng(1)
    image, truth = two_region_image(rng)
    yy, xx = np.mgrid[0:64, 0:80]
    distance = np.hypot(yy - 32, xx - 40)
    cam = np.clip(1.0 - distance / 30.0, 0, 1)[None].astype(np.float32)  # peaks in the disc
    # a distinct patch with a weak score (between the two thresholds): neither confident
    # foreground nor confident background
    patch = (yy < 12) & (xx < 16)
    image[patch] = (60, 60, 200)
    cam[0][patch] = 0.2
    labels = ir_label_map(image, cam, np.array([7]), RelationConfig())
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 7, IGNORE}
    assert (labels[truth == 1] == 7).mean() > 0.9  # the CRF snaps the fg region to the disc
    assert (labels[(distance > 32) & ~patch] == 0).mean() > 0.9  # far away: confident background
    assert (labels[patch] == IGNORE).mean() > 0.9


def test_ir_label_map_rejects_mismatched_cams():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="cams must be"):
        ir_label_map(image, np.zeros((2, 8, 8), np.float32), np.array([1]))


def test_downsample_labels_matches_the_stride_four_grid():
    labels = np.arange(130 * 66).reshape(130, 66) % 251
    small = downsample_labels(labels.astype(np.uint8))
    assert small.shape == (33, 17)
    assert small[0, 0] == labels[2, 2] and small[-1, -1] == labels[129, 65]
