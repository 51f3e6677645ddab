"""The paper's comparison rows (CAM, CAM + components, CAM + boundary + components) against an
independent computation on hand-made maps: a per-pixel loop and a flood fill written here, not
the library's argmax and ``scipy.ndimage.label``. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from irnet_ray.label.scores import BASELINES, baseline_predictions

BACKGROUND = 0.15


def _maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes on a 12x16 image: class 3 in two separate blobs, class 5 in one; a weak spot
    of class 3 (0.1, under the background plane); the walk's labels join the two class-3 blobs
    through a bridge and give class 5 a second piece."""
    cams = np.zeros((2, 12, 16), dtype=np.float32)
    cams[0, 1:5, 1:5] = 0.9
    cams[0, 1:5, 9:13] = 0.6
    cams[0, 8:10, 1:3] = 0.1  # under the background plane: background
    cams[1, 7:11, 6:12] = 0.8
    cams[1, 8:10, 8:10] = 1.0
    synthesized = np.zeros((12, 16), dtype=np.int64)
    synthesized[1:5, 1:13] = 3  # one region: blob + bridge + blob
    synthesized[7:11, 6:12] = 5
    synthesized[0, 15] = 5  # a single pixel: under 1% of the image, score 0
    return cams, np.array([3, 5]), synthesized


def _cam_labels(cams: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = np.zeros(cams.shape[1:], dtype=np.int64)
    for y in range(cams.shape[1]):
        for x in range(cams.shape[2]):
            best, label = BACKGROUND, 0
            for k in range(len(classes)):
                if cams[k, y, x] > best:
                    best, label = cams[k, y, x], int(classes[k])
            out[y, x] = label
    return out


def _components(labels: np.ndarray) -> list[tuple[int, set]]:
    """(class, pixels) of every 4-connected component of every class, by flood fill."""
    seen, found = set(), []
    for y, x in np.ndindex(labels.shape):
        if labels[y, x] == 0 or (y, x) in seen:
            continue
        stack, pixels = [(y, x)], set()
        while stack:
            p = stack.pop()
            if p in pixels:
                continue
            pixels.add(p)
            for q in ((p[0] + 1, p[1]), (p[0] - 1, p[1]), (p[0], p[1] + 1), (p[0], p[1] - 1)):
                if 0 <= q[0] < labels.shape[0] and 0 <= q[1] < labels.shape[1] and labels[q] == labels[y, x]:
                    stack.append(q)
        seen |= pixels
        found.append((int(labels[y, x]), pixels))
    return found


def _expected_instances(labels, cams, classes) -> list[tuple[int, frozenset, float]]:
    minimum = 0.01 * labels.size
    out = []
    for class_id, pixels in _components(labels):
        k = list(classes).index(class_id)
        score = max(float(cams[k][p]) for p in pixels) if len(pixels) >= minimum else 0.0
        out.append((class_id, frozenset(pixels), score))
    return sorted(out, key=lambda item: sorted(item[1]))


def _instances(parts) -> list[tuple[int, frozenset, float]]:
    _, masks, classes, scores = parts
    out = [(int(c), frozenset(zip(*np.nonzero(m))), float(s)) for m, c, s in zip(masks, classes, scores)]
    return sorted(out, key=lambda item: sorted(item[1]))


def _assert_same(got, expected) -> None:
    assert [(c, p) for c, p, _ in got] == [(c, p) for c, p, _ in expected]
    assert [s for _, _, s in got] == pytest.approx([s for _, _, s in expected])


def test_baselines_equal_an_independent_computation():
    cams, classes, synthesized = _maps()
    got = baseline_predictions(cams, classes, synthesized, BACKGROUND, size=synthesized.shape)
    assert set(got) == set(BASELINES)
    cam_labels = _cam_labels(cams, classes)
    np.testing.assert_array_equal(got["cam"][0], cam_labels)
    assert got["cam"][1:] == (None, None, None)

    cam_components = _instances(got["cam_components"])
    _assert_same(cam_components, _expected_instances(cam_labels, cams, classes))
    assert [c for c, _, _ in cam_components] == [3, 3, 5]  # the two class-3 blobs stay apart

    boundary = _instances(got["boundary_components"])
    _assert_same(boundary, _expected_instances(synthesized, cams, classes))
    # Built from the walk's labels, not the CAM's: the bridged blobs are one instance, scored
    # by the class-3 CAM's max over both; the single pixel is an instance with score 0.
    assert sorted((c, len(p), s) for c, p, s in boundary) == [(3, 48, pytest.approx(0.9)), (5, 1, 0.0),
                                                              (5, 24, pytest.approx(1.0))]  # fmt: skip


def test_baselines_at_the_ground_truth_size():
    cams, classes, synthesized = _maps()
    got = baseline_predictions(cams, classes, synthesized, BACKGROUND, size=(24, 32))
    cam_labels = _cam_labels(cams, classes)
    np.testing.assert_array_equal(got["cam"][0], np.repeat(np.repeat(cam_labels, 2, axis=0), 2, axis=1))
    for name in ("cam_components", "boundary_components"):
        assert got[name][1].shape[1:] == (24, 32)
