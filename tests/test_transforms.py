"""Training crops and rescaling as the reference makes them: padding that normalises to zero
(the mean colour), downscaling that filters instead of aliasing, and multi-scale CAM
inference that downscales the same way. No Ray."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from irnet_ray.config import CamInferenceConfig, CamTrainConfig, IrnTrainConfig
from irnet_ray.data.transforms import augment, resize
from irnet_ray.models.cam import CamNet, crop_fill, multiscale_cams, normalize_images


def _checkerboard(size: int) -> torch.Tensor:
    """(3, size, size) uint8, alternating 0 / 255 pixels: all detail, mean 127.5."""
    board = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return torch.from_numpy(np.repeat(board[None], 3, axis=0))


def test_crop_padding_normalises_to_zero():
    """A crop larger than its image is filled with the mean colour: zero (within half a grey
    level) after the backbone's normalisation, as the reference pads after normalising."""
    image = torch.full((3, 10, 12), 200, dtype=torch.uint8)
    assert CamTrainConfig().crop_padding == IrnTrainConfig().crop_padding == "mean"
    crop, _, valid = augment(image, None, np.random.default_rng(0), crop_size=32, hflip=False,
                             fill=crop_fill(CamTrainConfig().crop_padding))  # fmt: skip
    padding = normalize_images(crop[None])[0][:, ~valid]
    assert padding.numel() == 3 * (32 * 32 - 10 * 12)
    assert padding.abs().max() < 0.5 / 255 / 0.224 + 1e-6
    assert (crop[:, valid] == 200).all()
    black, _, _ = augment(image, None, np.random.default_rng(0), crop_size=32, hflip=False, fill=crop_fill("black"))
    assert normalize_images(black[None])[0][:, ~valid].max() < -1.7  # black is ~2 standard deviations off


def test_downscaling_filters_instead_of_sampling():
    """Shrinking a 1-pixel checkerboard 16 -> 7: sampling picks up the pattern as coarse
    stripes (aliasing), the filtered downscale gives the mean grey, as the reference's PIL
    resizing does."""
    board = _checkerboard(16)
    filtered, _ = resize(board, None, (7, 7), antialias=True)
    assert (filtered.int() - 128).abs().max() <= 8
    sampled, _ = resize(board, None, (7, 7), antialias=False)
    assert (sampled.int() - 128).abs().max() >= 50
    assert CamTrainConfig().antialias and IrnTrainConfig().antialias
    crop, _, _ = augment(board, None, np.random.default_rng(0), crop_size=7, scale_range=(7 / 16, 7 / 16),
                         hflip=False, antialias=True)  # fmt: skip
    assert (crop.int() - 128).abs().max() <= 8


def test_multiscale_cams_downscale_with_the_filter():
    """Scale 0.5 of CAM inference sees the filtered downscale: the CAMs equal those computed
    from an explicitly filtered half-size image, and differ from the sampled one's."""
    torch.manual_seed(0)
    from irnet_ray.config import BackboneConfig

    model = CamNet(BackboneConfig(arch="resnet18"), 3).eval()
    image = normalize_images(torch.rand(1, 3, 64, 64))[0]  # detail at every frequency
    config = CamInferenceConfig(scales=(0.5,), flip=False)
    assert CamInferenceConfig().antialias
    got = multiscale_cams(model, image, torch.tensor([1, 2]), config).strided

    def expected(antialias: bool) -> torch.Tensor:
        half = F.interpolate(image[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=antialias)
        with torch.no_grad():
            cams = model.cams_from_features(model.backbone(half)[-1])[0, [0, 1]]
        cams = F.interpolate(cams[None], (math.ceil(64 / 4),) * 2, mode="bilinear", align_corners=False)[0]
        return cams / (cams.amax(dim=(1, 2), keepdim=True) + 1e-5)

    assert torch.allclose(got, expected(True), atol=1e-5)
    assert not torch.allclose(got, expected(False), atol=1e-3)
    unfiltered = multiscale_cams(model, image, torch.tensor([1, 2]), CamInferenceConfig(scales=(0.5,), flip=False,
                                                                                       antialias=False)).strided  # fmt: skip
    assert torch.allclose(unfiltered, expected(False), atol=1e-5)


def test_the_trainers_crop_with_their_settings():
    """CAM and IRNet batches are cropped with the configs' padding and filter: a 16 px
    checkerboard in a 24 px crop is shrunk without aliasing and padded with the mean colour
    (with ``black`` / no filter when asked)."""
    from irnet_ray.models.cam import MEAN_COLOUR
    from irnet_ray.train import ray_train

    board = _checkerboard(16).permute(1, 2, 0).numpy()
    row = {"image": board.tobytes(), "height": 16, "width": 16, "classes": [1],
           "labels": np.zeros((16, 16), np.uint8).tobytes()}  # fmt: skip
    cam = CamTrainConfig(crop_size=24, rescale_long_side=(7, 7), hflip=False)
    irn = IrnTrainConfig(crop_size=24, rescale=(7 / 16, 7 / 16), hflip=False)
    for batch in (ray_train._prepare_cam([row], np.random.default_rng(0), cam, 2),
                  ray_train._prepare_irn([row], np.random.default_rng(0), irn)):  # fmt: skip
        crop = batch["image"][0]
        inside = (crop.int() - 128).abs().amax(dim=0) <= 8  # the shrunk board: mean grey
        padded = (crop == torch.tensor(MEAN_COLOUR, dtype=torch.uint8).view(3, 1, 1)).all(dim=0)
        assert inside.sum() == 49 and padded.sum() == 24 * 24 - 49
    plain = CamTrainConfig(crop_size=24, rescale_long_side=(7, 7), hflip=False, crop_padding="black", antialias=False)
    crop = ray_train._prepare_cam([row], np.random.default_rng(0), plain, 2)["image"][0]
    assert (crop == 0).all(dim=0).sum() >= 24 * 24 - 49 and (crop.int() - 128).abs().max() >= 50
