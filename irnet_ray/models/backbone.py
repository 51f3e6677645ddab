"""ResNet backbones with output stride 16, frozen BatchNorm, and torchvision or local weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from irnet_ray.config import BackboneConfig

SUPPORTED_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class Backbone(nn.Module):
    """A torchvision ResNet split into five stages, the last one at stride 16 instead of 32.

    ``forward`` returns the five stage outputs (strides 4, 4, 8, 16, 16): IRNet reads all of them,
    the CAM head reads the last.
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        if config.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {config.arch!r}")
        if not 0 <= config.first_trainable_stage <= 5:
            raise ValueError(f"first_trainable_stage must be in 0..5, got {config.first_trainable_stage}")
        self.config = config
        resnet = torchvision.models.get_model(config.arch, weights=None)
        if config.weights is not None:
            resnet.load_state_dict(_load_resnet_weights(config.arch, config.weights))
        _set_last_stride_to_one(resnet.layer4)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool),
                resnet.layer1,
                resnet.layer2,
                resnet.layer3,
                resnet.layer4,
            ]
        )
        expansion = type(resnet.layer1[0]).expansion  # 1 for BasicBlock, 4 for Bottleneck
        self.channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.strides = (4, 4, 8, 16, 16)
        for stage in self.stages[: config.first_trainable_stage]:
            stage.requires_grad_(False)
        if config.frozen_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        # Frozen BN keeps its running statistics even while the rest trains.
        if self.config.frozen_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = images
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def build_backbone(config: BackboneConfig) -> Backbone:
    return Backbone(config)


def _set_last_stride_to_one(layer: nn.Sequential) -> None:
    block = layer[0]
    for conv in (getattr(block, "conv1", None), getattr(block, "conv2", None)):
        if conv is not None and conv.stride == (2, 2):
            conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def _load_resnet_weights(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """State dict from a local file or a torchvision weight enum name (may download)."""
    path = Path(weights)
    if path.suffix in (".pt", ".pth") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {weights}")
        # weights_only: never unpickle arbitrary objects from a weights file.
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    enum = torchvision.models.get_model_weights(arch)
    name = weights.split(".")[-1]
    try:
        member = enum[name]
    except KeyError:
        raise ValueError(
            f"unknown weights {weights!r} for {arch}; expected a file path or one of "
            f"{[w.name for w in enum]}"
        ) from None
    return member.get_state_dict(progress=False)
