"""Smoke test of benchmarks/label_throughput.py at tiny settings: both modes (per-image
``label_image`` and batched ``label_batch``) label every image, report a positive rate, a
ratio, stage shares that add up to the wall time, and agree on the labels (no timing
assertions beyond "positive and finite": this machine is shared). It runs the script in a
subprocess, as a user would."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_throughput.py"
SHARES = {"inference", "walk", "instances", "other"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.timeout(60)
def test_benchmark_compares_per_image_and_batched_labeling(tmp_path):
    out = tmp_path / "label.json"
    command = [sys.executable, str(SCRIPT), "--arch", "resnet18", "--sizes", "64", "--images", "2", "--batch-size",
               "2", "--repeats", "1", "--walk-steps", "8", "--scales", "1.0,0.5", "--threads", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=55)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| size | mode | images/s (median) | rounds (min-max) | batched / per-image |" in done.stdout
    result = json.loads(out.read_text())
    [row] = result["rows"]
    assert row["size"] == 64 and row["images"] == 2
    for mode in ("per-image", "batched"):
        measured = row[mode]
        assert _positive(measured["images_per_second"]) and len(measured["rounds_images_per_second"]) == 1
        assert set(measured["shares"]) == SHARES
        assert all(0 <= share <= 1 for share in measured["shares"].values())
        assert sum(measured["shares"].values()) == pytest.approx(1.0, abs=0.02)
        assert _positive(measured["seconds"]["inference"]) and _positive(measured["seconds"]["walk"])
        assert _positive(measured["seconds"]["instances"])
    assert _positive(row["ratio"])
    assert row["ratio"] == pytest.approx(row["batched"]["images_per_second"] / row["per-image"]["images_per_second"])
    assert len(row["paired_ratios"]) == 1 and _positive(row["paired_ratio_median"])
    assert row["agreement"] > 0.99  # same models, same images: the same labels up to float rounding
    assert result["machine"]["threads"] == 1


def test_benchmark_refuses_scales_without_one(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--scales", "0.5,2.0"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2 and "must include 1.0" in done.stderr
