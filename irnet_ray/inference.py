"""Inference shared by relation mining, the labeling job and the panels (no Ray here).

One backbone pass over the image at scale 1.0 feeds both heads:

* the CAM head (:func:`irnet_ray.models.cam.multiscale_cams_batch` reuses the pass's last-stage
  features; the other scales run the backbone again), and
* IRNet's boundary and displacement branches (all five stages), cropped back to the image's
  stride-4 grid, with the mean displacement subtracted (Sec. 4.2).

IRNet was trained on this very backbone (the CAM-trained one, frozen), so sharing the pass is
exact, not an approximation. The scale-1.0 pass also runs on the mirror image (when CAM flips
or ``boundary_flip`` ask for it): the CAM head folds it back, and the boundary is
``sigmoid(mean of the edge logits of the image and of the flipped-back mirror)`` as in the
reference; the displacement comes from the unflipped image only.

Batches (:func:`label_batch`, :func:`infer_cams_batch`) group images into **size buckets**:
an image of H x W belongs to the bucket :func:`bucket_key` = (H, W) each rounded up to a
multiple of ``CamInferenceConfig.bucket_multiple`` (32). The images of a bucket are zero-padded
in normalised space (the mean colour, as the reference pads IRNet's input) at the bottom/right to
the bucket size and run together: one backbone call per CAM scale (the image and its flip in the
same call), IRNet on the shared scale-1.0 features; every map is cropped back to the image.
An image therefore gets the same result in any batch (it is padded to the same canvas), and an
image whose sides are multiples of the bucket multiple is not padded at all, so it gets
exactly the per-image result of :func:`label_image`. Label synthesis of the whole batch then
runs on the device (:func:`irnet_ray.synthesis.synthesize_labels_batch`: one block-diagonal
random walk). On CUDA the model passes run under bf16 autocast (``precision``), channels_last,
fed by pinned, non-blocking copies.

Contracts of the batch functions: every image and its class ids are validated before any
compute; a bad one raises ``ValueError`` naming its index. A CUDA out-of-memory error in a
bucket (or in synthesis) retries the two halves, down to single images; a single image that
does not fit raises :class:`ImageTooLargeForDevice` (with its ``index``) for the caller to
record as that image's error.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from irnet_ray.config import CamInferenceConfig, SynthesisConfig
from irnet_ray.models.cam import CamNet, CamOutput, multiscale_cams, multiscale_cams_batch, normalize_images
from irnet_ray.models.irnet import IRNet, IrnOutput, crop_to_image
from irnet_ray.synthesis import SynthesizedLabels, synthesize_labels, synthesize_labels_batch

__all__ = [
    "ImageInference",
    "ImageTooLargeForDevice",
    "bucket_key",
    "resolve_device",
    "image_tensor",
    "infer_cams",
    "infer_cams_batch",
    "infer_image",
    "label_image",
    "label_batch",
]

PRECISIONS = ("auto", "fp32", "bf16")
_Item = TypeVar("_Item")


class ImageTooLargeForDevice(RuntimeError):
    """One image alone ran out of device memory (a per-image error, not a batch failure)."""

    def __init__(self, index: int, size: tuple[int, int], stage: str):
        super().__init__(f"image {index} ({size[0]}x{size[1]}) does not fit in device memory ({stage})")
        self.index = index
        self.size = size
        self.stage = stage

    def __reduce__(self):  # picklable across Ray processes
        return (type(self), (self.index, self.size, self.stage))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` or ``"cuda"``: the GPU when there is one, else the CPU; any other name as is."""
    if name in ("auto", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bucket_key(height: int, width: int, multiple: int = CamInferenceConfig.bucket_multiple) -> tuple[int, int]:
    """The padded canvas (bucket) of an H x W image: each side rounded up to ``multiple``."""
    if not isinstance(multiple, int) or multiple < 1 or multiple % 16:
        raise ValueError(f"bucket_multiple must be a positive multiple of 16 (the output stride), got {multiple!r}")
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


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
    with _model_precision(device, config.precision):
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
    ids = _class_ids(classes, cam_model.num_classes)
    with _model_precision(device, config.precision):
        return _infer_canvas(cam_model, irnet, normalized[None], [tuple(normalized.shape[1:])], [ids], config)[0]


def _infer_canvas(
    cam_model: CamNet,
    irnet: IRNet,
    canvas: torch.Tensor,
    sizes: list[tuple[int, int]],
    classes: list[list[int]],
    config: CamInferenceConfig,
) -> list[ImageInference]:
    """The models on a normalised (N, 3, Hb, Wb) canvas holding image n in its top-left
    ``sizes[n]`` corner: one backbone call at scale 1.0 (with the mirror images when needed)."""
    count = canvas.shape[0]
    with_mirror = config.boundary_flip or (config.flip and 1.0 in config.scales)
    features = cam_model.backbone(torch.cat([canvas, canvas.flip(-1)]) if with_mirror else canvas)
    cams = multiscale_cams_batch(cam_model, canvas, sizes, classes, config, scale_one_features=features[-1])
    unflipped = [f[:count] for f in features]
    if config.boundary_flip:
        logits = irnet.boundary_logits(features).float()
        boundary = torch.sigmoid(logits[:count] / 2 + logits[count:].flip(-1) / 2)
    else:
        boundary = torch.sigmoid(irnet.boundary_logits(unflipped).float())
    displacement = irnet.displacement_field(unflipped, subtract_mean=True).float()
    results = []
    for n, (height, width) in enumerate(sizes):
        own = crop_to_image(IrnOutput(boundary[n], displacement[n]), height, width)
        results.append(ImageInference(cams=cams[n], boundary=own.boundary, displacement=own.displacement))
    return results


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


def _model_precision(device: torch.device, precision: str):
    """bf16 autocast for the model passes ("auto": on CUDA only), else plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _class_ids(classes, num_classes: int, index: int | None = None) -> list[int]:
    ids = [int(c) for c in np.asarray(classes).reshape(-1)]
    if any(c < 1 or c > num_classes for c in ids):
        where = "" if index is None else f"image {index}: "
        raise ValueError(f"{where}class ids must be in 1..{num_classes}, got {ids}")
    return ids


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _check_batch(images: Sequence, classes: Sequence, num_classes: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Every image as a (3, H, W) uint8 tensor and its class ids; ValueError names a bad index."""
    if len(images) != len(classes):
        raise ValueError(f"got {len(images)} images but {len(classes)} class lists")
    tensors, ids = [], []
    for n, (image, own) in enumerate(zip(images, classes)):
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {n} must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
            if not image.flags.writeable:  # Pillow-backed arrays are read-only; torch wants to own one
                image = image.copy()
            image = torch.from_numpy(image).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError(f"image {n} must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}")
        else:
            raise ValueError(f"image {n} must be a numpy array or torch tensor, got {type(image).__name__}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image {n} is empty: {tuple(image.shape)}")
        tensors.append(image)
        ids.append(_class_ids(own, num_classes, n))
    return tensors, ids


def _buckets(sizes: list[tuple[int, int]], multiple: int) -> list[list[int]]:
    """Indices of the images of each bucket, buckets in order of their first image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for n, (height, width) in enumerate(sizes):
        groups.setdefault(bucket_key(height, width, multiple), []).append(n)
    return list(groups.values())


def _canvas(images: list[torch.Tensor], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """uint8 images -> one normalised (N, 3, Hb, Wb) canvas of ``size``, zeros (the mean colour)
    as padding. The bytes travel in one (pinned, non-blocking on CUDA) copy; normalising and
    padding run on the device."""
    cuda = device.type == "cuda"
    host = torch.zeros(len(images), 3, *size, dtype=torch.uint8, pin_memory=cuda)
    for n, image in enumerate(images):
        host[n, :, : image.shape[1], : image.shape[2]] = image
    canvas = normalize_images(host.to(device, non_blocking=cuda))
    for n, image in enumerate(images):
        canvas[n, :, image.shape[1] :, :] = 0
        canvas[n, :, :, image.shape[2] :] = 0
    return canvas.contiguous(memory_format=torch.channels_last) if cuda else canvas


def _halving_on_oom(
    items: list[_Item],
    run: Callable[[list[_Item]], list],
    describe: Callable[[_Item], tuple[int, tuple[int, int]]],
    stage: str,
) -> list:
    """``run(items)``; on device out-of-memory, the two halves separately, down to one item."""
    try:
        return run(items)
    except torch.OutOfMemoryError as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            index, size = describe(items[0])
            raise ImageTooLargeForDevice(index, size, stage) from error
    half = len(items) // 2
    return _halving_on_oom(items[:half], run, describe, stage) + _halving_on_oom(items[half:], run, describe, stage)


def _channels_last(*models: torch.nn.Module) -> None:
    """On CUDA the convolutions run channels_last (faster tensor-core kernels)."""
    for model in models:
        model.to(memory_format=torch.channels_last)


def _run_buckets(cam_model, images, classes, config: CamInferenceConfig, infer) -> list:
    """``infer(canvas, sizes, classes)`` per bucket (with OOM halving), results in input order."""
    device = next(cam_model.parameters()).device
    sizes = [(image.shape[1], image.shape[2]) for image in images]
    results: list = [None] * len(images)

    def run(indices: list[int]) -> list:
        key = bucket_key(*sizes[indices[0]], config.bucket_multiple)
        canvas = _canvas([images[n] for n in indices], key, device)
        with _model_precision(device, config.precision):
            return infer(canvas, [sizes[n] for n in indices], [classes[n] for n in indices])

    for bucket in _buckets(sizes, config.bucket_multiple):
        for chunk in _device_chunks(bucket, device):
            done = _halving_on_oom(chunk, run, lambda n: (n, sizes[n]), "inference")
            for n, result in zip(chunk, done):
                results[n] = result
    return results


#: Images per backbone call on a CPU. CPU convolutions are cache-bound: one image (with its
#: flip) per call is faster than a batch (shared/docs/environment.md: 8 single ResNet-50 passes
#: 0.56 s, one batch of 8 0.90 s; docs/benchmarks.md: batched labeling at 256 px 0.73x the
#: per-image rate with whole-bucket calls). Same canvas either way, so the same labels.
CPU_IMAGES_PER_CALL = 1


def _device_chunks(bucket: list[int], device: torch.device) -> list[list[int]]:
    """A bucket's images per model call: all of them on an accelerator, a few on a CPU."""
    if device.type != "cpu":
        return [bucket]
    return [bucket[i : i + CPU_IMAGES_PER_CALL] for i in range(0, len(bucket), CPU_IMAGES_PER_CALL)]


@torch.no_grad()
def infer_cams_batch(
    cam_model: CamNet, images, classes, config: CamInferenceConfig = CamInferenceConfig()
) -> list[CamOutput]:
    """:func:`infer_cams` of many images (one ``classes`` list per image), one result per image,
    bucketed as the module doc says (full-resolution ``highres`` CAMs for relation mining)."""
    tensors, ids = _check_batch(images, classes, cam_model.num_classes)
    if not tensors:
        return []
    if next(cam_model.parameters()).is_cuda:
        _channels_last(cam_model)
    return _run_buckets(
        cam_model, tensors, ids, config,
        lambda canvas, sizes, own: multiscale_cams_batch(cam_model, canvas, sizes, own, config),
    )  # fmt: skip


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

    ``images``: (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors of any sizes; ``classes``: one
    list of 1-based class ids per image. Buckets, validation and out-of-memory handling: module
    doc. ``timings``, when given, receives the batch's seconds per stage: ``"inference"``
    (backbone and heads), ``"walk"``, ``"instances"`` (refinement, centroid groups, semantic
    and instance labels, host copies) and ``"synthesis"`` (their total); CUDA work is waited for
    before each reading.
    """
    tensors, ids = _check_batch(images, classes, cam_model.num_classes)
    if not tensors:
        return []
    device = next(cam_model.parameters()).device
    if device.type == "cuda":
        _channels_last(cam_model, irnet)
    started = time.perf_counter()
    inferences = _run_buckets(
        cam_model, tensors, ids, cam_config,
        lambda canvas, sizes, own: _infer_canvas(cam_model, irnet, canvas, sizes, own, cam_config),
    )  # fmt: skip
    _wait_for_device(inferences[0].boundary)
    inference_seconds = time.perf_counter() - started
    started = time.perf_counter()
    stages: dict[str, float] = {}
    sizes = [(image.shape[1], image.shape[2]) for image in tensors]

    def synthesize(indices: list[int]) -> list[SynthesizedLabels]:
        chosen = [inferences[n] for n in indices]
        return synthesize_labels_batch(
            [i.cams.strided for i in chosen], [i.cams.classes for i in chosen], [i.boundary for i in chosen],
            [i.displacement for i in chosen], [sizes[n] for n in indices], synthesis_config, stages,
        )  # fmt: skip

    labels = _halving_on_oom(list(range(len(tensors))), synthesize, lambda n: (n, sizes[n]), "synthesis")
    if timings is not None:
        timings["inference"] = timings.get("inference", 0.0) + inference_seconds
        for key, value in stages.items():
            timings[key] = timings.get(key, 0.0) + value
        timings["synthesis"] = timings.get("synthesis", 0.0) + time.perf_counter() - started
    return list(zip(labels, inferences))
