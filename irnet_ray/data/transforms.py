"""Training-time augmentation of an image and its (optional) label map, on CPU.

Images are (3, H, W) uint8 tensors; label maps are (H, W) uint8 tensors resized by nearest
neighbour and padded with the ignore value, so geometry stays aligned with the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def resize(image: torch.Tensor, labels: torch.Tensor | None, size: tuple[int, int], antialias: bool = False):
    """Bilinear for the image (``antialias``: a downscale filters over the source pixels),
    nearest neighbour for the labels."""
    if tuple(image.shape[1:]) == tuple(size):
        return image, labels
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                          antialias=antialias)[0]  # fmt: skip
    image = image.round().clamp(0, 255).to(torch.uint8)
    if labels is not None:
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
    return image, labels


def augment(
    image: torch.Tensor,
    labels: torch.Tensor | None,
    rng: np.random.Generator,
    *,
    crop_size: int,
    long_side_range: tuple[int, int] | None = None,
    scale_range: tuple[float, float] | None = None,
    hflip: bool = True,
    fill: tuple[int, int, int] = (0, 0, 0),
    antialias: bool = False,
):
    """Random rescale (by long side or by factor), horizontal flip, random crop to a square.

    The crop pads with ``fill`` (image; the trainers pass the mean colour) and ``IGNORE``
    (labels) when the image is smaller. Returns the image, the labels (or None) and the
    valid-pixel mask of the crop.
    """
    height, width = image.shape[1:]
    if long_side_range is not None:
        target = rng.integers(long_side_range[0], long_side_range[1] + 1)
        factor = target / max(height, width)
    elif scale_range is not None:
        factor = rng.uniform(*scale_range)
    else:
        factor = 1.0
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    image, labels = resize(image, labels, size, antialias)
    if hflip and rng.random() < 0.5:
        image = image.flip(-1)
        labels = labels.flip(-1) if labels is not None else None
    return random_crop(image, labels, crop_size, rng, fill)


def random_crop(image: torch.Tensor, labels: torch.Tensor | None, crop_size: int, rng: np.random.Generator,
                fill: tuple[int, int, int] = (0, 0, 0)):  # fmt: skip
    height, width = image.shape[1:]
    out_image = torch.tensor(fill, dtype=image.dtype).view(3, 1, 1).repeat(1, crop_size, crop_size)
    out_labels = torch.full((crop_size, crop_size), IGNORE, dtype=torch.uint8) if labels is not None else None
    valid = torch.zeros(crop_size, crop_size, dtype=torch.bool)
    # Where the image is larger, pick a window of it; where smaller, a place for it in the crop.
    src_y = rng.integers(0, height - crop_size + 1) if height > crop_size else 0
    src_x = rng.integers(0, width - crop_size + 1) if width > crop_size else 0
    dst_y = rng.integers(0, crop_size - height + 1) if height < crop_size else 0
    dst_x = rng.integers(0, crop_size - width + 1) if width < crop_size else 0
    h, w = min(height, crop_size), min(width, crop_size)
    out_image[:, dst_y : dst_y + h, dst_x : dst_x + w] = image[:, src_y : src_y + h, src_x : src_x + w]
    if labels is not None:
        out_labels[dst_y : dst_y + h, dst_x : dst_x + w] = labels[src_y : src_y + h, src_x : src_x + w]
    valid[dst_y : dst_y + h, dst_x : dst_x + w] = True
    return out_image, out_labels, valid
