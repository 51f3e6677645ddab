"""Smoke test of benchmarks/label_job_throughput.py with tiny settings: it labels every image
with 1 actor holding the pool's CPUs and with 2 actors sharing them, scores the labels (the CLI's
default), and reports a throughput and a per-stage cost for each (no timing assertions beyond
"positive and finite"). It runs in a subprocess: it starts and stops its own Ray."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_job_throughput.py"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.timeout(300)
def test_benchmark_labels_with_one_and_two_actors(tmp_path):
    out = tmp_path / "label.json"
    command = [sys.executable, str(SCRIPT), "--images", "8", "--actors", "1,2", "--image-size", "64", "--arch",
               "resnet18", "--scales", "1.0", "--walk-steps", "8", "--batch-size", "2", "--cpus", "1",
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=290)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| actors | CPUs x threads per actor | images/s (steady) |" in done.stdout
    result = json.loads(out.read_text())
    assert [row["actors"] for row in result["rows"]] == [1, 2]
    assert [row["cpus_per_actor"] for row in result["rows"]] == [1.0, 0.5]  # the same CPUs, split
    for row in result["rows"]:
        assert _positive(row["images_per_second"]) and _positive(row["end_to_end_images_per_second"])
        assert row["commits"] == 4  # 8 images, 2 rows per file: every file committed once
        assert set(row["ms_per_image"]) == {"decode", "inference", "synthesis", "encode", "score", "write"}
        assert all(v is not None and v >= 0 for v in row["ms_per_image"].values())
        assert _positive(row["ms_per_image"]["inference"])
        assert _positive(row["ms_per_image"]["score"])  # scoring on, as irnet-ray label does by default
    assert result["rows"][0]["speedup"] == 1.0


def test_benchmark_refuses_settings_without_a_steady_window(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--images", "4", "--batch-size", "2"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "--images must be at least" in done.stderr
