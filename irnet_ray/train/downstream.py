"""DeepLab and Mask R-CNN trained on the pseudo masks: the plain pieces (no Ray here).

The Ray Train wiring (workers, checkpoints, resume) is :mod:`irnet_ray.train.ray_train`'s, shared
with CAM and IRNet; this module holds what differs for the two downstream models:

* :func:`decode_label_batch`: the ``map_batches`` function of the decode tasks. Raw rows of a
  finished labeling output (:func:`irnet_ray.downstream.readers.label_dataset_ray`) -> decoded
  rows with the image and its target (semantic: the class-index map; instance: the kept masks,
  packed, and their class ids). It never raises for one image: the row carries ``error``
  (``missing: ...``, ``size_changed: ...``, ``bad_labels: ...``) as the other training sets do.
* :func:`build_deeplab` / :func:`build_maskrcnn`: torchvision's ``deeplabv3_resnet50`` /
  ``maskrcnn_resnet50_fpn`` with ``weights=None`` and ``weights_backbone=None`` (nothing is
  downloaded), optionally started from a ResNet-50 state dict the user supplies
  (:func:`load_backbone_state`).
* :func:`prepare_semantic` / :func:`prepare_instance`: the per-worker augmentation of a batch.
* :func:`deeplab_loss` / :func:`maskrcnn_loss` and :func:`downstream_optimizer` (SGD with the
  poly decay of the other stages).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from irnet_ray.config import DeepLabTrainConfig, MaskRcnnTrainConfig
from irnet_ray.data.images import downscale, error_text, load_image, object_column, row_image
from irnet_ray.data.storage import StorageOptions, read_bytes
from irnet_ray.train.schedule import sgd_with_poly_decay

__all__ = [
    "TASKS",
    "LABEL_COLUMNS",
    "DECODED_LABEL_COLUMNS",
    "decode_label_batch",
    "row_semantic",
    "row_instances",
    "state_dict_of_file",
    "load_backbone_state",
    "backbone_state_id",
    "build_deeplab",
    "build_maskrcnn",
    "prepare_semantic",
    "prepare_instance",
    "deeplab_loss",
    "maskrcnn_loss",
    "downstream_optimizer",
]

#: ``task`` of :func:`decode_label_batch`: the semantic map (DeepLab) or the instances (Mask R-CNN).
TASKS = ("semantic", "instance")
#: The columns of the labeling output the decode tasks read.
LABEL_COLUMNS = ("image_id", "uri", "height", "width", "semantic_png", "instances")
#: Decoded rows: the image as in :mod:`irnet_ray.data.ray_datasets` (``classes`` left empty),
#: ``labels`` the (H, W) uint8 semantic map (semantic task), ``masks`` the kept instance masks
#: as ``np.packbits`` of (N, H, W) bool and ``mask_classes`` their class ids (instance task).
DECODED_LABEL_COLUMNS = ("image_id", "image", "height", "width", "classes", "error", "labels", "masks", "mask_classes")


# --------------------------------------------------------------------------------------
# decoding (Ray Data tasks)


def _decoded_row(image_id: str, image: np.ndarray | None = None, labels: bytes = b"", masks: bytes = b"",
                 mask_classes: Sequence[int] = (), error: str = "") -> dict:  # fmt: skip
    height, width = image.shape[:2] if image is not None else (0, 0)
    return {"image_id": image_id, "image": image.tobytes() if image is not None else b"", "height": height,
            "width": width, "classes": [], "error": error, "labels": labels, "masks": masks,
            "mask_classes": [int(c) for c in mask_classes]}  # fmt: skip


def decode_label_batch(batch: Any, run, task: str, options: StorageOptions = StorageOptions(), *,
                       max_side: int | None = None, score_threshold: float = 0.05, min_area: int = 16,
                       ignore_below: float | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """``map_batches`` function (``batch_format="pyarrow"``): rows of the labeling output ``run``
    (a :class:`~irnet_ray.downstream.runs.LabelRun`) -> decoded rows (:data:`DECODED_LABEL_COLUMNS`).

    The image is read from the row's ``uri`` and must have the labeled size; image and target
    are downscaled together to ``max_side`` (targets by nearest neighbour; instance masks left
    empty by it are dropped). Filters: ``score_threshold`` / ``min_area`` (instances),
    ``ignore_below`` (semantic; see :func:`irnet_ray.downstream.runs.semantic_labels`).
    """
    from irnet_ray.downstream.runs import kept_instances, semantic_labels

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    rows = batch.to_pylist() if hasattr(batch, "to_pylist") else [dict(zip(batch, v)) for v in zip(*batch.values())]
    out = []
    for row in rows:
        image_id = str(row["image_id"])
        try:
            image = load_image(str(row["uri"]), options)
        except Exception as exc:  # noqa: BLE001 - recorded per image, never fatal
            out.append(_decoded_row(image_id, error=error_text(exc)))
            continue
        if image.shape[:2] != (int(row["height"]), int(row["width"])):
            out.append(_decoded_row(image_id, error=(
                f"size_changed: {row['uri']} is {image.shape[1]}x{image.shape[0]} but was labeled at "
                f"{row['width']}x{row['height']}")))  # fmt: skip
            continue
        try:
            if task == "semantic":
                labels = semantic_labels(row, run, ignore_below=ignore_below)
                image = downscale(image, max_side)
                labels = downscale(labels, max_side, nearest=True)
                out.append(_decoded_row(image_id, image, labels=np.ascontiguousarray(labels).tobytes()))
            else:
                kept = kept_instances(row, run, score_threshold=score_threshold, min_area=min_area)
                image = downscale(image, max_side)
                masks = [downscale(m.astype(np.uint8), max_side, nearest=True) > 0 for m in kept.masks]
                keep = [n for n, m in enumerate(masks) if m.any()]
                stacked = np.stack([masks[n] for n in keep]) if keep else np.zeros((0,) + image.shape[:2], bool)
                out.append(_decoded_row(image_id, image, masks=np.packbits(stacked).tobytes(),
                                        mask_classes=kept.class_ids[keep]))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - an inconsistent row (class id outside the vocabulary)
            out.append(_decoded_row(image_id, error=f"bad_labels: {' '.join(str(exc).split())}"))
    columns: dict[str, np.ndarray] = {}
    for name in DECODED_LABEL_COLUMNS:
        values = [r[name] for r in out]
        if name in ("height", "width"):
            columns[name] = np.asarray(values, dtype=np.int64)
        elif name in ("image", "labels", "masks", "classes", "mask_classes"):
            columns[name] = object_column(values)
        else:
            columns[name] = np.asarray(values, dtype=object)
    return columns


def row_semantic(row: dict) -> np.ndarray:
    """The (H, W) uint8 class-index map of a decoded semantic row (0 background, 255 ignore)."""
    return np.frombuffer(row["labels"], dtype=np.uint8).reshape(int(row["height"]), int(row["width"])).copy()


def row_instances(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(masks (N, H, W) bool, class ids (N,) int64)`` of a decoded instance row."""
    classes = np.asarray(row["mask_classes"] if row["mask_classes"] is not None else [], dtype=np.int64).reshape(-1)
    height, width = int(row["height"]), int(row["width"])
    bits = np.unpackbits(np.frombuffer(row["masks"], dtype=np.uint8), count=len(classes) * height * width)
    return bits.reshape(len(classes), height, width).astype(bool), classes


