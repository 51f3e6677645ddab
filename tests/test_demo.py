import json
import subprocess
import sys

import pytest

from irnet_ray.cli import main
from irnet_ray.config import BackboneConfig, CamInferenceConfig, CamTrainConfig, IrnTrainConfig, SynthesisConfig
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.demo import DemoConfig, run_demo

REPORT_KEYS = {"cam_miou", "pseudo_miou", "cam_cc_ap50", "ap50", "ap70", "seconds"}


@pytest.mark.timeout(600)
def test_tiny_demo_runs_every_stage_on_ray_and_resumes(ray_cluster, tiny_demo_root):
    # The benchmark suite's demo family at smoke size (irnet_ray/suite.py): spelled out here.
    config = DemoConfig(
        data=SyntheticConfig(num_images=12, image_size=(64, 64), num_classes=2, seed=3),
        backbone=BackboneConfig(arch="resnet18", frozen_batchnorm=False, first_trainable_stage=0),
        cam_train=CamTrainConfig(epochs=1, batch_size=6, crop_size=64, rescale_long_side=(56, 72), seed=3),
        cam_inference=CamInferenceConfig(scales=(1.0,)),
        irn_train=IrnTrainConfig(epochs=1, batch_size=6, crop_size=64, seed=3),
        synthesis=SynthesisConfig(steps=16, displacement_iterations=10),
        device="cpu",
        panels=2,
    )
    from irnet_ray.suite import FAMILIES, family_config

    assert family_config(FAMILIES[0], seed=3, smoke=True) == config
    tmp_path = tiny_demo_root
    lines = []
    report = run_demo(config, workdir=str(tmp_path / "demo"), log=lines.append)
    assert REPORT_KEYS <= set(report)
    for key in REPORT_KEYS - {"seconds"}:
        assert 0.0 <= report[key] <= 100.0
    assert set(report["timings"]) == {"train_cam", "mine_relations", "train_irn", "label", "panels"}
    assert report["labeled"] + report["label_errors"] == 12 and report["ir_label_images"] == 12
    assert report["config"]["data"]["num_images"] == 12
    assert any("AP^r_50" in line and "IRNet" in line for line in lines)
    outputs = report["outputs"]
    manifest = json.loads((tmp_path / "demo" / outputs["root"].rsplit("/", 1)[1] / "labels" / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == report["labeled"]
    assert outputs["panels"].endswith("figure6.png")
    json.dumps(report)  # the report is plain JSON

    # The same settings again: every stage finds its finished output and the figures agree.
    again = run_demo(config, workdir=str(tmp_path / "demo"), log=lines.append)
    assert all(again["resumed"].values())
    assert again["ap50"] == report["ap50"] and again["pseudo_miou"] == report["pseudo_miou"]


def test_every_command_has_help_without_torch_or_ray():
    """``--help`` of every command (and ``--version``) answers without importing torch or Ray:
    the flags come from the configs alone (seconds of imports saved on every call)."""
    from irnet_ray import __version__

    commands = ["demo", "train-cam", "mine-relations", "train-irn", "label", "visualize"]
    script = ("import sys, contextlib, io\nfrom irnet_ray.cli import build_parser\n"
              f"for command in {commands!r}:\n"
              "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
              "        build_parser().parse_args([command, '--help'])\n"
              "    assert '--' in out.getvalue(), command\n"
              "print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "irnet_ray.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--report" in out.stdout and "--arch" in out.stdout
    out = subprocess.run([sys.executable, "-m", "irnet_ray.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"irnet-ray {__version__}"


def test_demo_rejects_bad_settings_with_a_message(capsys):
    assert main(["demo", "--classes", "0"]) == 2
    assert "num_classes" in capsys.readouterr().err
    assert main(["demo", "--cam-scales", "1,x"]) == 2
    assert "--cam-scales" in capsys.readouterr().err
