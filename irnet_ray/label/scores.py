"""Scoring pseudo labels against ground truth, one image at a time, merged exactly (no Ray).

Each labeled image with ground truth gets a small JSON record (:func:`score_image`): the
non-zero cells of its semantic confusion matrix and, per class, its number of ground-truth
instances and the scores / true-positive flags of its predicted instances. These are the
states of :class:`~irnet_ray.evaluation.SemanticEvaluator` and
:class:`~irnet_ray.evaluation.InstanceEvaluator` for that image, stored sparsely, so that
:class:`ScoreBoard` can merge any set of images (a file, a commit, a whole run) into the exact
evaluators of that set: mIoU and AP^r are computed by the evaluators, never here.

Records are per image (not per batch) so that the job's exactly-once commit covers the
metrics too: an image whose labels are committed twice would be scored twice.

Ground truth: the built-in set (``synthetic://`` URIs regenerate theirs) and PNGs named by a
record's ``semantic_uri`` / ``instance_uri`` (VOC layout: palette indices, 255 = ignore in the
semantic map and "no instance" in the instance map; an instance's class is the most frequent
semantic class under it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from irnet_ray.data.sources import load_synthetic, read_voc_masks
from irnet_ray.data.storage import StorageOptions, read_bytes
from irnet_ray.evaluation import InstanceEvaluator, SemanticEvaluator

__all__ = ["BASELINES", "baseline_predictions", "GroundTruth", "load_ground_truth", "pack_ground_truth", "unpack_ground_truth", "score_image",
           "ScoreBoard"]

IOU_THRESHOLDS = (0.5, 0.7)


@dataclass
class GroundTruth:
    """Ground truth of one image at its original size; either part may be missing."""

    semantic: np.ndarray | None  # (H, W) uint8, 0 background, 1..C, 255 ignore
    instances: np.ndarray | None  # (H, W) int32 instance ids, 0 none
    instance_ids: np.ndarray | None  # (G,) ids of the instances (an id may cover no pixel)
    instance_classes: np.ndarray | None  # (G,) class ids

    def instance_masks(self) -> np.ndarray:
        return self.instances[None] == self.instance_ids[:, None, None]


def load_ground_truth(
    uri: str, semantic_uri: str | None, instance_uri: str | None, options: StorageOptions
) -> GroundTruth | None:
    """The ground truth of a record, or ``None`` when it has none (raises when it is unreadable)."""
    if uri.startswith("synthetic://"):
        sample = load_synthetic(uri)
        ids = np.arange(1, len(sample.instance_classes) + 1, dtype=np.int32)
        return GroundTruth(sample.semantic, sample.instances.astype(np.int32), ids,
                           np.asarray(sample.instance_classes, dtype=np.int64))  # fmt: skip
    if not semantic_uri and not instance_uri:
        return None
    semantic, instances = read_voc_masks(
        read_bytes(semantic_uri, options) if semantic_uri else None,
        read_bytes(instance_uri, options) if instance_uri else None,
    )
    if instances is None:
        return GroundTruth(semantic, None, None, None)
    if semantic is None:  # instances without classes cannot be scored
        return None
    ids = np.unique(instances[instances > 0]).astype(np.int32)
    classes = np.zeros(len(ids), dtype=np.int64)
    for index, instance_id in enumerate(ids):
        under = semantic[(instances == instance_id) & (semantic != 255)]
        under = under[under > 0]
        classes[index] = np.bincount(under).argmax() if under.size else 0
    keep = classes > 0  # an instance drawn only over background / ignore has no class
    return GroundTruth(semantic, instances, ids[keep], classes[keep])


def pack_ground_truth(gt: GroundTruth | None) -> bytes:
    """Compact bytes of ``gt`` for moving it between pipeline stages (``b""`` for ``None``)."""
    if gt is None:
        return b""
    arrays = {name: value for name, value in vars(gt).items() if value is not None}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def unpack_ground_truth(data: bytes) -> GroundTruth | None:
    if not data:
        return None
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as arrays:
        return GroundTruth(**{name: arrays[name] if name in arrays else None
                              for name in ("semantic", "instances", "instance_ids", "instance_classes")})  # fmt: skip


#: The paper's comparison rows (Sec. 6), scored next to the pseudo labels when ground truth
#: exists: raw CAM argmax (semantic), connected components of it (instances), and connected
#: components of the boundary-propagated semantic labels ("CAM + class boundary").
BASELINES = ("cam", "cam_components", "boundary_components")


def baseline_predictions(highres_cams: np.ndarray, cam_classes: np.ndarray, synthesized: np.ndarray,
                         background: float, size: tuple[int, int]) -> dict[str, tuple]:  # fmt: skip
    """The :data:`BASELINES` of one image, as :func:`score_image` takes them, at ``size``.

    ``highres_cams`` (K, H, W) and ``cam_classes`` (K,): the image's full-resolution CAMs;
    ``synthesized`` (H, W): the semantic labels of the walk. ``cam``: raw-CAM labels (a constant
    ``background`` plane, then argmax); ``cam_components``: every 4-connected component of a
    raw-CAM class mask is one instance scored by its class's max CAM inside it;
    ``boundary_components``: the same over ``synthesized``.
    """
    import torch

    from irnet_ray.data.output_format import resize_nearest
    from irnet_ray.models.cam import cam_semantic_labels
    from irnet_ray.synthesis import cam_connected_components

    highres, classes = np.asarray(highres_cams, dtype=np.float32), np.asarray(cam_classes, dtype=np.int64)
    cam_labels = cam_semantic_labels(torch.from_numpy(highres), torch.from_numpy(classes), background).numpy()
    out = {"cam": (resize_nearest(cam_labels, size), None, None, None)}
    for name, semantic in (("cam_components", cam_labels), ("boundary_components", np.asarray(synthesized))):
        parts = cam_connected_components(semantic, highres, classes)
        out[name] = (None, resize_nearest(parts.masks, size), parts.classes, parts.scores)
    return out


def score_image(
    num_classes: int,
    semantic: np.ndarray | None,
    masks: np.ndarray | None,
    classes: np.ndarray | None,
    scores: np.ndarray | None,
    gt: GroundTruth,
    baselines: dict[str, tuple] | None = None,
) -> dict:
    """The score record of one image's labels (at the ground truth's size) against ``gt``.

    ``semantic`` and/or the instances (``masks``, ``classes``, ``scores``) may be ``None`` (not
    scored). ``baselines`` maps names of :data:`BASELINES` to the same four values.
    """
    board = ScoreBoard(num_classes)
    if gt.semantic is not None and semantic is not None:
        board.semantic.process(semantic, gt.semantic)
    if gt.instances is not None and masks is not None:
        board.instance.process(masks, classes, scores, gt.instance_masks(), gt.instance_classes)
    board.images = 1
    record = board.compact()
    for name, parts in (baselines or {}).items():
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
        record.setdefault("baselines", {})[name] = score_image(num_classes, *parts, gt)
    return record


class ScoreBoard:
    """Exact merge of score records: semantic and instance evaluators over a set of images."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        names = list(class_names) if class_names is not None else None
        self.num_classes = int(num_classes)
        self.semantic = SemanticEvaluator(self.num_classes + 1, class_names=["background", *names] if names else None)
        self.instance = InstanceEvaluator(self.num_classes, IOU_THRESHOLDS, class_names=names)
        self.images = 0
        self.class_names = names
        self.baselines: dict[str, ScoreBoard] = {}

    def compact(self) -> dict:
        """The record of everything added so far (sparse evaluator states)."""
        confusion = self.semantic.confusion.reshape(-1)
        cells = np.flatnonzero(confusion)
        state = self.instance.state_dict()
        instances = {}
        for c in range(self.num_classes):
            if state["num_gt"][c] or state["scores"][c]:
                instances[str(c + 1)] = {"num_gt": state["num_gt"][c], "scores": state["scores"][c],
                                         "tp": state["tp"][c]}  # fmt: skip
        record = {"images": self.images, "confusion": {"cells": cells.tolist(), "counts": confusion[cells].tolist()},
                  "instances": instances}  # fmt: skip
        if self.baselines:
            record["baselines"] = {name: board.compact() for name, board in self.baselines.items()}
        return record

    def add(self, record: dict | None) -> "ScoreBoard":
        """Merge one record (of an image or of a set) into this board."""
        if not record:
            return self
        confusion = np.zeros(self.semantic.confusion.size, dtype=np.int64)
        cells = np.asarray(record["confusion"]["cells"], dtype=np.int64)
        if cells.size and cells.max() >= confusion.size:
            raise ValueError(f"score record has {int(cells.max()) + 1} confusion cells, expected {confusion.size}")
        np.add.at(confusion, cells, np.asarray(record["confusion"]["counts"], dtype=np.int64))
        semantic = self.semantic.state_dict()
        semantic["confusion"] = confusion.reshape(self.semantic.confusion.shape).tolist()
        self.semantic.merge(SemanticEvaluator.from_state_dict(semantic))

        instance = InstanceEvaluator(self.num_classes, IOU_THRESHOLDS).state_dict()
        for key, part in record["instances"].items():
            c = int(key) - 1
            if not 0 <= c < self.num_classes:
                raise ValueError(f"score record names class {key}, outside 1..{self.num_classes}")
            instance["num_gt"][c], instance["scores"][c], instance["tp"][c] = part["num_gt"], part["scores"], part["tp"]
        self.instance.merge(InstanceEvaluator.from_state_dict(instance))
        self.images += int(record["images"])
        for name, part in (record.get("baselines") or {}).items():
            if name not in self.baselines:
                self.baselines[name] = ScoreBoard(self.num_classes, self.class_names)
            self.baselines[name].add(part)
        return self

    def evaluate(self) -> dict | None:
        """``{"images", "miou", "ap50", "ap70", "semantic", "instance"}`` (percent), or ``None``
        when nothing was scored; a part without ground truth is ``None``."""
        if self.images == 0:
            return None
        semantic = self.semantic.evaluate() if self.semantic.confusion.sum() else None
        instance = self.instance.evaluate() if sum(self.instance.num_gt) else None
        out = {
            "images": self.images,
            "miou": semantic["miou"] if semantic else None,
            "ap50": instance["ap50"] if instance else None,
            "ap70": instance["ap70"] if instance else None,
            "semantic": semantic,
            "instance": instance,
        }
        if self.baselines:
            out["baselines"] = {}
            for name in BASELINES:
                part = self.baselines[name].evaluate() if name in self.baselines else None
                if part:
                    out["baselines"][name] = {k: part[k] for k in ("images", "miou", "ap50", "ap70")}
        return out
