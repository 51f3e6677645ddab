import dataclasses
import json
import subprocess
import sys

import pytest

from irnet_ray.cli import main
from irnet_ray.config import BackboneConfig, CamInferenceConfig, CamTrainConfig, IrnTrainConfig, SynthesisConfig
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.demo import DemoConfig, run_demo

REPORT_KEYS = {"cam_miou", "pseudo_miou", "cam_cc_ap50", "ap50", "ap70", "seconds"}


@pytest.mark.timeout(300)
def test_tiny_demo_runs_every_stage_and_reports(tmp_path):
    config = DemoConfig(
        data=SyntheticConfig(num_images=12, image_size=(64, 64), num_classes=2, seed=3),
        backbone=BackboneConfig(arch="resnet18", frozen_batchnorm=False, first_trainable_stage=0),
        cam_train=CamTrainConfig(epochs=1, batch_size=6, crop_size=64, rescale_long_side=(56, 72)),
        cam_inference=CamInferenceConfig(scales=(1.0,)),
        irn_train=IrnTrainConfig(epochs=1, batch_size=6, crop_size=64),
        synthesis=SynthesisConfig(steps=16, displacement_iterations=10),
        device="cpu",
    )
    lines = []
    report = run_demo(config, log=lines.append)
    assert REPORT_KEYS <= set(report)
    for key in REPORT_KEYS - {"seconds"}:
        assert 0.0 <= report[key] <= 100.0
    assert set(report["timings"]) == {"train_cam", "cam_inference", "mine_relations", "train_irn", "synthesize_and_evaluate"}
    assert report["config"]["data"]["num_images"] == 12
    assert "AP^r_50" in lines[-1] and "mIoU" in lines[-1]
    json.dumps(report)  # the report is plain JSON


def test_every_command_has_help():
    out = subprocess.run([sys.executable, "-m", "irnet_ray.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--report" in out.stdout and "--arch" in out.stdout
    out = subprocess.run([sys.executable, "-m", "irnet_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout


def test_demo_rejects_bad_settings_with_a_message(capsys):
    assert main(["demo", "--classes", "0"]) == 2
    assert "num_classes" in capsys.readouterr().err
    assert main(["demo", "--cam-scales", "1,x"]) == 2
    assert "--cam-scales" in capsys.readouterr().err
