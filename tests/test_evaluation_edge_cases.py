"""Edge cases of irnet_ray.evaluation that the main tests leave open (found by mutation testing,
docs/testing.md). Expected values are worked out by hand in comments."""

from __future__ import annotations

import warnings

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


@pytest.mark.parametrize(
    ("prediction", "target", "message"),
    [
        (np.zeros(3, np.float32), np.zeros(3, np.int64), "prediction must be an integer array"),
        (np.zeros(3, np.int64), np.zeros(3, np.float32), "target must be an integer array"),
        (np.array([0, 3, 1]), np.zeros(3, np.int64), r"prediction labels must be in \[0, 2\], got range \[0, 3\]"),
        (np.zeros(3, np.int64), np.array([0, 3, 255]), r"target labels must be in \[0, 2\] or 255"),
    ],
)
def test_confusion_matrix_names_the_bad_input(prediction, target, message):
    """A bad label map is reported by name and with the allowed range, and a target label equal
    to num_classes is out of range (off by one at the upper bound)."""
    with pytest.raises(ValueError, match=message):
        confusion_matrix(prediction, target, num_classes=3)


@pytest.mark.parametrize("conf", [np.zeros((2, 3)), np.zeros(4)])
def test_miou_rejects_a_non_square_matrix(conf):
    """A non-square or 1-D matrix is refused with its own message, not an indexing error."""
    with pytest.raises(ValueError, match="confusion matrix must be square"):
        miou_from_confusion(conf)


