"""IRNet: class-boundary and displacement-field branches on a frozen backbone (Sec. 4, Fig. 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _reduce(in_ch: int, out_ch: int, groups: int, upsample: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.GroupNorm(groups, out_ch)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@dataclass
class IrnOutput:
    boundary: torch.Tensor  # (N, h, w) class-boundary probability B in [0, 1], stride 4
    displacement: torch.Tensor  # (N, 2, h, w) displacement D in stride-4 pixels, (dy, dx)


class IRNet(nn.Module):
    """The two branches of IRNet, fed by the five stage outputs of a backbone.

    The backbone is not part of this module: at labeling time one backbone pass feeds both the
    CAM head and IRNet (the backbone is the CAM-trained one), and during IRNet training it is
    frozen. The boundary branch sees detached features (as in the reference), the displacement
    branch too, since the backbone never trains here.
    """

    def __init__(self, channels: tuple[int, int, int, int, int]):
        super().__init__()
        if len(channels) != 5:
            raise ValueError(f"IRNet needs the channels of 5 backbone stages, got {channels}")
        c1, c2, c3, c4, c5 = channels
        # Boundary branch: each level -> 32 ch at stride 4, concatenated (160 ch) -> 1 channel.
        self.edge1 = _reduce(c1, 32, 4)
        self.edge2 = _reduce(c2, 32, 4)
        self.edge3 = _reduce(c3, 32, 4, upsample=2)
        self.edge4 = _reduce(c4, 32, 4, upsample=4)
        self.edge5 = _reduce(c5, 32, 4, upsample=4)
        self.edge_out = nn.Conv2d(160, 1, 1, bias=True)
        # Displacement branch: reduce levels, merge top-down, decode two channels at stride 4.
        self.dp1 = _reduce(c1, 64, 8)
        self.dp2 = _reduce(c2, 128, 16)
        self.dp3 = _reduce(c3, 256, 16)
        self.dp4 = _reduce(c4, 256, 16, upsample=2)
        self.dp5 = _reduce(c5, 256, 16, upsample=2)
        self.dp_merge = _reduce(768, 256, 16, upsample=2)
        self.dp_decode = nn.Sequential(
            nn.Conv2d(448, 256, 1, bias=False),
            nn.GroupNorm(16, 256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 1, bias=False),
            nn.GroupNorm(16, 256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 2, 1, bias=False),
        )
        # Mean displacement over the training set, subtracted at inference (Sec. 4.2).
        self.register_buffer("mean_displacement", torch.zeros(2))

    def boundary_parameters(self) -> list[nn.Parameter]:
        modules = (self.edge1, self.edge2, self.edge3, self.edge4, self.edge5, self.edge_out)
        return [p for m in modules for p in m.parameters()]

    def displacement_parameters(self) -> list[nn.Parameter]:
        modules = (self.dp1, self.dp2, self.dp3, self.dp4, self.dp5, self.dp_merge, self.dp_decode)
        return [p for m in modules for p in m.parameters()]

    def forward(self, features: list[torch.Tensor], subtract_mean: bool | None = None) -> IrnOutput:
        """``subtract_mean`` defaults to ``not self.training``."""
        return IrnOutput(
            boundary=torch.sigmoid(self.boundary_logits(features)),
            displacement=self.displacement_field(features, subtract_mean),
        )

    def boundary_logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Boundary branch before the sigmoid, (N, h, w): inference averages the logits of an
        image and of its mirror image (the reference's EdgeDisplacement)."""
        x1, x2, x3, x4, x5 = (f.detach() for f in features)
        h, w = x2.shape[-2:]
        edge = torch.cat(
            [
                self.edge1(x1),
                self.edge2(x2),
                self.edge3(x3)[..., :h, :w],
                self.edge4(x4)[..., :h, :w],
                self.edge5(x5)[..., :h, :w],
            ],
            dim=1,
        )
        return self.edge_out(edge)[:, 0]

    def displacement_field(self, features: list[torch.Tensor], subtract_mean: bool | None = None) -> torch.Tensor:
        """Displacement branch, (N, 2, h, w); ``subtract_mean`` defaults to ``not self.training``."""
        x1, x2, x3, x4, x5 = (f.detach() for f in features)
        h, w = x2.shape[-2:]
        h8, w8 = x3.shape[-2:]
        merged = torch.cat(
            [self.dp3(x3), self.dp4(x4)[..., :h8, :w8], self.dp5(x5)[..., :h8, :w8]], dim=1
        )
        top_down = self.dp_merge(merged)[..., :h, :w]
        displacement = self.dp_decode(torch.cat([self.dp1(x1), self.dp2(x2), top_down], dim=1))
        if subtract_mean if subtract_mean is not None else not self.training:
            displacement = displacement - self.mean_displacement.view(1, 2, 1, 1).to(displacement.dtype)
        return displacement


def crop_to_image(output: IrnOutput, height: int, width: int) -> IrnOutput:
    """Outputs of an image padded to a multiple of 16, cropped back to ceil(H/4) x ceil(W/4)."""
    h, w = -(-height // 4), -(-width // 4)
    return IrnOutput(output.boundary[..., :h, :w], output.displacement[..., :h, :w])


def pad_to_multiple(images: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """Zero-pad (N, 3, H, W) at the bottom/right so every stage's grid divides evenly."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, (-width) % multiple, 0, (-height) % multiple))
