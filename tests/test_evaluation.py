"""Tests for irnet_ray.evaluation; expected values are worked out by hand in comments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from irnet_ray.evaluation import (
    InstanceEvaluator,
    SemanticEvaluator,
    average_precision,
    confusion_matrix,
    mask_iou,
    miou_from_confusion,
)

# ----------------------------------------------------------------------------- semantic


def test_miou_3x3_with_ignore() -> None:
    target = np.array([[0, 0, 1], [1, 1, 255], [2, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 2], [2, 0, 0]])
    # Valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (1,2) (2,2) (2,0); the two
    # ignored pixels are dropped whatever was predicted there.
    #        pred 0 1 2
    # gt 0      [1 1 0]
    # gt 1      [0 2 1]
    # gt 2      [1 0 1]
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 2 / (3 + 3 - 2) = 1/2, IoU2 = 1 / (2 + 2 - 1) = 1/3
    # mIoU = (1/3 + 1/2 + 1/3) / 3 = 7/18; pixel accuracy = 4/7.
    conf = confusion_matrix(pred, target, num_classes=3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    assert conf.dtype == np.int64

    ev = SemanticEvaluator(3, class_names=["bg", "cat", "dog"])
    ev.process(pred, target)
    res = ev.evaluate()
    assert res["miou"] == pytest.approx(700 / 18)
    assert res["iou"] == pytest.approx([100 / 3, 50.0, 100 / 3])
    assert res["pixel_accuracy"] == pytest.approx(400 / 7)
    assert res["num_pixels"] == 7
    assert res["iou_by_class"]["cat"] == pytest.approx(50.0)


def test_miou_2x3_absent_class_excluded_pred_only_class_counts() -> None:
    target = np.array([[0, 0, 255], [1, 1, 1]])
    pred = np.array([[0, 3, 1], [1, 1, 0]])
    # Valid pairs: (0,0) (0,3) (1,1) (1,1) (1,0).
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 2 / (3 + 2 - 2) = 2/3,
    # class 2 is in neither gt nor pred -> NaN, excluded from the mean;
    # class 3 is predicted only -> IoU 0 / (0 + 1 - 0) = 0, which does count.
    # mIoU = (1/3 + 2/3 + 0) / 3 = 1/3; pixel accuracy = 3/5.
    miou, iou = miou_from_confusion(confusion_matrix(pred, target, 4))
    assert miou == pytest.approx(100 / 3)
    assert np.isnan(iou[2])
    np.testing.assert_allclose(iou[[0, 1, 3]], [1 / 3, 2 / 3, 0.0])

    ev = SemanticEvaluator(4)
    ev.process(pred, target)
    res = ev.evaluate()
    assert res["iou"][2] is None
    assert res["miou"] == pytest.approx(100 / 3)
    assert res["pixel_accuracy"] == pytest.approx(60.0)
    json.dumps(res)  # None instead of NaN keeps the result JSON-safe


def test_uint8_labels_do_not_overflow() -> None:
    # 20 * 21 + 20 = 440 would wrap around in uint8 arithmetic.
    label = np.full((2, 2), 20, dtype=np.uint8)
    conf = confusion_matrix(label, label, num_classes=21)
    assert conf[20, 20] == 4 and conf.sum() == 4


def test_semantic_merge_equals_single_and_state_roundtrip() -> None:
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 5, size=(7, 9)) for _ in range(6)]
    for t in targets:
        t[rng.random(t.shape) < 0.2] = 255
    preds = [rng.integers(0, 5, size=(7, 9)) for _ in range(6)]

    whole = SemanticEvaluator(5)
    for p, t in zip(preds, targets):
        whole.process(p, t)
    shards = [SemanticEvaluator(5), SemanticEvaluator(5)]
    for i, (p, t) in enumerate(zip(preds, targets)):
        shards[i % 2].process(p, t)
    # Shard states travel as JSON between workers.
    states = [json.loads(json.dumps(s.state_dict())) for s in shards]
    merged = SemanticEvaluator.from_state_dict(states[0]).merge(
        SemanticEvaluator.from_state_dict(states[1])
    )
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    assert merged.evaluate() == whole.evaluate()
    assert merged.confusion.sum() == sum(int((t != 255).sum()) for t in targets)

    whole.reset()
    with pytest.raises(ValueError, match="no pixels"):
        whole.evaluate()


def test_semantic_invalid_inputs() -> None:
    ev = SemanticEvaluator(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        ev.process(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="prediction"):
        ev.process(np.full((2, 2), 3), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="prediction"):
        ev.process(np.full((2, 2), -1), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="target"):
        ev.process(np.zeros((2, 2), int), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="num_classes"):
        ev.merge(SemanticEvaluator(4))
    with pytest.raises(ValueError, match="class names"):
        SemanticEvaluator(3, class_names=["a", "b"])


# ----------------------------------------------------------------------------- instance


def _rows(h: int, w: int, *row_ranges: tuple[int, int]) -> np.ndarray:
    """(N, h, w) masks, mask i covering rows [a, b) of row_ranges[i]."""
    masks = np.zeros((len(row_ranges), h, w), dtype=bool)
    for i, (a, b) in enumerate(row_ranges):
        masks[i, a:b] = True
    return masks


def test_average_precision_by_hand() -> None:
    # Sorted by score: TP, FP, TP, FP with 3 GT.
    # precision 1, 1/2, 2/3, 1/2; recall 1/3, 1/3, 2/3, 2/3.
    # Envelope at recall 1/3 -> 1, at 2/3 -> 2/3, beyond -> 0.
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 3) == pytest.approx(5 / 9)
    # Input order must not matter, only scores.
    assert average_precision([0.6, 0.7, 0.9, 0.8], [0, 1, 1, 0], 3) == pytest.approx(5 / 9)
    # FP, TP, TP with 2 GT: precision 0, 1/2, 2/3; recall 0, 1/2, 1. The envelope lifts
    # precision at recall 1/2 from 1/2 to 2/3: AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3.
    assert average_precision([0.9, 0.8, 0.7], [0, 1, 1], 2) == pytest.approx(2 / 3)
    assert average_precision([], [], 4) == 0.0
    assert np.isnan(average_precision([0.5], [0], 0))
    with pytest.raises(ValueError):
        average_precision([0.5, 0.4], [1, 1], 1)


def test_average_precision_matches_bruteforce() -> None:
    # AP = sum over each TP of (1/num_gt) * max precision at any rank at or after it.
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 20))
        scores = rng.permutation(n).astype(float)
        tp = rng.random(n) < 0.5
        num_gt = int(tp.sum() + rng.integers(0, 3)) or 1
        order = np.argsort(-scores)
        t = tp[order]
        prec = np.cumsum(t) / np.arange(1, n + 1)
        expected = sum(prec[i:].max() for i in range(n) if t[i]) / num_gt
        assert average_precision(scores, tp, num_gt) == pytest.approx(expected)


def test_instance_ap_by_hand_with_duplicate() -> None:
    h, w = 4, 4
    ev = InstanceEvaluator(num_classes=1)
    # Image 1: GT a = rows 0-1, GT b = rows 2-3. Predictions: exact a (0.9) and a
    # duplicate of a (0.6) -> the duplicate is an FP; b is never found.
    ev.process(
        _rows(h, w, (0, 2), (0, 2)), [1, 1], [0.9, 0.6],
        _rows(h, w, (0, 2), (2, 4)), [1, 1],
    )
    # Image 2: GT c = rows 1-3. Exact c (0.7) is a TP, a disjoint row 0 mask (0.8) an FP.
    ev.process(_rows(h, w, (0, 1), (1, 4)), [1, 1], [0.8, 0.7], _rows(h, w, (1, 4)), [1])
    # Global ranking 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP over 3 GT -> AP = 5/9 (see above),
    # at both thresholds since every TP is an exact match.
    res = ev.evaluate()
    assert res["ap50"] == pytest.approx(500 / 9)
    assert res["ap70"] == pytest.approx(500 / 9)
    assert res["ap_per_class"]["ap50"] == pytest.approx([500 / 9])
    assert res["num_gt"] == 3 and res["num_predictions"] == 4


def test_iou_06_is_tp_at_50_fp_at_70() -> None:
    gt = _rows(5, 2, (0, 5))  # 10 pixels
    pred = _rows(5, 2, (0, 3))  # 6 of them: IoU = 6 / 10 = 0.6
    assert mask_iou(pred, gt)[0, 0] == pytest.approx(0.6)
    ev = InstanceEvaluator(1)
    ev.process(pred, [1], [0.5], gt, [1])
    res = ev.evaluate()
    assert res["ap50"] == pytest.approx(100.0)
    assert res["ap70"] == pytest.approx(0.0)


def test_iou_exactly_at_threshold_is_tp() -> None:
    # IoU 5/10 and 7/10 must count as matches at 0.5 and 0.7 (>=, as chainercv).
    gt = _rows(5, 2, (0, 5))
    for rows, key in (((0, 2.5), "ap50"), ((0, 3.5), "ap70")):
        pred = np.zeros_like(gt)
        pred.reshape(1, -1)[0, : int(rows[1] * 2)] = True  # 5 or 7 of the 10 pixels
        ev = InstanceEvaluator(1)
        ev.process(pred, [1], [0.5], gt, [1])
        assert ev.evaluate()[key] == pytest.approx(100.0)


def test_mask_iou_empty_masks() -> None:
    empty = np.zeros((1, 3, 3), bool)
    full = np.ones((1, 3, 3), bool)
    # Empty union would be 0/0; defined as IoU 0 so an empty mask never matches.
    np.testing.assert_array_equal(mask_iou(empty, np.concatenate([empty, full])), [[0.0, 0.0]])
    assert mask_iou(np.zeros((0, 3, 3), bool), full).shape == (0, 1)


def test_duplicate_does_not_fall_back_to_second_best_gt() -> None:
    # chainercv semantics: each prediction goes to its highest-IoU GT. Two overlapping
    # GTs (rows 0-9 and 1-9); both predictions cover rows 0-9, IoU 1.0 with the first
    # and 0.9 with the second. The second prediction's best GT is taken -> FP.
    # TP, FP over 2 GT: precision 1, 1/2; recall 1/2, 1/2 -> AP = 1/2.
    ev = InstanceEvaluator(1)
    ev.process(_rows(10, 1, (0, 10), (0, 10)), [1, 1], [0.9, 0.8],
               _rows(10, 1, (0, 10), (1, 10)), [1, 1])
    assert ev.evaluate()["ap50"] == pytest.approx(50.0)


def test_missing_class_pulls_mean_down_pred_only_class_ignored() -> None:
    h, w = 4, 4
    ev = InstanceEvaluator(num_classes=3, class_names=["a", "b", "c"])
    # Class 1 found perfectly (AP 1); class 2 has GT but no prediction (AP 0);
    # class 3 only has a (false) prediction and no GT anywhere -> excluded.
    # mAP = (1 + 0) / 2 = 50%.
    ev.process(_rows(h, w, (0, 2), (2, 4)), [1, 3], [0.9, 0.95],
               _rows(h, w, (0, 2), (2, 4)), [1, 2])
    # Images with no predictions or no GT at all are valid input.
    ev.process(np.zeros((0, h, w), bool), [], [], np.zeros((0, h, w), bool), [])
    res = ev.evaluate()
    assert res["ap50"] == pytest.approx(50.0)
    assert res["ap_per_class"]["ap50"] == [pytest.approx(100.0), 0.0, None]
    assert res["ap_by_class"]["ap70"]["c"] is None
    json.dumps(res)


def _random_instances(rng: np.random.Generator, c: int, h: int, w: int) -> tuple:
    g = int(rng.integers(0, 4))
    gt = np.zeros((g, h, w), bool)
    for i in range(g):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        gt[i, y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = True
    gt_cls = rng.integers(1, c + 1, size=g)
    # Predictions: jittered copies of GT (varying IoU) plus random clutter.
    preds, cls = [], []
    for i in range(g):
        for _ in range(int(rng.integers(0, 3))):
            preds.append(np.roll(gt[i], int(rng.integers(-1, 2)), axis=int(rng.integers(2))))
            cls.append(gt_cls[i])
    for _ in range(int(rng.integers(0, 3))):
        preds.append(rng.random((h, w)) < 0.1)
        cls.append(rng.integers(1, c + 1))
    pred = np.array(preds, bool).reshape(len(preds), h, w)
    scores = rng.random(len(preds))
    return pred, np.array(cls, int), scores, gt, gt_cls


def test_instance_merge_equals_single_and_state_roundtrip() -> None:
    rng = np.random.default_rng(2)
    images = [_random_instances(rng, 3, 10, 10) for _ in range(20)]
    whole = InstanceEvaluator(3)
    for im in images:
        whole.process(*im)
    shards = [InstanceEvaluator(3) for _ in range(3)]
    for i, im in enumerate(images):
        shards[i * 3 // len(images)].process(*im)  # contiguous shards
    states = [json.loads(json.dumps(s.state_dict())) for s in shards]
    merged = InstanceEvaluator.from_state_dict(states[0])
    for st in states[1:]:
        merged.merge(InstanceEvaluator.from_state_dict(st))
    assert merged.state_dict() == whole.state_dict()
    res = whole.evaluate()
    assert merged.evaluate() == res
    assert 0.0 < res["ap70"] <= res["ap50"] < 100.0  # the data exercises both outcomes


def test_instance_invalid_inputs() -> None:
    ev = InstanceEvaluator(2)
    m = _rows(4, 4, (0, 2))
    ok = dict(pred_masks=m, pred_classes=[1], pred_scores=[0.5], gt_masks=m, gt_classes=[1])
    ev.process(**ok)
    bad_cases = [
        (dict(pred_classes=[0]), r"pred_classes must be in \[1, 2\]"),
        (dict(gt_classes=[3]), r"gt_classes must be in \[1, 2\]"),
        (dict(gt_masks=_rows(4, 5, (0, 2))), "mask size"),
        (dict(pred_scores=[0.5, 0.1]), r"pred_scores must have shape \(1,\)"),
        (dict(pred_classes=[1, 1]), r"pred_classes must have shape \(1,\)"),
        (dict(gt_masks=m[0]), r"\(N, H, W\)"),
        (dict(pred_scores=[np.nan]), "NaN"),
        (dict(gt_classes=[1.0]), "integer"),
    ]
    for override, msg in bad_cases:
        with pytest.raises(ValueError, match=msg):
            ev.process(**{**ok, **override})
    with pytest.raises(ValueError, match="num_classes"):
        ev.merge(InstanceEvaluator(3))
    with pytest.raises(ValueError, match="iou_thresholds"):
        ev.merge(InstanceEvaluator(2, iou_thresholds=(0.5,)))
    with pytest.raises(ValueError, match="no ground-truth"):
        InstanceEvaluator(2).evaluate()