def test_miou_of_an_empty_matrix_is_nan_without_warnings():
    """Classes never seen give NaN quietly (the code avoids 0/0 and the mean of nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        miou, iou = miou_from_confusion(np.array([[0, 0], [0, 3]]))
        assert miou == pytest.approx(100.0)  # class 1 only: IoU 3/3
        assert np.isnan(iou[0]) and iou[1] == 1.0
        miou, iou = miou_from_confusion(np.zeros((2, 2), np.int64))
    assert np.isnan(miou) and np.isnan(iou).all()


def test_one_class_and_a_custom_ignore_index():
    """num_classes=1 is allowed, 0 is refused; the evaluator passes its ignore_index on."""
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        SemanticEvaluator(0)
    ev = SemanticEvaluator(1, ignore_index=7)
    ev.process(np.zeros((1, 3), np.int64), np.array([[0, 7, 0]]))
    assert ev.evaluate()["num_pixels"] == 2  # the 7 is ignored, not refused as out of range


def test_semantic_state_round_trip_keeps_settings_and_integers():
    """The state dict carries ignore_index and class names, the counts stay integers (JSON),
    and a state without ignore_index (older files) means 255."""
    ev = SemanticEvaluator(2, ignore_index=9, class_names=["bg", "cat"])
    ev.process(np.array([[0, 1, 1]]), np.array([[0, 1, 9]]))
    state = ev.state_dict()
    assert all(type(v) is int for row in state["confusion"] for v in row)
    back = SemanticEvaluator.from_state_dict(state)
    assert back.ignore_index == 9 and back.class_names == ["bg", "cat"]
    assert back.confusion.dtype == np.int64
    np.testing.assert_array_equal(back.confusion, [[1, 0], [0, 1]])
    old = SemanticEvaluator.from_state_dict({"num_classes": 2, "confusion": [[0, 0], [0, 0]]})
    assert old.ignore_index == 255 and old.class_names is None
    with pytest.raises(ValueError, match="confusion shape"):
        SemanticEvaluator.from_state_dict({"num_classes": 3, "confusion": [[0, 0], [0, 0]]})


def test_merge_refuses_another_kind_by_name():
    """Merging an evaluator of the other kind names both kinds."""
    with pytest.raises(TypeError, match="cannot merge InstanceEvaluator into SemanticEvaluator"):
        SemanticEvaluator(2).merge(InstanceEvaluator(2))
    with pytest.raises(TypeError, match="cannot merge SemanticEvaluator into InstanceEvaluator"):
        InstanceEvaluator(2).merge(SemanticEvaluator(2))


# ----------------------------------------------------------------------------- instance


def test_mask_iou_of_one_pixel_masks():
    """A union of exactly one pixel is a valid union (IoU 1), not an empty one."""
    a = np.zeros((1, 3, 3), bool)
    a[0, 1, 1] = True
    np.testing.assert_array_equal(mask_iou(a, a), [[1.0]])


def test_average_precision_accepts_column_vectors_and_checks_counts():
    """Scores and flags of any shape are flattened; bad counts are refused with a message."""
    # flat: scores 0.9 (TP), 0.8 (FP), 0.7 (TP), 2 GT -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # envelope: 1 up to recall 1/2, 2/3 up to 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    ap = average_precision(np.array([[0.9], [0.8], [0.7]]), np.array([[True], [False], [True]]), 2)
    assert ap == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="got 2 scores but 1 tp flags"):
        average_precision([0.5, 0.4], [True], 1)
    with pytest.raises(ValueError, match="2 true positives but num_gt=1"):
        average_precision([0.5, 0.4], [True, True], 1)


def test_average_precision_ranks_ties_in_insertion_order():
    """Tied scores keep their order (merged shards rank like one pass); numpy's default sort
    reorders ties of arrays longer than 16."""
    scores = [0.5, 0.9] * 10
    flags = [False] * 20
    flags[5] = True  # the third of the ten 0.9s (indices 1, 3, 5, ...)
    assert average_precision(scores, flags, 1) == pytest.approx(1 / 3)


@pytest.mark.parametrize("thresholds", [(), (0.0,), (1.5,)])
def test_iou_thresholds_must_be_in_0_1(thresholds):
    """Thresholds lie in (0, 1]: none, 0 and above 1 are refused with a message."""
    with pytest.raises(ValueError, match=r"iou_thresholds must be in \(0, 1\]"):
        InstanceEvaluator(2, iou_thresholds=thresholds)


def test_instance_evaluator_arguments():
    """A threshold of exactly 1 is allowed; zero classes and duplicate keys are refused."""
    assert InstanceEvaluator(1, iou_thresholds=(1.0,)).keys == ["ap100"]
    with pytest.raises(ValueError, match="num_classes .* must be >= 1"):
        InstanceEvaluator(0)
    with pytest.raises(ValueError, match="duplicate keys"):
        InstanceEvaluator(1, iou_thresholds=(0.5, 0.501))


def test_process_names_bad_inputs():
    """Bad instance inputs are refused naming the argument and the sizes."""
    ev = InstanceEvaluator(2)
    masks = np.ones((1, 4, 4), bool)
    with pytest.raises(ValueError, match="pred_classes must be an integer array"):
        ev.process(masks, np.array([1.0]), [0.5], masks, [1])
    with pytest.raises(ValueError, match=r"pred mask size \(4, 4\) does not match gt mask size \(5, 5\)"):
        ev.process(masks, [1], [0.5], np.ones((1, 5, 5), bool), [1])


def test_non_binary_masks_are_read_as_booleans():
    """Masks of 0/255 (as PNGs hold them) are True/False masks: a prediction on rows 0-1 and a
    GT on rows 1-2 of a 4 x 4 image overlap by 4 of 12 pixels (IoU 1/3 < 0.5), a miss; the
    same prediction against a GT on rows 0-1 is a match."""
    pred = np.zeros((1, 4, 4), np.uint8)
    pred[0, :2] = 255
    gt = np.zeros((1, 4, 4), np.uint8)
    gt[0, 1:3] = 1
    ev = InstanceEvaluator(1, iou_thresholds=(0.5,))
    ev.process(pred, [1], [0.8], gt, [1])
    ev.process(pred, [1], [0.8], pred // 255, [1])
    assert ev.state_dict()["tp"] == [[[0, 1]]]


def test_tied_predictions_are_matched_in_input_order():
    """Among predictions of equal score the earlier one is matched first (numpy's default
    sort reorders ties of more than 16 elements). Twenty predictions scored 0.5, 0.9, 0.5, ...:
    only the third 0.9 (index 5) covers the GT, so the flags of the 0.9s read F, F, T, F, ..."""
    gt = np.zeros((1, 4, 4), bool)
    gt[0, 0] = True
    preds = np.zeros((20, 4, 4), bool)
    preds[5] = gt[0]
    ev = InstanceEvaluator(1, iou_thresholds=(0.5,))
    ev.process(preds, [1] * 20, [0.5, 0.9] * 10, gt, [1])
    assert ev.tp[0][0][:4] == [False, False, True, False]


@pytest.mark.parametrize("first", ["gt_only", "pred_only"])
def test_a_class_without_predictions_or_gt_does_not_stop_the_others(first):
    """Class 1 has only GT (or only predictions); class 2, after it, is still matched."""
    one = np.zeros((1, 4, 4), bool)
    one[0, 0] = True
    two = np.zeros((1, 4, 4), bool)
    two[0, 3] = True
    ev = InstanceEvaluator(2, iou_thresholds=(0.5,))
    if first == "gt_only":
        ev.process(two, [2], [0.9], np.concatenate([one, two]), [1, 2])
        assert ev.num_gt == [1, 1]
    else:
        ev.process(np.concatenate([one, two]), [1, 2], [0.3, 0.9], two, [2])
        assert ev.num_gt == [0, 1] and ev.tp[0] == [[False]]
    assert ev.tp[1] == [[True]] and ev.scores[1] == [0.9]


def test_a_taken_gt_stays_taken_after_a_miss():
    """Once a GT is matched, a later prediction below the threshold does not free it again:
    the third prediction (IoU 1 with the same GT) is a duplicate, a false positive."""
    gt = np.zeros((1, 4, 4), bool)
    gt[0, :2] = True  # 8 pixels
    weak = np.zeros((1, 4, 4), bool)
    weak[0, 0, 0] = True  # IoU 1/8 with the GT: its best GT, below 0.5
    preds = np.concatenate([gt, weak, gt])
    ev = InstanceEvaluator(1, iou_thresholds=(0.5,))
    ev.process(preds, [1, 1, 1], [0.9, 0.8, 0.7], gt, [1])
    assert ev.tp[0] == [[True, False, False]]


def test_instance_state_round_trip_keeps_class_names_and_checks_every_list():
    """Class names survive a state round trip; a state with a wrong count in any one list is
    refused with a message naming the problem."""
    ev = InstanceEvaluator(2, class_names=["cat", "dog"])
    assert InstanceEvaluator.from_state_dict(ev.state_dict()).class_names == ["cat", "dog"]
    good = ev.state_dict()
    for key, value in [("scores", [[]]), ("tp", [[[], []]]), ("num_gt", [0])]:
        with pytest.raises(ValueError, match="state must hold 2 classes"):
            InstanceEvaluator.from_state_dict({**good, key: value})
    with pytest.raises(ValueError, match="class 2: tp flags do not match scores"):
        InstanceEvaluator.from_state_dict({**good, "tp": [[[], []], [[]]]})
    with pytest.raises(ValueError, match="class 1: tp flags do not match scores"):
        InstanceEvaluator.from_state_dict({**good, "tp": [[[1], [0]], [[], []]]})
