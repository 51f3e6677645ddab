"""The method's defaults, pinned in one place to the paper and ``shared/docs/method.md``: every
other test passes its own small settings, so a changed default would pass them all. The command
line's defaults are the configs' (no second copy to drift). No Ray."""

from __future__ import annotations

import pytest

from irnet_ray.cli import build_parser
from irnet_ray.config import CamInferenceConfig, CamTrainConfig, IrnTrainConfig, RelationConfig, SynthesisConfig
from irnet_ray.label import LabelJobConfig


def test_cam_defaults():
    train = CamTrainConfig()
    assert (train.lr, train.backbone_lr_scale, train.weight_decay, train.momentum, train.poly_power) == (
        0.1, 0.1, 1e-4, 0.9, 0.9)  # fmt: skip
    assert (train.epochs, train.batch_size, train.crop_size, train.rescale_long_side, train.hflip) == (
        5, 16, 512, (320, 640), True)  # fmt: skip
    # The reference pads crops after normalising (the mean colour) and downscales with PIL (filtered).
    assert (train.crop_padding, train.antialias) == ("mean", True)
    inference = CamInferenceConfig()
    assert inference.scales == (1.0, 0.5, 1.5, 2.0) and inference.flip is True and inference.antialias is True
    assert inference.eval_background_threshold == 0.15
    assert inference.boundary_flip is True  # the reference averages the boundary of the image and its flip


def test_relation_mining_defaults():
    relations = RelationConfig()
    assert (relations.fg_threshold, relations.bg_threshold) == (0.30, 0.05)
    assert (relations.crf_gt_prob, relations.crf_iterations) == (0.7, 10)
    assert (relations.crf_gaussian_sxy, relations.crf_gaussian_compat) == (3.0, 3.0)
    assert (relations.crf_bilateral_sxy, relations.crf_bilateral_srgb, relations.crf_bilateral_compat) == (50, 5, 10)
    assert relations.radius == 10  # gamma at training


def test_irnet_training_defaults():
    irn = IrnTrainConfig()
    assert (irn.epochs, irn.batch_size, irn.crop_size, irn.hflip) == (3, 32, 512, True)
    assert (irn.weight_decay, irn.momentum, irn.poly_power) == (1e-4, 0.9, 0.9)
    # The reference's lr 0.1 / 1.0 run with momentum ~0: with real momentum, 0.01 / 0.1.
    assert (irn.lr, irn.lr * irn.displacement_lr_scale) == pytest.approx((0.01, 0.1))
    assert irn.rescale == (0.5, 1.5) and (irn.crop_padding, irn.antialias) == ("mean", True)


def test_synthesis_defaults():
    walk = SynthesisConfig()
    assert (walk.radius, walk.beta, walk.steps) == (5, 10.0, 256)  # Eq. 12-13: radius 5, beta 10, t = 256
    assert walk.sem_background_threshold == walk.ins_background_threshold == 0.25
    assert (walk.displacement_iterations, walk.centroid_threshold, walk.min_instance_fraction) == (100, 2.5, 0.01)


@pytest.mark.parametrize("command", ["label", "visualize"])
def test_the_command_line_uses_the_method_defaults(command):
    args = build_parser().parse_args([command, "--images", "x", "--irn", "i", "--output", "o"])
    walk = SynthesisConfig()
    assert args.walk_steps == walk.steps
    if command == "visualize":
        assert args.displacement_iterations == walk.displacement_iterations
    else:
        assert tuple(float(s) for s in args.scales.split(",")) == CamInferenceConfig().scales
        assert LabelJobConfig().synthesis == walk and LabelJobConfig().cam_inference == CamInferenceConfig()
