"""Inter-pixel relation mining (Sec. 4.1): confident CAM regions refined by a dense CRF.

The result is an IR label map per image (0 background, 1..C class, 255 unsure); the pairs of
Eq. 2-4 are read from it during IRNet training (:func:`irnet_ray.affinity.pair_labels`).
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels

from irnet_ray.config import RelationConfig

IGNORE = 255


def crf_refine_labels(image: np.ndarray, labels: np.ndarray, num_labels: int, config: RelationConfig) -> np.ndarray:
    """Dense-CRF refinement of a hard label map (values 0..num_labels-1) on its RGB image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} must match the image size {image.shape[:2]}")
    if num_labels < 1 or labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(f"labels must lie in 0..{num_labels - 1}")
    if num_labels == 1:
        return np.zeros(labels.shape, dtype=np.int64)
    height, width = labels.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary_from_labels(labels, num_labels, gt_prob=config.crf_gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=config.crf_gaussian_sxy, compat=config.crf_gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=config.crf_bilateral_sxy,
        srgb=config.crf_bilateral_srgb,
        rgbim=np.ascontiguousarray(image),
        compat=config.crf_bilateral_compat,
    )
    q = np.asarray(crf.inference(config.crf_iterations)).reshape(num_labels, height, width)
    return q.argmax(axis=0)


def _refined_argmax(image, cams, keys, background: float, config: RelationConfig) -> np.ndarray:
    scores = np.concatenate([np.full((1, *cams.shape[1:]), background, cams.dtype), cams])
    return keys[crf_refine_labels(image, scores.argmax(axis=0), len(keys), config)]


def ir_label_map(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, config: RelationConfig = RelationConfig()) -> np.ndarray:
    """IR labels of one image from its full-resolution, per-class normalised CAMs.

    Foreground where the CRF-refined argmax with background plane ``fg_threshold`` says a class,
    background where the refined argmax with plane ``bg_threshold`` says background, 255 elsewhere.
    """
    cams = np.asarray(cams, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != len(classes) or cams.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"cams must be (K, H, W) with K = {len(classes)} classes and the image size "
            f"{image.shape[:2]}, got {cams.shape}"
        )
    if not 0 <= config.bg_threshold < config.fg_threshold <= 1:
        raise ValueError("thresholds must satisfy 0 <= bg_threshold < fg_threshold <= 1")
    keys = np.concatenate([[0], classes])
    foreground = _refined_argmax(image, cams, keys, config.fg_threshold, config)
    background = _refined_argmax(image, cams, keys, config.bg_threshold, config)
    labels = foreground.astype(np.uint8)
    labels[foreground == 0] = IGNORE
    labels[(foreground == 0) & (background == 0)] = 0
    return labels


def downsample_labels(labels: np.ndarray, stride: int = 4) -> np.ndarray:
    """Label map on the stride grid IRNet's pairs live on (ceil(H/stride) x ceil(W/stride)),
    taking each cell's centre pixel (clipped at the image edge)."""
    height, width = labels.shape
    rows = np.minimum(np.arange(0, height, stride) + stride // 2, height - 1)
    cols = np.minimum(np.arange(0, width, stride) + stride // 2, width - 1)
    return labels[np.ix_(rows, cols)]
