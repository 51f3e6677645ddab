"""The labeling job's output tables: pseudo-mask rows and per-image error rows (no Ray, no torch).

``docs/output-format.md`` documents every column for readers without this package. In short,
one row of :data:`LABEL_SCHEMA` per labeled image:

* ``semantic_png``: the (height, width) semantic label map (0 background, class id c for class
  c, as in PASCAL VOC) as a lossless 8-bit palette PNG; the palette is the VOC colour map, the
  pixel values are the class ids.
* ``instances``: one struct per instance with ``class_id``, ``class_name``, ``score``, a COCO
  run-length encoded mask (``rle.size == [height, width]``, ``rle.counts`` the compressed
  string that ``pycocotools.mask.decode`` reads), ``bbox`` ``[x, y, w, h]`` in pixels and
  ``area`` in pixels, all computed by pycocotools from the mask.

Masks always have the ORIGINAL image size (``height`` x ``width``, EXIF rotation applied) even
when the labels were computed on a downscaled copy (``label_height`` x ``label_width``); they
are brought back with nearest-neighbour sampling (:func:`resize_nearest`).

Errors: one row of :data:`ERROR_SCHEMA` per input row that produced no labels, with a short
machine-readable ``reason`` (:data:`ERROR_REASONS`) and a human ``message``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils

from .decode import DECODE_REASONS, decode_png, encode_png

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RLE_TYPE",
    "INSTANCE_TYPE",
    "LABEL_SCHEMA",
    "ERROR_SCHEMA",
    "LABEL_COLUMNS",
    "ERROR_COLUMNS",
    "INPUT_REASONS",
    "LOAD_REASONS",
    "ERROR_REASONS",
    "TRANSIENT_REASONS",
    "voc_palette",
    "resize_nearest",
    "encode_instances",
    "encode_label_row",
    "error_row",
    "labels_table",
    "errors_table",
    "decode_semantic",
    "decode_rle",
    "decode_instances",
]

FORMAT_NAME = "irnet-ray-pseudo-masks"
FORMAT_VERSION = 1

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
INSTANCE_TYPE = pa.struct([
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("score", pa.float32()),
    ("rle", RLE_TYPE),
    ("bbox", pa.list_(pa.float64())),
    ("area", pa.int64()),
])  # fmt: skip

LABEL_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("label_height", pa.int32(), nullable=False),
    pa.field("label_width", pa.int32(), nullable=False),
    pa.field("classes", pa.list_(pa.int32()), nullable=False),
    pa.field("class_names", pa.list_(pa.string()), nullable=False),
    pa.field("semantic_png", pa.binary(), nullable=False),
    pa.field("instances", pa.list_(INSTANCE_TYPE), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("cam_model_id", pa.string(), nullable=False),
    pa.field("irn_model_id", pa.string(), nullable=False),
    pa.field("config_id", pa.string(), nullable=False),
])  # fmt: skip

ERROR_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    # 0, or k for the (k+1)-th input row of a repeated image id (reason duplicate_id)
    pa.field("occurrence", pa.int32(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("classes", pa.list_(pa.int32()), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])  # fmt: skip

LABEL_COLUMNS = tuple(LABEL_SCHEMA.names)
ERROR_COLUMNS = tuple(ERROR_SCHEMA.names)

#: Reasons found in the input listing itself (stage ``input``).
INPUT_REASONS = ("duplicate_id", "no_classes", "class_out_of_range")
#: Reasons of reading / decoding the image (stage ``decode``), see ``images.error_text``.
LOAD_REASONS = DECODE_REASONS + ("missing", "access_denied", "unreachable", "storage_error", "bad_uri", "error")
#: Every reason of the errors table; ``label_failed`` (stage ``label``): the models or the
#: synthesis raised for this image (the message holds the exception); ``out_of_memory``: the
#: image alone does not fit the actor's device (lower ``--max-side``); ``mining_failed``
#: (relation mining, stage ``crf``): the dense CRF raised for this image; ``crashed_worker``: the
#: image ended its worker process (a native crash, an out-of-memory kill) again and again.
ERROR_REASONS = INPUT_REASONS + LOAD_REASONS + ("label_failed", "out_of_memory", "mining_failed", "crashed_worker")
#: Reasons that may go away by themselves (a store that was down, credentials that were fixed,
#: an actor that ran out of memory): a rerun on the same output tries these images again.
TRANSIENT_REASONS = ("access_denied", "unreachable", "storage_error", "error", "label_failed")


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map ((num_colors, 3) uint8): index 0 black, 1 maroon, 2 green, ..."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):  # the bits of the index, spread over the three channels
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


_PALETTE = voc_palette()


def resize_nearest(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes of ``maps`` to ``size`` = (H, W).

    Output pixel (y, x) takes input pixel ``(floor((y + 0.5) * h / H), floor((x + 0.5) * w / W))``
    (pixel centres, as Pillow's NEAREST), so a map downscaled and brought back lines up.
    """
    maps = np.asarray(maps)
    h, w = maps.shape[-2:]
    height, width = int(size[0]), int(size[1])
    if (h, w) == (height, width):
        return maps
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return maps[..., rows[:, None], cols[None, :]]


