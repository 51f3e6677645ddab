"""Panels like the paper's Fig. 6: image | CAM | displacement field | boundary map | instances |
semantic labels, one row per image (no Ray here).

The rendering functions take plain arrays (numpy, or torch tensors as the models return them)
and return (H, W, 3) uint8 RGB images:

* :func:`cam_heatmap` - the max over the image's class CAMs as a jet-like colour map, blended
  over the image;
* :func:`displacement_colour` - the 2-channel displacement field in the optical-flow style:
  hue = direction, saturation = magnitude (divided by a robust maximum), so zero is white;
* :func:`boundary_image` - the class-boundary probability, dark on white;
* :func:`instance_colour` / :func:`semantic_colour` - label colours of
  :func:`irnet_ray.data.synthetic.colorize_labels` (background black);
* :func:`figure6_row` - the six panels side by side, stride-4 maps upsampled to the image.

:func:`visualize_images` loads the models and images, runs :func:`irnet_ray.inference.label_image`
(the labeling job's own per-image code) and writes one PNG per image plus ``figure6.png`` with
all rows, to a local folder or ``s3://``.
"""

from __future__ import annotations

import io
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from irnet_ray.config import (
    VISUALIZE_DEFAULT_LIMIT,
    VISUALIZE_DEFAULT_MAX_SIDE,
    VISUALIZE_FIGURE_NAME,
    CamInferenceConfig,
    SynthesisConfig,
)
from irnet_ray.data.storage import StorageOptions, join, write_bytes
from irnet_ray.data.synthetic import colorize_labels
from irnet_ray.inference import ImageInference
from irnet_ray.synthesis import SynthesizedLabels, upsample_to_image

__all__ = [
    "PANEL_TITLES",
    "PANEL_GAP",
    "TITLE_HEIGHT",
    "FIGURE_NAME",
    "DEFAULT_LIMIT",
    "DEFAULT_MAX_SIDE",
    "VisualizeError",
    "jet",
    "cam_heatmap",
    "displacement_colour",
    "boundary_image",
    "instance_colour",
    "semantic_colour",
    "to_image_size",
    "figure6_row",
    "stack_rows",
    "png_bytes",
    "visualize_images",
]

PANEL_TITLES = ("image", "CAM", "displacement", "boundary", "instances", "semantic")
PANEL_GAP = 4  # white pixels between panels and between rows
TITLE_HEIGHT = 14  # white band above each row for the panel titles
FIGURE_NAME = VISUALIZE_FIGURE_NAME
DEFAULT_LIMIT = VISUALIZE_DEFAULT_LIMIT
DEFAULT_MAX_SIDE = VISUALIZE_DEFAULT_MAX_SIDE
_WHITE = 255


class VisualizeError(ValueError):
    """The chosen images cannot be shown (unknown ids, unreadable images, empty set)."""


