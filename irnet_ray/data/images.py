"""Per-image helpers shared by every stage that reads images (no Ray here).

Reading and decoding one image (local, ``s3://`` or ``synthetic://``), downscaling it,
turning a failure into a ``"<reason>: <message>"`` string that becomes a per-image error row,
and the plain-Arrow row layout of decoded images (RGB bytes + height + width, see
:mod:`irnet_ray.data.ray_datasets`). The Ray stages call these; tests and notebooks can too.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .decode import ImageDecodeError, decode_image
from .sources import ImageRecord, load_synthetic
from .storage import (
    StorageAccessDenied,
    StorageError,
    StorageNotFound,
    StorageOptions,
    StorageUnreachable,
    read_bytes,
)

__all__ = [
    "error_text",
    "records_fingerprint",
    "summarize_errors",
    "load_image",
    "downscale",
    "decode_keeping_size",
    "row_image",
    "row_labels",
    "class_ids",
    "object_column",
]


def error_text(exc: BaseException) -> str:
    """``"<reason>: <message>"`` for an exception raised while reading / decoding one image."""
    if isinstance(exc, ImageDecodeError):
        reason = exc.reason
    elif isinstance(exc, StorageNotFound):
        reason = "missing"
    elif isinstance(exc, StorageAccessDenied):
        reason = "access_denied"
    elif isinstance(exc, StorageUnreachable):
        reason = "unreachable"
    elif isinstance(exc, StorageError):
        reason = "storage_error"
    elif isinstance(exc, ValueError):
        reason = "bad_uri"
    else:
        reason = "error"
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{reason}: {message}"


def records_fingerprint(records: Sequence[ImageRecord]) -> str:
    """A short hash of a set's (image id, URI, classes): reruns on another set are told apart."""
    rows = [(r.image_id, r.uri, list(r.classes)) for r in records]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def summarize_errors(errors: Sequence[dict]) -> str:
    """``{reason: count} (e.g. id: message; ...)`` of per-image error entries."""
    reasons = collections.Counter(str(e["error"]).split(":", 1)[0] for e in errors)
    examples = "; ".join(f"{e['image_id']}: {e['error']}" for e in list(errors)[:3])
    return f"{dict(reasons)} (e.g. {examples})"


def load_image(
    uri: str, options: StorageOptions, max_pixels: int = 50_000_000, max_decode_bytes: int | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a storage URI or a ``synthetic://`` image (raises on failure)."""
    if uri.startswith("synthetic://"):
        return np.ascontiguousarray(load_synthetic(uri).image)
    return decode_image(read_bytes(uri, options), max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)


def _scaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(height, width) <= max_side:
        return height, width
    factor = max_side / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def downscale(image: np.ndarray, max_side: int | None, *, nearest: bool = False) -> np.ndarray:
    """Resize so that the long side is at most ``max_side`` (never enlarges; ``None``: as is).

    Images use bilinear filtering with antialiasing (Pillow), label maps ``nearest=True``.
    """
    height, width = image.shape[:2]
    size = _scaled_size(height, width, max_side)
    if size == (height, width):
        return image
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), resample)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


def decode_keeping_size(
    uri: str,
    options: StorageOptions,
    max_side: int | None,
    *,
    max_pixels: int = 50_000_000,
    min_side: int = 1,
    max_decode_bytes: int | None = None,
) -> dict[str, Any]:
    """Decode an image for a job that writes outputs at the original size; never raises.

    Returns ``image`` (bytes of the downscaled (H, W, 3) array, ``b""`` on failure), ``height``
    / ``width`` (after downscaling), ``orig_height`` / ``orig_width`` (as decoded, EXIF rotation
    applied) and ``error`` (``""`` or :func:`error_text`; a side below ``min_side`` is
    ``too_small``, an image whose decoding would need more than ``max_decode_bytes`` ``too_large``).
    """
    fields: dict[str, Any] = {"image": b"", "height": 0, "width": 0, "orig_height": 0, "orig_width": 0, "error": ""}
    try:
        original = load_image(uri, options, max_pixels, max_decode_bytes)
        if min(original.shape[:2]) < int(min_side):
            height, width = original.shape[:2]
            raise ImageDecodeError("too_small", f"image of {width}x{height} pixels is smaller than min_side={min_side}")
        image = downscale(original, max_side)
    except Exception as exc:  # noqa: BLE001 - recorded per image
        fields["error"] = error_text(exc)
        return fields
    fields.update(image=image.tobytes(), height=image.shape[0], width=image.shape[1],
                  orig_height=original.shape[0], orig_width=original.shape[1])  # fmt: skip
    return fields


def row_image(row: dict) -> np.ndarray:
    """The (H, W, 3) uint8 image of a decoded row (a writable copy of the row's bytes)."""
    return np.frombuffer(row["image"], dtype=np.uint8).reshape(int(row["height"]), int(row["width"]), 3).copy()


def row_labels(row: dict) -> np.ndarray:
    """The (H, W) uint8 IR label map of a decoded IR label row (a writable copy)."""
    return np.frombuffer(row["labels"], dtype=np.uint8).reshape(int(row["height"]), int(row["width"])).copy()


def class_ids(value: Any) -> list[int]:
    """A batch cell of class ids (list, array or None) as a list of ints."""
    if value is None:
        return []
    return [int(c) for c in np.asarray(value).reshape(-1)]


def object_column(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (bytes, lists, ...), never a 2-D array of their items."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column
