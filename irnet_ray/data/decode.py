"""Robust image decoding (any common file -> (H, W, 3) uint8 RGB) and lossless label-map PNGs.

:func:`decode_image` never returns a silently damaged image: truncated files, non-images,
decompression bombs and images too small to use raise :class:`ImageDecodeError`, whose
``reason`` is a short machine-readable code recorded per image by the labeling job.

Conversions to RGB (documented choices):

* EXIF orientation is applied (a phone photo stored sideways comes out upright).
* Grayscale (``1``, ``L``), palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's
  conversion to RGB. Palettes with a transparent entry are handled like alpha (below).
* Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``): **composited over white** (what a viewer
  shows for a transparent PNG; the colour stored under fully transparent pixels is often
  arbitrary, so simply dropping alpha can reveal garbage).
* 16-bit grayscale (``I;16*``, and ``I`` holding values in 0..65535): scaled to 8 bit with
  ``round(v * 255 / 65535)`` (full range preserved, no clipping). 16-bit RGB PNGs are reduced
  to 8 bit by Pillow itself. ``F`` (float) images in [0, 1] are scaled by 255.
* Animated / multi-frame files: the first frame.

Pillow's process-wide settings are not modified: truncation detection relies on
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being ``False`` (Pillow's default; if some other code
sets it, truncated JPEGs can no longer be told apart, so :func:`decode_image` refuses to run).
The pixel limit is ``max_pixels`` (checked from the header, before any pixel is decoded);
Pillow's own bomb guard (``2 * PIL.Image.MAX_IMAGE_PIXELS``) also reports ``too_large``.

Memory: :func:`decode_memory_bytes` bounds what decoding one image takes at its peak, from the
header alone (stored pixels, an EXIF-rotated copy, the RGB conversion), and ``max_decode_bytes``
refuses (``too_large``) an image whose bound exceeds it before any pixel is decoded, so a
decode task can reserve that much memory and never exceed it. A 7000 x 7000 16-bit PNG of
100 KB, for instance, needs about 340 MiB; 16-bit and float images are converted in row
chunks rather than through whole-image 64-bit temporaries.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageDecodeError",
    "DECODE_REASONS",
    "decode_image",
    "image_size",
    "decode_memory_bytes",
    "encode_png",
    "decode_png",
]

DECODE_REASONS = ("empty", "not_an_image", "truncated", "too_large", "too_small", "unsupported_mode")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DIRECT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
#: Bytes per pixel of Pillow's in-memory image by mode (multi-band images are stored 4 bytes a pixel).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
#: Bytes per pixel that converting a mode to the (H, W, 3) uint8 result holds at its peak, on top
#: of the stored image (module doc): alpha = RGBA copy + white + composite + RGB + array.
_CONVERSION_BYTES = {"RGB": 3, "alpha": 19, "wide": 3 + 4, "other": 4 + 3}
#: Rows converted at a time for 16-bit and float images (bounds their temporaries).
_CHUNK_ROWS = 256
_TRUNCATION_HINTS = ("truncated", "broken data stream", "premature end", "unexpected end", "eof")


class ImageDecodeError(ValueError):
    """An image could not be decoded; ``reason`` is one of :data:`DECODE_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across Ray processes
        return (type(self), (self.reason, self.message))


def _open(data: bytes) -> Image.Image:
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty", "empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images "
            "cannot be detected; set it back to False"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", f"image too large: {exc}") from None
    except UnidentifiedImageError:
        head = bytes(data[:8])
        raise ImageDecodeError(
            "not_an_image", f"not an image in a known format ({len(data)} bytes starting with {head!r})"
        ) from None
    except Exception as exc:  # header parsers raise SyntaxError, OSError, struct.error, ...
        reason = "truncated" if any(h in str(exc).lower() for h in _TRUNCATION_HINTS) else "not_an_image"
        raise ImageDecodeError(reason, f"cannot read image header: {exc}") from None


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG stream has an end-of-image marker after its main image's first scan.

    Walks the marker segments that precede the first top-level start-of-scan (so an EXIF
    thumbnail, which sits inside an APP1 segment, is skipped), then looks for ``FF D9``: it
    cannot occur inside entropy-coded data (``FF`` bytes are stuffed there), so its absence
    means the file ends before the image does. Data after the marker (e.g. a motion photo's
    video) is allowed. Pillow alone misses a truncation that only loses the last few bytes.
    """
    view = memoryview(data)
    n, pos = len(data), 2
    while pos + 4 <= n:
        if view[pos] != 0xFF:
            return True  # not a marker where one belongs: let the decoder judge the stream
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos + 2) != -1
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        pos += 2 + ((view[pos + 2] << 8) | view[pos + 3])
    return False


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header only (no pixel decoding; EXIF rotation not applied)."""
    with _open(data) as im:
        return int(im.size[1]), int(im.size[0])


def decode_memory_bytes(mode: str, width: int, height: int) -> int:
    """An upper bound of the bytes :func:`decode_image` holds at its peak for an image of this
    header (mode and size): the decoded image, an EXIF-rotated copy and the RGB conversion."""
    stored = _STORED_BYTES.get(mode, 4)
    if mode == "RGB":
        conversion = _CONVERSION_BYTES["RGB"]
    elif mode in _ALPHA_MODES or mode == "P":  # a palette with transparency becomes RGBA
        conversion = _CONVERSION_BYTES["alpha"]
    elif mode.startswith("I;16") or mode in ("I", "F"):
        conversion = _CONVERSION_BYTES["wide"]
    else:
        conversion = _CONVERSION_BYTES["other"]
    return int(width) * int(height) * (2 * stored + conversion)


def _wide_to_rgb(im: Image.Image, to_gray) -> np.ndarray:
    """16-bit / 32-bit integer or float image -> RGB, converted in row chunks."""
    values = np.asarray(im)
    out = np.empty(values.shape + (3,), dtype=np.uint8)
    for start in range(0, values.shape[0], _CHUNK_ROWS):
        out[start : start + _CHUNK_ROWS] = to_gray(values[start : start + _CHUNK_ROWS])[..., None]
    return out


def _gray_from_integers(values: np.ndarray) -> np.ndarray:
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageDecodeError(
            "unsupported_mode", f"32-bit integer image with values {values.min()}..{values.max()} (expected 0..65535)"
        )
    # round(v * 255 / 65535) in integers; fits uint32 (65535 * 255 + 32767 < 2**32).
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _gray_from_floats(values: np.ndarray) -> np.ndarray:
    if values.size and (not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0):
        raise ImageDecodeError("unsupported_mode", "floating-point image with values outside [0, 1]")
    return np.round(values.astype(np.float32) * 255.0).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        return _wide_to_rgb(im, _gray_from_integers)
    if mode == "F":
        return _wide_to_rgb(im, _gray_from_floats)
    if mode in _DIRECT_MODES:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageDecodeError("unsupported_mode", f"cannot convert image mode {mode!r} to RGB: {exc}") from None


def decode_image(
    data: bytes, *, max_pixels: int = 50_000_000, min_side: int = 1, max_decode_bytes: int | None = None
) -> np.ndarray:
    """Decode image file bytes to a C-contiguous (H, W, 3) uint8 RGB array (see module doc).

    ``max_pixels`` bounds ``width * height`` and ``max_decode_bytes`` (``None``: no bound) the
    peak memory of decoding (:func:`decode_memory_bytes`), both checked from the header before
    decoding: decompression bombs cost nothing; ``min_side`` is the smallest accepted height /
    width (after EXIF rotation).
    Raises :class:`ImageDecodeError` with ``reason`` in :data:`DECODE_REASONS`.
    """
    im = _open(data)
    try:
        width, height = im.size
        if width * height > int(max_pixels):
            raise ImageDecodeError(
                "too_large", f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
            )
        needed = decode_memory_bytes(im.mode, width, height)
        if max_decode_bytes is not None and needed > int(max_decode_bytes):
            raise ImageDecodeError(
                "too_large",
                f"decoding the {width}x{height} {im.mode} image needs about {needed / 2**20:.0f} MiB, more than "
                f"max_decode_bytes={int(max_decode_bytes) / 2**20:.0f} MiB",
            )
        if min(width, height) < int(min_side):
            raise ImageDecodeError(
                "too_small", f"image of {width}x{height} pixels is smaller than min_side={min_side}"
            )
        try:
            im.load()
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError("too_large", f"image too large: {exc}") from None
        except Exception as exc:  # OSError, SyntaxError, EOFError, ValueError, struct.error, ...
            text = str(exc) or type(exc).__name__
            reason = (
                "truncated"
                if isinstance(exc, EOFError) or any(h in text.lower() for h in _TRUNCATION_HINTS)
                else "not_an_image"
            )
            label = "truncated" if reason == "truncated" else "corrupt"
            raise ImageDecodeError(reason, f"{label} {im.format or 'image'} data: {text}") from None
        if im.format in ("JPEG", "MPO") and not _jpeg_is_complete(data):
            raise ImageDecodeError("truncated", "truncated JPEG data: the end-of-image marker is missing")
        try:
            rotated = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF: keep the stored orientation rather than fail
            rotated = im
        rgb = _to_rgb(rotated if rotated is not None else im)
    finally:
        im.close()
    return np.ascontiguousarray(rgb)


# --------------------------------------------------------------------------------------
# label maps


def encode_png(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """Lossless PNG of an (H, W) label map with values in 0..255 (any integer dtype).

    Stored as 8-bit grayscale (``L``); with ``palette`` ((N, 3) uint8 RGB, N <= 256) as a
    palette image (``P``), viewable in colour, e.g. in the PASCAL VOC style. Either way
    :func:`decode_png` returns exactly ``array``.
    """
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"label map must not be empty, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label map must have an integer dtype, got {arr.dtype}")
    if arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"label map values must be in 0..255, got {lo}..{hi}")
        arr = arr.astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(arr), mode="L")
    if palette is not None:
        pal = np.asarray(palette, dtype=np.uint8)
        if pal.ndim != 2 or pal.shape[1] != 3 or not 1 <= pal.shape[0] <= 256:
            raise ValueError(f"palette must be (N, 3) with 1 <= N <= 256, got shape {pal.shape}")
        image = image.copy()
        image.putpalette(pal.reshape(-1).tolist())  # turns mode L into P with the same indices
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """(H, W) uint8 label map from a PNG written by :func:`encode_png` (or any ``L`` / ``P`` PNG:
    palette images give their indices, not colours)."""
    im = _open(data)
    try:
        if im.format != "PNG":
            raise ImageDecodeError("not_an_image", f"expected a PNG label map, got {im.format}")
        try:
            im.load()
        except Exception as exc:
            raise ImageDecodeError("truncated", f"truncated or corrupt PNG label map: {exc}") from None
        if im.mode in ("L", "P"):
            return np.array(im, dtype=np.uint8)
        if im.mode == "1":
            return np.array(im, dtype=np.uint8)
        if im.mode.startswith("I"):
            values = np.asarray(im).astype(np.int64)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise ImageDecodeError(
                    "unsupported_mode", f"label map values {values.min()}..{values.max()} do not fit in 0..255"
                )
            return values.astype(np.uint8)
        raise ImageDecodeError(
            "unsupported_mode", f"label map PNG must be single-channel (L or P), got mode {im.mode}"
        )
    finally:
        im.close()
