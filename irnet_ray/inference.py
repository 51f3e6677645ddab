"""Per-image inference shared by relation mining, the labeling job and the panels (no Ray here).

One backbone pass over the image (at its own size, as multi-scale CAM inference runs it) feeds
both heads:

* the CAM head at scale 1.0 (:func:`irnet_ray.models.cam.multiscale_cams` reuses the pass's
  last-stage features; the other scales and the flips run the backbone again), and
* IRNet's boundary and displacement branches (all five stages), cropped back to the image's
  stride-4 grid, with the mean displacement subtracted (Sec. 4.2).

IRNet was trained on this very backbone (the CAM-trained one, frozen), so sharing the pass is
exact, not an approximation. The labeling job, mining and ``irnet-ray visualize`` all call the
functions below: there is one implementation of "run the models on an image".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from irnet_ray.config import CamInferenceConfig, SynthesisConfig
from irnet_ray.models.cam import CamNet, CamOutput, multiscale_cams, normalize_images
from irnet_ray.models.irnet import IRNet, crop_to_image
from irnet_ray.synthesis import SynthesizedLabels, synthesize_labels

__all__ = ["ImageInference", "ImageTooLargeForDevice", "resolve_device", "image_tensor", "infer_cams", "infer_cams_batch", "infer_image", "label_image", "label_batch"]


class ImageTooLargeForDevice(RuntimeError):
    """One image alone does not fit the device's memory (the batch was already split down)."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` or ``"cuda"``: the GPU when there is one, else the CPU; any other name as is."""
    if name in ("auto", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ImageInference:
    """Model outputs of one image; stride-4 maps are ``ceil(H/4) x ceil(W/4)``."""

    cams: CamOutput  # CAMs of the image's classes (stride 4 and full resolution)
    boundary: torch.Tensor  # (h, w) class-boundary probability
    displacement: torch.Tensor  # (2, h, w) displacement (dy, dx), mean displacement subtracted


def image_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 array or (3, H, W) uint8 tensor -> normalised (3, H, W) float on ``device``."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if not image.flags.writeable:  # Pillow-backed arrays are read-only; torch wants to own one
            image = image.copy()
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    return normalize_images(image[None].to(device))[0]


@torch.no_grad()
def infer_cams(
    cam_model: CamNet, image: np.ndarray | torch.Tensor, classes, config: CamInferenceConfig = CamInferenceConfig()
) -> CamOutput:
    """Multi-scale + flip CAMs of ``classes`` (1-based ids) for one image (relation mining)."""
    device = next(cam_model.parameters()).device
    return multiscale_cams(cam_model, image_tensor(image, device), torch.as_tensor(classes), config)


@torch.no_grad()
def infer_image(
    cam_model: CamNet,
    irnet: IRNet,
    image: np.ndarray | torch.Tensor,
    classes,
    config: CamInferenceConfig = CamInferenceConfig(),
) -> ImageInference:
    """CAMs and IRNet outputs of one image from a single shared backbone pass (module doc)."""
    device = next(cam_model.parameters()).device
    normalized = image_tensor(image, device)
    height, width = normalized.shape[1:]
    features = cam_model.backbone(normalized[None])
    cams = multiscale_cams(cam_model, normalized, torch.as_tensor(classes), config, scale_one_features=features[-1])
    output = crop_to_image(irnet(features, subtract_mean=True), height, width)
    return ImageInference(cams=cams, boundary=output.boundary[0], displacement=output.displacement[0])


@torch.no_grad()
def label_image(
    cam_model: CamNet,
    irnet: IRNet,
    image: np.ndarray | torch.Tensor,
    classes,
    cam_config: CamInferenceConfig = CamInferenceConfig(),
    synthesis_config: SynthesisConfig = SynthesisConfig(),
    timings: dict[str, float] | None = None,
) -> tuple[SynthesizedLabels, ImageInference]:
    """Semantic and instance pseudo labels of one image, with the model outputs they came from.

    ``timings``, when given, receives the seconds spent in ``"inference"`` (backbone, CAM head,
    IRNet) and ``"synthesis"`` (walk, instances, labels); CUDA work is waited for, so the split
    is real on a GPU too.
    """
    started = time.perf_counter()
    inference = infer_image(cam_model, irnet, image, classes, cam_config)
    if timings is not None:
        _wait_for_device(inference.boundary)
        timings["inference"] = time.perf_counter() - started
        started = time.perf_counter()
    height, width = _size(image)
    labels = synthesize_labels(
        inference.cams.strided, inference.cams.classes, inference.boundary, inference.displacement,
        (int(height), int(width)), synthesis_config,
    )  # fmt: skip
    if timings is not None:
        timings["synthesis"] = time.perf_counter() - started  # its results are NumPy: already synced
    return labels, inference


def _wait_for_device(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _size(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    return tuple(image.shape[:2]) if isinstance(image, np.ndarray) else tuple(image.shape[1:])


# Batched entry points. INTERIM: per-image loops with the final signatures, so that the Ray
# stages can call them; the bucketed single-backbone-call implementation replaces these bodies.


@torch.no_grad()
def infer_cams_batch(cam_model: CamNet, images, classes, config: CamInferenceConfig = CamInferenceConfig()) -> list[CamOutput]:
    """:func:`infer_cams` of many images (one ``classes`` list per image), one result per image."""
    return [infer_cams(cam_model, image, c, config) for image, c in zip(images, classes, strict=True)]


@torch.no_grad()
def label_batch(
    cam_model: CamNet,
    irnet: IRNet,
    images,
    classes,
    cam_config: CamInferenceConfig = CamInferenceConfig(),
    synthesis_config: SynthesisConfig = SynthesisConfig(),
    timings: dict[str, float] | None = None,
) -> list[tuple[SynthesizedLabels, ImageInference]]:
    """:func:`label_image` of many images: one ``(labels, inference)`` per image, in order.

    ``timings``, when given, receives the batch's summed seconds per stage.
    """
    results = []
    for image, c in zip(images, classes, strict=True):
        own: dict[str, float] = {}
        results.append(label_image(cam_model, irnet, image, c, cam_config, synthesis_config, own))
        if timings is not None:
            for key, value in own.items():
                timings[key] = timings.get(key, 0.0) + value
    return results