def encode_instances(
    masks: np.ndarray, classes: Sequence[int], scores: Sequence[float], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Instance structs (:data:`INSTANCE_TYPE`) of (P, H, W) boolean masks.

    ``class_names[c - 1]`` names class id ``c``. RLE, bbox and area come from pycocotools.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"instance masks must be (P, H, W), got shape {masks.shape}")
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(masks) == len(classes) == len(scores):
        raise ValueError(f"{len(masks)} masks, {len(classes)} classes and {len(scores)} scores differ in number")
    if len(masks) == 0:
        return []
    # pycocotools wants (H, W, P) Fortran-ordered uint8.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)
    out = []
    for rle, area, box, class_id, score in zip(rles, areas, boxes, classes, scores):
        out.append({
            "class_id": int(class_id),
            "class_name": str(class_names[int(class_id) - 1]),
            "score": float(score),
            "rle": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in box],
            "area": int(area),
        })  # fmt: skip
    return out


def encode_label_row(
    *,
    image_id: str,
    uri: str,
    size: tuple[int, int],
    classes: Sequence[int],
    class_names: Sequence[str],
    semantic: np.ndarray,
    instance_masks: np.ndarray,
    instance_classes: Sequence[int],
    instance_scores: Sequence[float],
    run_id: str,
    cam_model_id: str,
    irn_model_id: str,
    config_id: str,
) -> dict[str, Any]:
    """One :data:`LABEL_SCHEMA` row. ``semantic`` (h, w) and ``instance_masks`` (P, h, w) may be
    at the labeling size; they are resized (nearest) to ``size`` = the original (H, W).

    ``class_names`` is the whole vocabulary (``class_names[c - 1]`` names class id ``c``).
    """
    semantic = np.asarray(semantic)
    if semantic.ndim != 2:
        raise ValueError(f"semantic labels must be (H, W), got shape {semantic.shape}")
    masks = np.asarray(instance_masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != semantic.shape:
        raise ValueError(f"instance masks {masks.shape} must be (P, {semantic.shape[0]}, {semantic.shape[1]})")
    label_height, label_width = semantic.shape
    height, width = int(size[0]), int(size[1])
    classes = sorted({int(c) for c in classes})
    return {
        "image_id": str(image_id),
        "uri": str(uri),
        "height": height,
        "width": width,
        "label_height": int(label_height),
        "label_width": int(label_width),
        "classes": classes,
        "class_names": [str(class_names[c - 1]) for c in classes],
        "semantic_png": encode_png(resize_nearest(semantic, (height, width)), _PALETTE),
        "instances": encode_instances(
            resize_nearest(masks, (height, width)), instance_classes, instance_scores, class_names
        ),
        "run_id": str(run_id),
        "cam_model_id": str(cam_model_id),
        "irn_model_id": str(irn_model_id),
        "config_id": str(config_id),
    }


def error_row(
    *, image_id: str, uri: str, classes: Sequence[int], stage: str, reason: str, message: str, run_id: str,
    occurrence: int = 0,
) -> dict[str, Any]:
    """One :data:`ERROR_SCHEMA` row; ``reason`` must be one of :data:`ERROR_REASONS`."""
    if reason not in ERROR_REASONS:
        raise ValueError(f"unknown error reason {reason!r}; known: {', '.join(ERROR_REASONS)}")
    return {
        "image_id": str(image_id), "occurrence": int(occurrence), "uri": str(uri),
        "classes": [int(c) for c in classes], "stage": str(stage), "reason": reason,
        "message": " ".join(str(message).split()), "run_id": str(run_id),
    }  # fmt: skip


def labels_table(rows: Sequence[dict]) -> pa.Table:
    """Rows of :func:`encode_label_row` as a table of :data:`LABEL_SCHEMA`."""
    return pa.Table.from_pylist(list(rows), schema=LABEL_SCHEMA)


def errors_table(rows: Sequence[dict]) -> pa.Table:
    """Rows of :func:`error_row` as a table of :data:`ERROR_SCHEMA`."""
    return pa.Table.from_pylist(list(rows), schema=ERROR_SCHEMA)


# --------------------------------------------------------------------------------------
# reading back (tests, notebooks; readers without this package follow docs/output-format.md)


def decode_semantic(png: bytes) -> np.ndarray:
    """The (height, width) uint8 class-id map of a ``semantic_png`` value."""
    return decode_png(bytes(png))


def decode_rle(rle: dict) -> np.ndarray:
    """The (height, width) bool mask of an instance's ``rle`` struct."""
    coco = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]}
    return mask_utils.decode([coco])[:, :, 0].astype(bool)


def decode_instances(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(masks (P, H, W) bool, class ids (P,), scores (P,))`` of a label row (a dict)."""
    instances = list(row["instances"] or [])
    height, width = int(row["height"]), int(row["width"])
    masks = np.zeros((len(instances), height, width), dtype=bool)
    for index, instance in enumerate(instances):
        masks[index] = decode_rle(instance["rle"])
    classes = np.asarray([int(i["class_id"]) for i in instances], dtype=np.int64)
    scores = np.asarray([float(i["score"]) for i in instances], dtype=np.float32)
    return masks, classes, scores
