"""Mergeable evaluators for semantic (mIoU) and instance (VOC mask AP) segmentation.

Both evaluators follow the detectron2 ``reset / process / evaluate`` pattern and can be
merged, so shards evaluated in separate workers combine into one exact result. Their
state is a plain JSON-serialisable dict. Pure NumPy on purpose: importing this module
must not pull in torch or ray.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = [
    "InstanceEvaluator",
    "SemanticEvaluator",
    "average_precision",
    "confusion_matrix",
    "mask_iou",
    "miou_from_confusion",
]


def _percent_or_none(x: float) -> float | None:
    """Fraction -> percent; NaN -> None so results survive ``json.dumps`` unchanged."""
    return None if np.isnan(x) else float(x) * 100.0


def _check_names(class_names: Sequence[str] | None, n: int) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise ValueError(f"expected {n} class names, got {len(names)}")
    return names


def _as_int_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iub" and arr.size:  # np.asarray([]) is float; allow it
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    # int64 before any arithmetic: uint8 label maps would overflow in target * n + pred.
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- semantic


def confusion_matrix(
    prediction: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(num_classes, num_classes) int64 matrix; rows = ground truth, cols = prediction."""
    pred = _as_int_array(prediction, "prediction")
    gt = _as_int_array(target, "target")
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match target shape {gt.shape}"
        )
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"prediction labels must be in [0, {num_classes - 1}], "
            f"got range [{pred.min()}, {pred.max()}]"
        )
    valid = gt != ignore_index
    gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(
            f"target labels must be in [0, {num_classes - 1}] or {ignore_index}, "
            f"got range [{gt.min()}, {gt.max()}]"
        )
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def miou_from_confusion(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean IoU in percent, per-class IoU in [0, 1]); classes with empty union are NaN."""
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    iou = np.full(len(tp), np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    present = ~np.isnan(iou)
    # Mean only over classes seen in gt or prediction (nanmean without its warning).
    miou = float(iou[present].mean() * 100.0) if present.any() else float("nan")
    return miou, iou


class SemanticEvaluator:
    """Accumulates a confusion matrix over (H, W) label maps; reports mIoU."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = _check_names(class_names, self.num_classes)
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def process(self, prediction: np.ndarray, target: np.ndarray) -> None:
        self.confusion += confusion_matrix(
            prediction, target, self.num_classes, self.ignore_index
        )

    def merge(self, other: SemanticEvaluator) -> SemanticEvaluator:
        if not isinstance(other, SemanticEvaluator):
            raise TypeError(f"cannot merge {type(other).__name__} into SemanticEvaluator")
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"num_classes differ: {self.num_classes} vs {other.num_classes}"
            )
        self.confusion += other.confusion
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "class_names": self.class_names,
            "confusion": self.confusion.tolist(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> SemanticEvaluator:
        ev = cls(d["num_classes"], d.get("ignore_index", 255), d.get("class_names"))
        conf = np.asarray(d["confusion"], dtype=np.int64)
        if conf.shape != ev.confusion.shape:
            raise ValueError(
                f"confusion shape {conf.shape} does not match {ev.confusion.shape}"
            )
        ev.confusion = conf.copy()
        return ev

    def evaluate(self) -> dict[str, Any]:
        """Percentages; ``iou[c]`` is None for classes in neither gt nor prediction."""
        num_pixels = int(self.confusion.sum())
        if num_pixels == 0:
            raise ValueError("no pixels have been processed (or all were ignored)")
        miou, iou = miou_from_confusion(self.confusion)
        result: dict[str, Any] = {
            "miou": miou,
            "iou": [_percent_or_none(v) for v in iou],
            "pixel_accuracy": float(np.trace(self.confusion) / num_pixels * 100.0),
            "num_pixels": num_pixels,
        }
        if self.class_names is not None:
            result["iou_by_class"] = dict(zip(self.class_names, result["iou"]))
        return result


# --------------------------------------------------------------------------- instance


def mask_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """(N, M) IoU between (N, H, W) and (M, H, W) boolean masks; empty unions give 0."""
    masks_a, masks_b = np.asarray(masks_a), np.asarray(masks_b)
    num_pixels = int(np.prod(masks_a.shape[1:]))  # not -1: reshape fails when N == 0
    a = masks_a.reshape(len(masks_a), num_pixels)
    b = masks_b.reshape(len(masks_b), num_pixels)
    # float32 products/sums of 0/1 are exact up to 2**24 pixels; fall back beyond that.
    dtype = np.float32 if num_pixels <= 2**24 else np.float64
    a, b = a.astype(dtype), b.astype(dtype)
    # Divide in float64 so e.g. 7/10 equals the 0.7 threshold exactly (as in chainercv).
    inter = (a @ b.T).astype(np.float64)
    area_a, area_b = a.sum(axis=1, dtype=np.float64), b.sum(axis=1, dtype=np.float64)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def average_precision(
    scores: Sequence[float] | np.ndarray, tp_flags: Sequence[bool] | np.ndarray, num_gt: int
) -> float:
    """All-points interpolated VOC AP in [0, 1] (chainercv ``use_07_metric=False``).

    Returns NaN when ``num_gt == 0`` (as chainercv), so callers can skip such classes.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    tp = np.asarray(tp_flags, dtype=bool).reshape(-1)
    if scores.shape != tp.shape:
        raise ValueError(f"got {scores.size} scores but {tp.size} tp flags")
    if num_gt < 0 or tp.sum() > num_gt:
        raise ValueError(f"{int(tp.sum())} true positives but num_gt={num_gt}")
    if num_gt == 0:
        return float("nan")
    # Stable sort keeps ties in insertion order, so merged shards rank like one pass.
    order = np.argsort(-scores, kind="stable")
    tp_cum = np.cumsum(tp[order])
    fp_cum = np.cumsum(~tp[order])
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
    recall = tp_cum / num_gt
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    # Precision envelope: best precision achievable at any recall >= r.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


class InstanceEvaluator:
    """VOC-style mask AP (AP^r) at several IoU thresholds, as reported by IRNet.

    Matching follows chainercv ``eval_instance_segmentation_voc``: per image and class,
    predictions in descending score order take the GT with the highest IoU; it is a true
    positive if that IoU >= threshold and the GT is not yet taken, otherwise a false
    positive. Matching happens in ``process`` so only scores/flags need to be kept.
    """

    def __init__(
        self,
        num_classes: int,
        iou_thresholds: Sequence[float] = (0.5, 0.7),
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground) must be >= 1, got {num_classes}")
        thresholds = tuple(float(t) for t in iou_thresholds)
        if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
            raise ValueError(f"iou_thresholds must be in (0, 1], got {iou_thresholds}")
        keys = [f"ap{int(round(t * 100))}" for t in thresholds]
        if len(set(keys)) != len(keys):
            raise ValueError(f"iou_thresholds give duplicate keys {keys}")
        self.num_classes = int(num_classes)
        self.iou_thresholds = thresholds
        self.keys = keys
        self.class_names = _check_names(class_names, self.num_classes)
        self.reset()

    def reset(self) -> None:
        # Index c holds class id c + 1.
        self.num_gt = [0] * self.num_classes
        self.scores: list[list[float]] = [[] for _ in range(self.num_classes)]
        self.tp: list[list[list[bool]]] = [
            [[] for _ in self.iou_thresholds] for _ in range(self.num_classes)
        ]

    def _check_instances(
        self, masks: Any, classes: Any, name: str
    ) -> tuple[np.ndarray, np.ndarray]:
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"{name}_masks must have shape (N, H, W), got {masks.shape}")
        classes = _as_int_array(classes, f"{name}_classes")
        if classes.shape != (len(masks),):
            raise ValueError(
                f"{name}_classes must have shape ({len(masks)},), got {classes.shape}"
            )
        if classes.size and (classes.min() < 1 or classes.max() > self.num_classes):
            raise ValueError(
                f"{name}_classes must be in [1, {self.num_classes}] (0 is background), "
                f"got range [{classes.min()}, {classes.max()}]"
            )
        return masks.astype(bool, copy=False), classes

    def process(
        self,
        pred_masks: np.ndarray,
        pred_classes: np.ndarray,
        pred_scores: np.ndarray,
        gt_masks: np.ndarray,
        gt_classes: np.ndarray,
    ) -> None:
        """Match one image's predictions (P, H, W) against its ground truth (G, H, W)."""
        pred_masks, pred_classes = self._check_instances(pred_masks, pred_classes, "pred")
        gt_masks, gt_classes = self._check_instances(gt_masks, gt_classes, "gt")
        pred_scores = np.asarray(pred_scores, dtype=np.float64)
        if pred_scores.shape != (len(pred_masks),):
            raise ValueError(
                f"pred_scores must have shape ({len(pred_masks)},), got {pred_scores.shape}"
            )
        if np.isnan(pred_scores).any():
            raise ValueError("pred_scores contain NaN")
        if pred_masks.shape[1:] != gt_masks.shape[1:]:
            raise ValueError(
                f"pred mask size {pred_masks.shape[1:]} does not match "
                f"gt mask size {gt_masks.shape[1:]}"
            )

        for cls in np.union1d(pred_classes, gt_classes):
            c = int(cls) - 1
            gi = np.flatnonzero(gt_classes == cls)
            self.num_gt[c] += len(gi)
            pi = np.flatnonzero(pred_classes == cls)
            if len(pi) == 0:
                continue
            pi = pi[np.argsort(-pred_scores[pi], kind="stable")]
            self.scores[c].extend(pred_scores[pi].tolist())
            if len(gi) == 0:
                for flags in self.tp[c]:
                    flags.extend([False] * len(pi))
                continue
            iou = mask_iou(pred_masks[pi], gt_masks[gi])
            best = iou.argmax(axis=1)
            best_iou = iou[np.arange(len(pi)), best]
            for k, thr in enumerate(self.iou_thresholds):
                taken = np.zeros(len(gi), dtype=bool)
                for g, above in zip(best, best_iou >= thr):
                    # A GT already taken makes this a duplicate (FP); like chainercv we
                    # do not fall back to the next-best GT.
                    self.tp[c][k].append(bool(above and not taken[g]))
                    taken[g] |= above

    def merge(self, other: InstanceEvaluator) -> InstanceEvaluator:
        if not isinstance(other, InstanceEvaluator):
            raise TypeError(f"cannot merge {type(other).__name__} into InstanceEvaluator")
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"num_classes differ: {self.num_classes} vs {other.num_classes}"
            )
        if other.iou_thresholds != self.iou_thresholds:
            raise ValueError(
                f"iou_thresholds differ: {self.iou_thresholds} vs {other.iou_thresholds}"
            )
        for c in range(self.num_classes):
            self.num_gt[c] += other.num_gt[c]
            self.scores[c].extend(other.scores[c])
            for mine, theirs in zip(self.tp[c], other.tp[c]):
                mine.extend(theirs)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "iou_thresholds": list(self.iou_thresholds),
            "class_names": self.class_names,
            "num_gt": list(self.num_gt),
            "scores": [list(s) for s in self.scores],
            "tp": [[[int(f) for f in flags] for flags in per_t] for per_t in self.tp],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> InstanceEvaluator:
        ev = cls(d["num_classes"], d["iou_thresholds"], d.get("class_names"))
        n, t = ev.num_classes, len(ev.iou_thresholds)
        scores, tp, num_gt = d["scores"], d["tp"], d["num_gt"]
        if len(scores) != n or len(tp) != n or len(num_gt) != n:
            raise ValueError(f"state must hold {n} classes")
        for c in range(n):
            if len(tp[c]) != t or any(len(f) != len(scores[c]) for f in tp[c]):
                raise ValueError(f"class {c + 1}: tp flags do not match scores")
        ev.num_gt = [int(g) for g in num_gt]
        ev.scores = [[float(s) for s in per_c] for per_c in scores]
        ev.tp = [[[bool(f) for f in flags] for flags in per_t] for per_t in tp]
        return ev

    def evaluate(self) -> dict[str, Any]:
        """Percentages; mAP averages classes with GT, per-class AP is None for the rest."""
        if sum(self.num_gt) == 0:
            raise ValueError("no ground-truth instances have been processed")
        result: dict[str, Any] = {}
        per_class: dict[str, list[float | None]] = {}
        for k, key in enumerate(self.keys):
            aps = [
                average_precision(self.scores[c], self.tp[c][k], self.num_gt[c])
                for c in range(self.num_classes)
            ]
            valid = [a for a in aps if not np.isnan(a)]  # classes with GT only
            result[key] = float(np.mean(valid) * 100.0)
            per_class[key] = [_percent_or_none(a) for a in aps]
        result["ap_per_class"] = per_class
        if self.class_names is not None:
            result["ap_by_class"] = {
                key: dict(zip(self.class_names, aps)) for key, aps in per_class.items()
            }
        result["num_gt"] = int(sum(self.num_gt))
        result["num_predictions"] = int(sum(len(s) for s in self.scores))
        return result