# --------------------------------------------------------------------------------------
# models


def state_dict_of_file(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    import io

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # never unpickles code
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {uri} are not a state dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used


def load_backbone_state(uri: str, options: StorageOptions = StorageOptions()) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict (``torch.save`` of ``resnet50().state_dict()``, optionally
    under a ``state_dict`` / ``model`` key) from a local file or ``s3://``; ``fc.*`` is dropped."""
    return state_dict_of_file(read_bytes(uri, options), uri)


def backbone_state_id(uri: str, options: StorageOptions = StorageOptions()) -> str:
    """``sha256:<hex>`` of the weights file (recorded in the run's settings)."""
    return "sha256:" + hashlib.sha256(read_bytes(uri, options)).hexdigest()


def _load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], uri: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ValueError(f"backbone weights {uri} do not fit torchvision's ResNet-50: {error}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {uri} do not fit torchvision's ResNet-50: "
            f"{len(missing)} missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected "
            f"({', '.join(list(unexpected)[:3])})"
        )


def build_deeplab(num_classes: int, cfg: DeepLabTrainConfig, backbone_state: Mapping | None = None):
    """torchvision ``deeplabv3_resnet50`` for ``num_classes`` foreground classes plus background,
    random weights, or the backbone loaded from ``backbone_state`` (:func:`load_backbone_state`)."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                               aux_loss=cfg.aux_loss)  # fmt: skip
    if backbone_state is not None:
        _load_into(model.backbone, backbone_state, cfg.backbone_weights or "(given)")
    return model


def build_maskrcnn(num_classes: int, cfg: MaskRcnnTrainConfig, backbone_state: Mapping | None = None):
    """torchvision ``maskrcnn_resnet50_fpn`` for ``num_classes`` foreground classes plus background.

    From scratch (``weights=None, weights_backbone=None``): BatchNorm with batch statistics and
    every backbone stage trained, as torchvision builds it. From ``backbone_state``: frozen
    BatchNorm and ``trainable_backbone_layers`` (default 3) trained, as torchvision builds a
    pretrained backbone.
    """
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn

    sizes = {"min_size": cfg.min_size, "max_size": cfg.max_size}
    if backbone_state is None:
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                     trainable_backbone_layers=cfg.trainable_backbone_layers, **sizes)  # fmt: skip
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    resnet = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    _load_into(resnet, backbone_state, cfg.backbone_weights or "(given)")
    layers = 3 if cfg.trainable_backbone_layers is None else cfg.trainable_backbone_layers
    return MaskRCNN(_resnet_fpn_extractor(resnet, layers), num_classes=num_classes + 1, **sizes)


def downstream_optimizer(model: torch.nn.Module, cfg: DeepLabTrainConfig | MaskRcnnTrainConfig, total_steps: int):
    """SGD (momentum, weight decay) with the poly decay of the other stages over the trained parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sgd_with_poly_decay([{"params": params}], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               total_steps=total_steps, power=cfg.poly_power)  # fmt: skip


