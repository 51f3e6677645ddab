"""The training commands end to end (`irnet-ray train-cam` -> `mine-relations` -> `train-irn`)
and the messages a user gets for their mistakes (one line, exit status 2, no traceback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from irnet_ray import model_files
from irnet_ray.cli import main
from irnet_ray.data.sources import load_synthetic, synthetic_records
from irnet_ray.data.synthetic import SyntheticConfig

WORKER = ["--num-workers", "1", "--cpus-per-worker", "0.5", "--gpus-per-worker", "0"]
SMALL_CAM = ["--arch", "resnet18", "--train-batchnorm", "--first-trainable-stage", "0", "--epochs", "2",
             "--batch-size", "4", "--lr", "0.01", "--crop", "64", "--long-side", "56,64"]  # fmt: skip


def _image_folder(folder, count: int = 8):
    """PNG files of built-in images, a CSV manifest naming them by class, plus one missing and one
    corrupt image (both must be recorded and skipped, never fatal)."""
    records, vocabulary = synthetic_records(SyntheticConfig(num_images=count, image_size=(64, 64), num_classes=2))
    lines = ["image,classes"]
    for record in records:
        Image.fromarray(load_synthetic(record.uri).image).save(folder / f"{record.image_id}.png")
        lines.append(f"{record.image_id}.png,{'|'.join(vocabulary.name_of(c) for c in record.classes)}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    lines += [f"corrupt.png,{vocabulary.names[0]}", f"gone.png,{vocabulary.names[1]}"]
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return folder / "train.csv", vocabulary


@pytest.mark.timeout(420)
def test_training_commands_chain_and_resume(ray_cluster, tmp_path, capsys):
    manifest, vocabulary = _image_folder(tmp_path)
    runs = tmp_path / "runs"
    cam_args = ["train-cam", "--images", str(manifest), "--storage", str(runs), "--run-name", "cam", *SMALL_CAM,
                *WORKER, "--summary", str(tmp_path / "cam.json")]  # fmt: skip
    assert main(cam_args) == 0
    out = capsys.readouterr().out
    assert "2 image(s) could not be used" in out and "'missing': 1" in out
    summary = json.loads((tmp_path / "cam.json").read_text())
    assert summary["images"] == 8 and len(summary["history"]) == 2
    _, meta = model_files.load_model(str(runs / "cam" / "model"))
    assert meta["kind"] == "cam" and meta["vocabulary"] == list(vocabulary.names)

    assert main(cam_args) == 0  # the same run again: nothing is retrained
    assert "already complete" in capsys.readouterr().out

    ir_labels = tmp_path / "ir"
    assert main(["mine-relations", "--images", str(manifest), "--cam", str(runs / "cam" / "model"),
                 "--output", str(ir_labels), "--scales", "1.0", "--crf-iterations", "3", "--cpus-per-actor", "0.5",
                 "--crf-cpus", "0.5"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "8 of 10 images mined" in out

    assert main(["train-irn", "--ir-labels", str(ir_labels), "--cam", str(runs / "cam" / "model"), "--storage",
                 str(runs), "--run-name", "irn", "--epochs", "1", "--batch-size", "4", "--crop", "64",
                 "--pair-radius", "5", *WORKER]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "IRNet model:" in out and "mean displacement" in out
    _, meta = model_files.load_model(str(runs / "irn" / "model"))
    assert meta["kind"] == "irn" and len(meta["extra"]["mean_displacement"]) == 2
    assert all(np.isfinite(meta["extra"]["mean_displacement"]))


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_user_mistakes_get_one_clear_line(tmp_path, capsys, s3_env):
    runs = ["--storage", str(tmp_path / "runs"), "--run-name", "r", "--from-scratch"]
    folder = tmp_path / "set"
    folder.mkdir()
    manifest, vocabulary = _image_folder(folder, count=2)

    # A random backbone with the paper's frozen stages and BatchNorm would train ~nothing.
    line = _fails(["train-cam", "--images", str(manifest), *runs[:-1]], capsys)
    assert "no pretrained weights" in line and "--weights" in line and "--from-scratch" in line
    assert "stages 0..2 frozen" in line and "BatchNorm frozen" in line
    line = _fails(["train-cam", "--images", str(manifest), *runs[:-1], "--train-batchnorm"], capsys)
    assert "stages 0..2 frozen" in line and "BatchNorm frozen" not in line

    # An unknown class name: the message names it and the row.
    (folder / "typo.csv").write_text("image,classes\n" f"{manifest.parent}/0.png,{vocabulary.names[0]}\n"
                                     f"{manifest.parent}/1.png,{vocabulary.names[1]}x\n")  # fmt: skip
    (folder / "vocabulary.json").write_text(json.dumps(list(vocabulary.names)))
    line = _fails(["train-cam", "--images", str(folder / "typo.csv"), "--vocabulary", str(folder / "vocabulary.json"),
                   *runs], capsys)  # fmt: skip
    assert f"'{vocabulary.names[1]}x'" in line and "row 2" in line

    # A manifest without the required columns.
    (folder / "columns.csv").write_text("path,labels\n0.png,a\n")
    line = _fails(["train-cam", "--images", str(folder / "columns.csv"), *runs], capsys)
    assert "image" in line and "classes" in line

    # Empty input.
    (folder / "empty.csv").write_text("image,classes\n")
    assert "empty" in _fails(["train-cam", "--images", str(folder / "empty.csv"), *runs], capsys)

    # A path that does not exist.
    assert "not found" in _fails(["train-cam", "--images", str(tmp_path / "nowhere"), *runs], capsys)

    # Unreachable run storage (nothing listens on port 9).
    line = _fails(["train-cam", "--images", str(manifest), "--storage", "s3://bucket/runs", "--run-name", "r",
                   "--from-scratch", "--endpoint-url", "http://127.0.0.1:9"], capsys)  # fmt: skip
    assert "cannot reach the object store" in line and s3_env["secret_key"] not in line

    # A model folder that is not there, and a bad flag value.
    assert "model.json" in _fails(["mine-relations", "--images", str(manifest), "--cam", str(tmp_path / "no-model"),
                                   "--output", str(tmp_path / "ir")], capsys)  # fmt: skip
    assert "--long-side" in _fails(["train-cam", "--images", str(manifest), *runs, "--long-side", "64"], capsys)
