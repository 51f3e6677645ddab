import io
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from irnet_ray.config import DEFAULT_MAX_DECODE_BYTES
from irnet_ray.data.decode import (
    DECODE_REASONS,
    ImageDecodeError,
    decode_image,
    decode_memory_bytes,
    decode_png,
    encode_png,
    image_size,
)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason in DECODE_REASONS
    assert str(info.value)  # a human message
    return info.value.reason


def test_rgb_png_is_exact_and_jpeg_close():
    pixels = _noise(17, 23)
    out = decode_image(_save(Image.fromarray(pixels), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pixels)
    smooth = np.full((32, 48, 3), (200, 40, 90), np.uint8)
    out = decode_image(_save(Image.fromarray(smooth), "JPEG", quality=95))
    assert out.shape == (32, 48, 3) and np.abs(out.astype(int) - smooth).max() <= 4


def test_empty_and_not_an_image():
    assert _reason(b"") == "empty"
    assert _reason(b"hello, this is a text file\n" * 10) == "not_an_image"
    assert _reason(b"\x89PNG\r\n\x1a\n") == "not_an_image"  # signature only


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_jpeg_is_detected_not_padded(fraction):
    data = _save(Image.fromarray(_noise(128, 128)), "JPEG", quality=90)
    assert decode_image(data).shape == (128, 128, 3)
    assert _reason(data[: int(len(data) * fraction)]) == "truncated"
    assert _reason(data[:-2]) == "truncated"  # only the end-of-image marker is missing


def test_truncated_png():
    data = _save(Image.fromarray(_noise(64, 64)), "PNG")
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_refuses_to_run_when_truncated_images_are_tolerated(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(_save(Image.fromarray(_noise(8, 8)), "PNG"))


def test_grayscale_and_palette():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode_image(_save(Image.fromarray(gray), "PNG"))
    assert out.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    pal = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), mode="L").convert("L")
    pal = pal.copy()
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    out = decode_image(_save(pal, "PNG"))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 255])


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    data = _save(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == (16, 16, 3)
    assert out[..., 0].max() < 20 and out[..., 1].min() > 235 and out[..., 2].min() > 235


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (200, 0, 0, 0)  # fully transparent: the stored colour must not show
    rgba[1, 0] = (0, 0, 0, 128)  # half transparent black over white -> mid gray
    rgba[1, 1] = (0, 255, 0, 255)
    out = decode_image(_save(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert np.all(np.abs(out[1, 0].astype(int) - 127) <= 1)
    np.testing.assert_array_equal(out[1, 1], [0, 255, 0])
    la = Image.fromarray(rgba[..., [0, 3]].copy(), mode="LA")
    assert decode_image(_save(la, "PNG"))[0, 1].tolist() == [255, 255, 255]


def test_16bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = decode_image(_save(image, "PNG"))
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)  # wide image, left half red, right half blue
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    data = _save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    assert image_size(data) == (20, 40)  # header size, before rotation
    out = decode_image(data)
    assert out.shape == (40, 20, 3)
    # rotated 90 degrees clockwise: the stored left (red) half becomes the top half
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50


def test_one_pixel_and_min_side():
    data = _save(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")
    np.testing.assert_array_equal(decode_image(data), [[[1, 2, 3]]])
    assert _reason(data, min_side=2) == "too_small"


def test_large_image_and_max_pixels():
    data = _save(Image.new("RGB", (4000, 4000), (12, 34, 56)), "JPEG", quality=80)
    out = decode_image(data)
    assert out.shape == (4000, 4000, 3)
    assert abs(int(out[2000, 2000, 2]) - 56) <= 3
    assert _reason(data, max_pixels=1_000_000) == "too_large"


def test_decode_memory_bound_refuses_before_decoding():
    data = _save(Image.new("RGBA", (1000, 1000), (1, 2, 3, 4)), "PNG")
    needed = decode_memory_bytes("RGBA", 1000, 1000)
    assert needed > 1000 * 1000 * 4  # at least the stored pixels
    assert _reason(data, max_decode_bytes=needed - 1) == "too_large"
    with pytest.raises(ImageDecodeError, match="MiB, more than max_decode_bytes"):
        decode_image(data, max_decode_bytes=needed - 1)
    assert decode_image(data, max_decode_bytes=needed).shape == (1000, 1000, 3)


_PEAK_SCRIPT = """
import resource, sys
data = open(sys.argv[1], "rb").read()
from irnet_ray.data.decode import decode_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = decode_image(data, max_decode_bytes=int(sys.argv[2]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, out.shape[0], out.shape[1], int(out.max()))
"""


def test_huge_16bit_scan_decodes_within_its_memory_bound(tmp_path):
    # A 7000 x 7000 16-bit PNG of about 100 KB: decoding it once took ~1 GiB (64-bit temporaries).
    values = np.zeros((7000, 7000), np.uint16)
    values[::7, ::5] = 40000
    path = tmp_path / "scan.png"
    Image.fromarray(values).save(path)
    del values
    assert path.stat().st_size < 1 << 20
    bound = decode_memory_bytes("I;16", 7000, 7000)
    assert bound <= DEFAULT_MAX_DECODE_BYTES  # accepted by default, and reserved by each decode task
    # A fresh process: its peak resident memory measures this decoding alone.
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), str(bound)], capture_output=True,
                            text=True, timeout=120, check=True)  # fmt: skip
    growth, height, width, top = (int(v) for v in result.stdout.split())
    assert (height, width, top) == (7000, 7000, round(40000 * 255 / 65535))
    assert growth <= bound, f"decoding took {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_decompression_bomb_is_too_large_without_decoding():
    # A header claiming 100000 x 100000 pixels with (almost) no data behind it.
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + _png_chunk(b"IEND", b"")
    )
    assert _reason(data) == "too_large"
    assert _reason(data, max_pixels=10**12) == "too_large"  # Pillow's own guard


def test_error_pickles_with_reason():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"")
    err = pickle.loads(pickle.dumps(info.value))
    assert isinstance(err, ImageDecodeError) and isinstance(err, ValueError)
    assert err.reason == "empty" and str(err) == str(info.value)


def test_label_png_round_trip():
    labels = np.random.default_rng(0).integers(0, 256, (31, 45)).astype(np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(labels)), labels)
    palette = np.random.default_rng(1).integers(0, 256, (256, 3)).astype(np.uint8)
    data = encode_png(labels, palette=palette)
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(decode_png(data), labels)
    small = np.array([[0, 3], [255, 1]], np.int64)
    assert decode_png(encode_png(small)).dtype == np.uint8
    np.testing.assert_array_equal(decode_png(encode_png(small)), small)
    with pytest.raises(ValueError, match="0..255"):
        encode_png(np.array([[0, 256]]))
    with pytest.raises(ValueError, match="2-D"):
        encode_png(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ImageDecodeError) as info:
        decode_png(_save(Image.fromarray(_noise(4, 4)), "PNG"))
    assert info.value.reason == "unsupported_mode"
