"""The bad-input corpus of issue 4 ("What must be shown", item 3): real files of every kind of
input that breaks naive pipelines, a JSON Lines manifest listing them, and the outcome each
must have. A helper module (not a test file): ``tests/test_bad_inputs.py`` runs the corpus
through decoding and per-image inference, and the labeling job's tests run it through the
whole Ray job.

Stable interface (pytest puts ``tests/`` on ``sys.path``: ``from bad_inputs import ...``)::

    manifest_path, vocabulary_names, expectations = build_bad_input_corpus(folder)

* ``manifest_path`` (``pathlib.Path``): ``folder/manifest.jsonl``, one JSON object per line with
  ``image_id``, ``image`` (a path relative to ``folder``) and ``classes`` (a list of names), the
  format :func:`irnet_ray.data.sources.read_manifest` reads. It lists **two rows with the same
  id** (``duplicate``), so ``read_manifest`` as it is today refuses the whole file (see below);
  :func:`corpus_records` reads it row by row instead.
* ``vocabulary_names``: the class names (``ClassVocabulary(vocabulary_names)``; ids 1..3).
* ``expectations``: ``{image_id: ("labeled", (height, width)) | ("error", reason)}``, where
  ``(height, width)`` is the size of the decoded **original** image (EXIF rotation applied,
  before any downscaling for inference) and ``reason`` is the code the per-image error must
  carry: one of :data:`irnet_ray.data.decode.DECODE_REASONS`, ``missing`` (as
  :func:`irnet_ray.data.images.error_text` names a missing file), or one of the
  job-level codes :data:`JOB_REASONS` that only the labeling job can give.

What the labeling job must do with each kind (``KINDS`` below, keyed by image id)
-----------------------------------------------------------------------------------
Decodes and is labeled at its (downscaled) size, one output row each:
``normal``, ``grayscale`` (RGB copies of the gray), ``cmyk`` (Pillow's CMYK -> RGB),
``rgba`` (composited over white), ``png16`` (16-bit gray scaled to 8 bit), ``exif_rotated``
(orientation 6: stored 32 x 56, comes out 56 x 32), ``huge`` (4000 x 4000: decodes under the
default ``max_pixels``; the job must downscale it to its ``max_side`` before inference).

Recorded in ``errors`` with the reason, the job carries on:

* ``truncated_jpeg`` -> ``truncated``; ``truncated_png`` -> ``truncated``; ``zero_bytes`` ->
  ``empty``; ``not_an_image`` -> ``not_an_image``; ``bomb`` (a PNG header claiming
  100000 x 100000 pixels) -> ``too_large``; ``missing`` (listed, no file) -> ``missing``.
  ``decode_batch`` already turns all of these into per-image ``error`` rows.
* ``one_pixel`` (1 x 1) -> ``too_small``. **Gap:** ``decode_batch`` / ``load_image`` take no
  ``min_side``, so it decodes, and :func:`irnet_ray.inference.label_image` does not fail on it
  either: it returns a 1 x 1 "label" that looks complete. The job must decode with
  ``decode_image(..., min_side=...)`` (default :data:`MIN_LABEL_SIDE` = 16, one cell of the
  stride-16 backbone; every labeled entry here is at least 32 px on each side, so any
  ``min_side`` in 2..32 gives the same outcomes).
* ``no_classes`` (a valid image with an empty class list) -> ``no_classes``. **Gap:** it
  decodes and ``label_image`` returns an all-background mask with no instances and no error,
  which would look like a labeled image; the job must check the class list itself.
* ``duplicate`` (two rows, two different valid files, one id) -> ``duplicate_id`` for **both**
  rows: the output is keyed by image id, and neither row can be told to be the right one
  (first-wins would depend on row order). **Gap:** ``read_manifest`` raises ``ManifestError``
  for the whole manifest on a duplicate id (as ``read_voc`` does for a list file listing an id
  twice), so today the whole job would fail before labeling anything; the sources layer needs
  a lenient mode that returns such rows as per-image errors, or the job must pre-scan.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "VOCABULARY",
    "MIN_LABEL_SIDE",
    "JOB_REASONS",
    "KINDS",
    "MANIFEST_NAME",
    "build_bad_input_corpus",
    "corpus_records",
]

VOCABULARY = ("bird", "cat", "dog")
#: Smallest image side the labeling job should accept (``decode_image(min_side=...)``).
MIN_LABEL_SIDE = 16
#: Error reasons only the labeling job can give (the decode layer lets these images through).
JOB_REASONS = ("no_classes", "too_small", "duplicate_id")
MANIFEST_NAME = "manifest.jsonl"

#: image id -> what the entry is (one line, for messages and reports).
KINDS = {
    "normal": "an ordinary RGB JPEG",
    "truncated_jpeg": "a JPEG cut at 60% of its bytes",
    "truncated_png": "a PNG cut at half its bytes",
    "zero_bytes": "an empty file named .jpg",
    "not_an_image": "text bytes named .jpg",
    "grayscale": "an 8-bit grayscale (L) PNG",
    "cmyk": "a CMYK JPEG",
    "rgba": "an RGBA PNG with transparent pixels",
    "png16": "a 16-bit grayscale PNG",
    "exif_rotated": "a JPEG stored 32x56 with EXIF orientation 6 (turn 90 degrees clockwise)",
    "one_pixel": "a 1x1 PNG",
    "huge": "a 4000x4000 flat-colour PNG",
    "bomb": "a PNG header claiming 100000x100000 pixels",
    "no_classes": "a valid PNG with an empty class list",
    "duplicate": "two rows with this id, two different valid PNGs",
    "missing": "a listed file that does not exist",
}


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour image (JPEG-friendly, deterministic)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    waves = 40.0 * np.sin(ys[..., None] / 7.0 + xs[..., None] / 11.0 + rng.uniform(0, 6, 3))
    return np.clip(base + waves, 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _bomb_png(side: int = 100_000) -> bytes:
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b"")
    )  # fmt: skip


def _entries() -> list[tuple[str, str, bytes | None, list[str], tuple]]:
    """(image id, file name, file bytes or None for a missing file, class names, expectation)."""
    jpeg = _encode(Image.fromarray(_smooth(64, 64, 1)), "JPEG", quality=90)
    png = _encode(Image.fromarray(_smooth(48, 48, 2)), "PNG")
    gray = (np.add.outer(np.arange(40), np.arange(56)) * 2 % 256).astype(np.uint8)
    rgba = np.dstack([_smooth(36, 52, 3), np.full((36, 52), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # transparent left part: must come out white
    png16 = (np.add.outer(np.arange(44), np.arange(60)) * 600).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = np.zeros((32, 56, 3), np.uint8)  # stored wide: left half red, right half blue
    rotated[:, :28] = (220, 30, 30)
    rotated[:, 28:] = (30, 30, 220)
    return [
        ("normal", "normal.jpg", _encode(Image.fromarray(_smooth(48, 64, 0)), "JPEG", quality=90),
         ["cat"], ("labeled", (48, 64))),
        ("truncated_jpeg", "truncated.jpg", jpeg[: int(len(jpeg) * 0.6)], ["dog"], ("error", "truncated")),
        ("truncated_png", "truncated.png", png[: len(png) // 2], ["dog"], ("error", "truncated")),
        ("zero_bytes", "zero_bytes.jpg", b"", ["cat"], ("error", "empty")),
        ("not_an_image", "not_an_image.jpg", b"name,classes\nthis is a CSV file, not a JPEG\n" * 8, ["cat"],
         ("error", "not_an_image")),
        ("grayscale", "grayscale.png", _encode(Image.fromarray(gray, mode="L"), "PNG"), ["bird"],
         ("labeled", (40, 56))),
        ("cmyk", "cmyk.jpg", _encode(Image.new("CMYK", (40, 48), (200, 30, 0, 10)), "JPEG", quality=95),
         ["bird", "dog"], ("labeled", (48, 40))),
        ("rgba", "rgba.png", _encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), ["cat"], ("labeled", (36, 52))),
        ("png16", "png16.png", _encode(Image.fromarray(png16), "PNG"), ["dog"], ("labeled", (44, 60))),
        ("exif_rotated", "exif_rotated.jpg", _encode(Image.fromarray(rotated), "JPEG", quality=95, exif=exif.tobytes()),
         ["cat"], ("labeled", (56, 32))),
        ("one_pixel", "one_pixel.png", _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), ["bird"],
         ("error", "too_small")),
        ("huge", "huge.png", _encode(Image.new("RGB", (4000, 4000), (70, 130, 180)), "PNG", compress_level=1),
         ["dog"], ("labeled", (4000, 4000))),
        ("bomb", "bomb.png", _bomb_png(), ["cat"], ("error", "too_large")),
        ("no_classes", "no_classes.png", _encode(Image.fromarray(_smooth(40, 40, 4)), "PNG"), [],
         ("error", "no_classes")),
        ("duplicate", "duplicate_a.png", _encode(Image.fromarray(_smooth(32, 48, 5)), "PNG"), ["bird"],
         ("error", "duplicate_id")),
        ("duplicate", "duplicate_b.png", _encode(Image.fromarray(_smooth(48, 32, 6)), "PNG"), ["cat"],
         ("error", "duplicate_id")),
        ("missing", "missing.jpg", None, ["dog"], ("error", "missing")),
    ]  # fmt: skip


def build_bad_input_corpus(folder: Path) -> tuple[Path, tuple[str, ...], dict[str, tuple[str, object]]]:
    """Write the corpus into ``folder`` (created if needed); returns ``(manifest_path,
    vocabulary_names, expectations)`` as the module docstring describes. Deterministic; about
    0.5 s (the 4000 x 4000 PNG dominates) and 0.25 MB on disk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines, expectations = [], {}
    for image_id, name, data, classes, expected in _entries():
        if data is not None:
            (folder / name).write_bytes(data)
        lines.append(json.dumps({"image_id": image_id, "image": name, "classes": classes}))
        if expectations.setdefault(image_id, expected) != expected:
            raise AssertionError(f"corpus rows for {image_id!r} disagree on the outcome")
    assert set(expectations) == set(KINDS), "every kind is described in KINDS"
    manifest = folder / MANIFEST_NAME
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, VOCABULARY, expectations


def corpus_records(manifest_path: Path, vocabulary_names=VOCABULARY):
    """Every manifest row as an :class:`~irnet_ray.data.sources.ImageRecord`, duplicates
    included (what a lenient manifest reader would hand the job; ``read_manifest`` refuses the
    file because of the duplicate id)."""
    from irnet_ray.data.sources import ClassVocabulary, ImageRecord

    vocabulary = ClassVocabulary(tuple(vocabulary_names))
    folder = Path(manifest_path).parent
    records = []
    for row_number, line in enumerate(Path(manifest_path).read_text().splitlines(), start=1):
        row = json.loads(line)
        records.append(ImageRecord(row["image_id"], str(folder / row["image"]), vocabulary.ids_of(row["classes"]),
                                   source_row=row_number))  # fmt: skip
    return records
