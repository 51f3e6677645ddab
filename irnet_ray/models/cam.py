"""The CAM network (classifier on the stride-16 backbone) and multi-scale CAM inference (Eq. 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from irnet_ray.config import BackboneConfig, CamInferenceConfig
from irnet_ray.models.backbone import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The mean colour as uint8 RGB: what normalises to ~0 (within 0.5/255 of a standard deviation).
MEAN_COLOUR = tuple(round(255 * m) for m in IMAGENET_MEAN)


def crop_fill(crop_padding: str) -> tuple[int, int, int]:
    """The uint8 colour of a training crop's padding (``CamTrainConfig.crop_padding``)."""
    return MEAN_COLOUR if crop_padding == "mean" else (0, 0, 0)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float RGB (N, 3, H, W) -> the backbone's ImageNet-normalised input."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class CamNet(nn.Module):
    """Backbone -> global average pooling -> 1x1 conv (no bias) -> one logit per class."""

    def __init__(self, backbone_config: BackboneConfig, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = Backbone(backbone_config)
        self.classifier = nn.Conv2d(self.backbone.channels[-1], num_classes, 1, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Classification logits (N, C) for normalised images."""
        features = self.backbone(images)[-1]
        pooled = features.mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def cams_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """``relu(conv(features, W_c))`` for every class: (N, C, h/16, w/16)."""
        return F.relu(F.conv2d(features, self.classifier.weight))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.classifier.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]


@dataclass
class CamOutput:
    """CAMs of the image's own classes, each divided by its own maximum."""

    classes: torch.Tensor  # (K,) foreground class ids, 1-based
    strided: torch.Tensor  # (K, ceil(H/4), ceil(W/4)): input of the random walk
    highres: torch.Tensor  # (K, H, W): relation mining and CAM evaluation


def strided_size(height: int, width: int, stride: int = 4) -> tuple[int, int]:
    return math.ceil(height / stride), math.ceil(width / stride)


@torch.no_grad()
def multiscale_cams(
    model: CamNet,
    image: torch.Tensor,
    classes: torch.Tensor,
    config: CamInferenceConfig = CamInferenceConfig(),
    scale_one_features: torch.Tensor | None = None,
) -> CamOutput:
    """Sum of per-scale (and flipped) CAMs at stride 4 and at full resolution, per-class normalised.

    ``image``: normalised (3, H, W). ``classes``: 1-based class ids present in the image.
    ``scale_one_features``: last-stage features at scale 1.0 when the caller already ran the
    backbone (the labeling job shares one pass with IRNet): of the unflipped image (1 row), or
    of the image and its mirror image (2 rows).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    classes = torch.as_tensor(classes, dtype=torch.long).flatten()
    if classes.numel() and (classes.min() < 1 or classes.max() > model.num_classes):
        raise ValueError(f"class ids must be in 1..{model.num_classes}, got {classes.tolist()}")
    height, width = image.shape[1:]
    return multiscale_cams_batch(model, image[None], [(height, width)], [classes], config, scale_one_features)[0]


@torch.no_grad()
def multiscale_cams_batch(
    model: CamNet,
    images: torch.Tensor,
    sizes: list[tuple[int, int]],
    classes: list[torch.Tensor],
    config: CamInferenceConfig = CamInferenceConfig(),
    scale_one_features: torch.Tensor | None = None,
) -> list[CamOutput]:
    """:func:`multiscale_cams` of a batch: one backbone call per scale (and its flips).

    ``images``: normalised (N, 3, Hb, Wb), image n in the top-left ``sizes[n]`` corner, zeros
    (the mean colour) elsewhere. Each scale resizes the whole canvas and the CAMs are cropped
    back to each image, so an image gives the same CAMs in any batch of the same canvas size;
    with ``Hb, Wb == sizes[0]`` (one unpadded image) this is the per-image method. ``classes``:
    valid 1-based ids per image (checked by the caller). ``scale_one_features``: (N or 2N, ...)
    last-stage features at scale 1.0 of the canvas, then of its flips when 2N rows.
    """
    count, _, height, width = images.shape
    small = strided_size(height, width, 4)
    # Upsample on the stride-16 grid padded up to a multiple of 16, then crop (as the reference).
    padded = (math.ceil(height / 16) * 16, math.ceil(width / 16) * 16)
    strided = images.new_zeros(count, model.num_classes, *small, dtype=torch.float32)
    highres = images.new_zeros(count, model.num_classes, *padded, dtype=torch.float32)
    for scale in config.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False, antialias=config.antialias and scale < 1.0
        )
        if scale == 1.0 and scale_one_features is not None:
            per_view = model.cams_from_features(scale_one_features[: 2 * count if config.flip else count])
            if config.flip and scale_one_features.shape[0] == count:
                flipped = model.cams_from_features(model.backbone(scaled.flip(-1))[-1])
                per_view = torch.cat([per_view, flipped])
        else:
            batch = torch.cat([scaled, scaled.flip(-1)]) if config.flip else scaled
            per_view = model.cams_from_features(model.backbone(batch)[-1])
        per_view = per_view.float()  # bf16 under autocast; the sums below are fp32
        cams = per_view[:count] + per_view[count:].flip(-1) if config.flip else per_view
        strided += F.interpolate(cams, small, mode="bilinear", align_corners=False)
        highres += F.interpolate(cams, padded, mode="bilinear", align_corners=False)
    # All class ids in one host-to-device copy (pinned, non-blocking on CUDA: no stream wait).
    per_image = [torch.as_tensor(ids, dtype=torch.long).flatten().tolist() for ids in classes]
    host = torch.tensor([c for ids in per_image for c in ids], dtype=torch.long)
    cuda = images.device.type == "cuda"
    all_ids = (host.pin_memory() if cuda else host).to(images.device, non_blocking=cuda)
    outputs = []
    for n, ((h, w), ids) in enumerate(zip(sizes, all_ids.split([len(i) for i in per_image]), strict=True)):
        index = ids - 1
        own_strided = strided[n, index, : math.ceil(h / 4), : math.ceil(w / 4)]
        own_highres = highres[n, index, :h, :w]
        own_strided = own_strided / (own_strided.amax(dim=(1, 2), keepdim=True) + 1e-5)
        own_highres = own_highres / (own_highres.amax(dim=(1, 2), keepdim=True) + 1e-5)
        outputs.append(CamOutput(classes=ids, strided=own_strided, highres=own_highres))
    return outputs


def cam_semantic_labels(highres: torch.Tensor, classes: torch.Tensor, background: float) -> torch.Tensor:
    """Raw-CAM segmentation for evaluation: a constant background plane, then argmax."""
    scores = F.pad(highres, (0, 0, 0, 0, 1, 0), value=background)
    keys = F.pad(classes, (1, 0), value=0)
    return keys[scores.argmax(dim=0)]