def _array(value, name: str, dims: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {array.shape}")
    return array


# --------------------------------------------------------------------------------------
# colour maps


def jet(values: np.ndarray) -> np.ndarray:
    """Jet-like colour map of values in [0, 1] (clipped): 0 dark blue, 0.5 green, 1 dark red."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue peaks at 4x = 3, 2, 1
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def cam_heatmap(image: np.ndarray, cams, alpha: float = 0.5) -> np.ndarray:
    """The max over ``cams`` (K, H, W) at the image's size, or (K, ceil(H/4), ceil(W/4)) at
    stride 4 (bilinear upsampling), as :func:`jet` colours blended over ``image`` (H, W, 3) uint8.

    CAMs are expected in [0, 1] (each class divided by its own max, as
    :func:`irnet_ray.models.cam.multiscale_cams` returns them). No classes (K = 0) is a zero map.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    maps = torch.as_tensor(_array(cams, "cams", 3))
    if tuple(maps.shape[1:]) != (height, width):
        if tuple(maps.shape[1:]) != _strided(height, width):
            raise ValueError(
                f"cams {tuple(maps.shape)} match neither the image {height}x{width} nor its stride-4 grid"
            )
        maps = upsample_to_image(maps, (height, width))
    strongest = maps.amax(dim=0).numpy() if maps.shape[0] else np.zeros((height, width), np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * jet(strongest).astype(np.float32)
    return np.round(blended).clip(0, 255).astype(np.uint8)


def displacement_colour(displacement, max_magnitude: float | None = None, percentile: float = 99.0) -> np.ndarray:
    """Optical-flow colours of a (2, h, w) displacement field with (dy, dx) channels.

    Hue is the direction ``atan2(dy, dx)`` around the colour wheel (opposite directions are half
    a turn apart), saturation the magnitude divided by ``max_magnitude`` (default: the
    ``percentile`` of the magnitudes, so a few outliers do not wash the field out), clipped to 1;
    value is 1. Zero displacement is white.
    """
    field = _array(displacement, "displacement", 3)
    if field.shape[0] != 2:
        raise ValueError(f"displacement must be (2, h, w) with (dy, dx) channels, got {field.shape}")
    if not np.isfinite(field).all():
        raise ValueError("displacement must be finite")
    dy, dx = field
    magnitude = np.hypot(dy, dx)
    scale = float(max_magnitude) if max_magnitude is not None else float(np.percentile(magnitude, percentile))
    saturation = np.clip(magnitude / scale, 0.0, 1.0) if scale > 1e-6 else np.zeros_like(magnitude)
    hue = (np.arctan2(dy, dx) / (2.0 * np.pi)) % 1.0
    hsv = np.stack([
        np.round(hue * 255.0) % 256, np.round(saturation * 255.0), np.full_like(hue, 255.0),
    ], axis=-1).astype(np.uint8)  # fmt: skip
    return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"), dtype=np.uint8)


def boundary_image(boundary) -> np.ndarray:
    """Class-boundary probability (h, w) in [0, 1] as gray: 0 white, 1 black."""
    values = np.clip(_array(boundary, "boundary", 2), 0.0, 1.0)
    gray = np.round((1.0 - values) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def instance_colour(masks) -> np.ndarray:
    """(P, H, W) boolean instance masks -> one colour per instance, background black."""
    masks = np.asarray(masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else masks)
    if masks.ndim != 3:
        raise ValueError(f"instance masks must be (P, H, W), got shape {masks.shape}")
    labels = np.zeros(masks.shape[1:], dtype=np.int64)
    for index, mask in enumerate(masks.astype(bool), start=1):
        labels[mask] = index  # synthesized instances do not overlap; a later one would win
    return colorize_labels(labels)


def semantic_colour(labels) -> np.ndarray:
    """(H, W) class ids (0 background) -> the label palette of the built-in set."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"semantic labels must be (H, W), got shape {labels.shape}")
    return colorize_labels(labels)


# --------------------------------------------------------------------------------------
# panels


def _strided(height: int, width: int) -> tuple[int, int]:
    return -(-height // 4), -(-width // 4)


def to_image_size(rgb: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """An (h, w, 3) rendering of a stride-4 map -> the image's (H, W, 3): each cell becomes its
    4 x 4 pixels (cropped at the bottom / right). A rendering already at (H, W) is returned."""
    height, width = image_size
    if rgb.shape[:2] == (height, width):
        return rgb
    if rgb.shape[:2] != _strided(height, width):
        raise ValueError(f"map {rgb.shape[:2]} is neither the image size {image_size} nor its stride-4 grid")
    return np.ascontiguousarray(rgb.repeat(4, axis=0).repeat(4, axis=1)[:height, :width])


def _font():
    try:
        return ImageFont.load_default()
    except OSError:  # a Pillow built without its bundled font: panels without titles
        return None


def _titled(row: np.ndarray, panel_width: int, titles: Sequence[str]) -> np.ndarray:
    band = Image.new("RGB", (row.shape[1], TITLE_HEIGHT), (_WHITE,) * 3)
    font = _font()
    if font is not None:
        for n, title in enumerate(titles):
            # Drawn on a panel-wide tile, so a long title is cut at its panel's edge.
            tile = Image.new("RGB", (panel_width, TITLE_HEIGHT), (_WHITE,) * 3)
            ImageDraw.Draw(tile).text((1, 0), title, fill=(0, 0, 0), font=font)
            band.paste(tile, (n * (panel_width + PANEL_GAP), 0))
    return np.concatenate([np.asarray(band, dtype=np.uint8), row], axis=0)


def figure6_row(image: np.ndarray, inference: ImageInference, labels: SynthesizedLabels) -> np.ndarray:
    """The six panels of one image side by side, titles above (``TITLE_HEIGHT`` + H) x
    (6 W + 5 ``PANEL_GAP``); ``inference`` and ``labels`` from :func:`irnet_ray.inference.label_image`."""
    size = image.shape[:2]
    panels = [
        image,
        cam_heatmap(image, inference.cams.highres),
        to_image_size(displacement_colour(inference.displacement), size),
        to_image_size(boundary_image(inference.boundary), size),
        instance_colour(labels.instances.masks),
        semantic_colour(labels.semantic),
    ]
    for title, panel in zip(PANEL_TITLES, panels):
        if panel.shape != image.shape:
            raise ValueError(f"{title} panel is {panel.shape}, the image {image.shape}")
    gap = np.full((size[0], PANEL_GAP, 3), _WHITE, np.uint8)
    row = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
    return _titled(row, size[1], PANEL_TITLES)


def stack_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of different sizes one below the other, left-aligned on white, ``PANEL_GAP`` apart."""
    if not rows:
        raise ValueError("no rows to stack")
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + PANEL_GAP * (len(rows) - 1)
    figure = np.full((height, width, 3), _WHITE, np.uint8)
    top = 0
    for r in rows:
        figure[top : top + r.shape[0], : r.shape[1]] = r
        top += r.shape[0] + PANEL_GAP
    return figure


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# models + image set -> PNG files


def _file_name(position: int, image_id: str) -> str:
    # Ids may hold "/" (folder sets); the position keeps names unique and in figure order.
    return f"{position:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id).strip('_') or 'image'}.png"


def _choose(records, image_ids: Sequence[str] | None, limit: int):
    if image_ids:
        by_id = {r.image_id: r for r in records}
        unknown = [i for i in image_ids if i not in by_id]
        if unknown:
            known = ", ".join(r.image_id for r in records[:5]) + (", ..." if len(records) > 5 else "")
            raise VisualizeError(
                f"unknown image id(s): {', '.join(unknown)} (the set has {len(records)} images: {known})"
            )
        return [by_id[i] for i in dict.fromkeys(image_ids)]
    if limit < 1:
        raise VisualizeError(f"limit must be >= 1, got {limit}")
    return list(records[:limit])


def visualize_images(
    images_spec: str,
    cam_uri: str | None,
    irn_uri: str,
    output_dir: str,
    image_ids: Sequence[str] | None = None,
    limit: int = DEFAULT_LIMIT,
    max_side: int | None = DEFAULT_MAX_SIDE,
    storage_options: StorageOptions = StorageOptions(),
    cam_config: CamInferenceConfig = CamInferenceConfig(),
    synthesis_config: SynthesisConfig = SynthesisConfig(),
    device: str = "auto",
) -> list[str]:
    """Write Fig. 6 panels of chosen images; returns the PNG URIs written.

    ``images_spec``: any :func:`irnet_ray.data.sources.load_records` spec; the image-level
    classes come from it, read with the models' vocabulary. ``cam_uri`` ``None``: the CAM
    model recorded in the IRNet model. ``image_ids`` picks images (in that order), else the first
    ``limit``. Output: ``<output_dir>/<NNN>_<id>.png`` per image, then ``figure6.png`` with every
    row (last in the returned list). Every image is read before any model runs and any file is
    written: an unknown id or an unreadable image raises :class:`VisualizeError` and writes nothing.
    ``figure6.png`` is written last, so a folder without it holds an unfinished run.
    """
    from irnet_ray.data.images import downscale, error_text, load_image
    from irnet_ray.data.sources import ClassVocabulary, load_records
    from irnet_ray.inference import label_batch, resolve_device
    from irnet_ray.model_files import ModelFileError, check_model_pair, load_model_pair

    try:
        models = check_model_pair(cam_uri, irn_uri, storage_options)
        cam_model, irnet = load_model_pair(models, storage_options)
    except ModelFileError as exc:
        raise VisualizeError(str(exc)) from None
    # The set's class names are read with the models' vocabulary, so ids mean the same classes.
    records, _ = load_records(images_spec, storage_options, vocabulary=ClassVocabulary(models.vocabulary))
    chosen = _choose(records, image_ids, limit)

    images, failures = [], []
    for record in chosen:
        try:
            # A writable copy: decoded Pillow arrays are read-only, which torch.from_numpy warns about.
            images.append(np.array(downscale(load_image(record.uri, storage_options), max_side)))
        except Exception as exc:  # noqa: BLE001 - reported together below, never half a figure
            failures.append(f"{record.image_id} ({error_text(exc)})")
    if failures:
        raise VisualizeError(f"cannot read image(s): {'; '.join(failures)}; choose others with --ids")

    target = resolve_device(device)
    cam_model, irnet = cam_model.to(target).eval(), irnet.to(target).eval()
    rows, written = [], []
    results = label_batch(cam_model, irnet, images, [r.classes for r in chosen], cam_config, synthesis_config)
    for position, (record, image, (labels, inference)) in enumerate(zip(chosen, images, results)):
        rows.append(figure6_row(image, inference, labels))
        uri = join(output_dir, _file_name(position, record.image_id))
        write_bytes(uri, png_bytes(rows[-1]), storage_options)
        written.append(uri)
    figure_uri = join(output_dir, FIGURE_NAME)
    write_bytes(figure_uri, png_bytes(stack_rows(rows)), storage_options)
    return written + [figure_uri]