# --------------------------------------------------------------------------------------
# batches and losses (per worker)


def prepare_semantic(rows: list[dict], rng: np.random.Generator, cfg: DeepLabTrainConfig) -> dict[str, torch.Tensor]:
    """Random rescale, flip and crop of image and map together (:func:`irnet_ray.data.transforms.augment`;
    the padding of a crop is ignored): ``image`` uint8 (N, 3, S, S), ``labels`` int64 (N, S, S)."""
    from irnet_ray.data.transforms import augment, to_chw_tensor
    from irnet_ray.models.cam import crop_fill

    crops, labels = [], []
    for row in rows:
        image = to_chw_tensor(row_image(row))
        label_map = torch.from_numpy(row_semantic(row))
        crop, crop_labels, _ = augment(image, label_map, rng, crop_size=cfg.crop_size, scale_range=tuple(cfg.rescale),
                                       hflip=cfg.hflip, fill=crop_fill(cfg.crop_padding),
                                       antialias=cfg.antialias)  # fmt: skip
        crops.append(crop)
        labels.append(crop_labels.long())
    return {"image": torch.stack(crops), "labels": torch.stack(labels)}


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) float32 x1 y1 x2 y2 in pixel-edge coordinates of (N, H, W) non-empty masks
    (:func:`irnet_ray.downstream.readers.masks_to_boxes` on tensors)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    ys, xs = torch.arange(masks.shape[1]), torch.arange(masks.shape[2])
    big = max(masks.shape[1], masks.shape[2]) + 1
    x1 = torch.where(cols, xs, big).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    y1 = torch.where(rows, ys, big).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def prepare_instance(rows: list[dict], rng: np.random.Generator, cfg: MaskRcnnTrainConfig):
    """(images, targets) for torchvision's Mask R-CNN: float [0, 1] (3, H, W) images at their
    decoded size (the model resizes to ``min_size`` / ``max_size`` itself) and targets
    ``boxes`` (from the masks), ``labels``, ``masks`` (uint8); random horizontal flip."""
    from irnet_ray.data.transforms import to_chw_tensor

    images, targets = [], []
    for row in rows:
        image = to_chw_tensor(row_image(row))
        masks_np, classes = row_instances(row)
        masks = torch.from_numpy(masks_np)
        if cfg.hflip and rng.random() < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
        images.append(image.float() / 255.0)
        targets.append({"boxes": _boxes(masks), "labels": torch.from_numpy(classes), "masks": masks.to(torch.uint8)})
    return images, targets


def deeplab_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, aux_weight: float):
    """Cross-entropy with ``ignore_index=255`` on DeepLab's output (plus ``aux_weight`` times the
    auxiliary head's, when the model has one, as torchvision's reference trains it). ``images``
    uint8 (N, 3, H, W). Returns ``(total, parts)``."""
    from irnet_ray.models.cam import normalize_images

    outputs = model(normalize_images(images))
    main = F.cross_entropy(outputs["out"], labels, ignore_index=255)
    if "aux" not in outputs:
        return main, {}
    aux = F.cross_entropy(outputs["aux"], labels, ignore_index=255)
    return main + aux_weight * aux, {"loss_out": float(main.detach()), "loss_aux": float(aux.detach())}


def maskrcnn_loss(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict], device):
    """The sum of torchvision Mask R-CNN's training losses; returns ``(total, parts)``."""
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    losses = model(images, targets)
    return sum(losses.values()), {k: float(v.detach()) for k, v in sorted(losses.items())}
