"""Smoke test of the GPU labeling benchmark (benchmarks/gpu_label.sh -> gpu_label.py) in its quick
CPU mode: every step runs end to end (versions, bf16 peak, FLOP count, device-vs-CPU check,
per-image baseline, batched sizes) and lands in $OUT/gpu_label.json and the log, and nothing
on the path imports what the GPU machine lacks. Only CUDA specifics (peak memory, GPU name)
are left to the first GPU run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_label.sh"
STEPS = ["versions", "peak", "images", "flops", "sanity", "per_image", "batched", "summary"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_row(row: dict) -> None:
    assert _positive(row["images_per_second"]) and _positive(row["achieved_tflops"])
    assert set(row["shares"]) == {"inference", "walk", "instances", "other"}
    assert sum(row["shares"].values()) == pytest.approx(1.0, abs=0.02)
    assert 0 < row["utilisation"] and _positive(row["inference_tflops"])
    assert row["peak_memory_gib"] is None  # CPU: no CUDA allocator to ask


@pytest.mark.timeout(60)
def test_gpu_benchmark_runs_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick"], capture_output=True, text=True,
                          timeout=55, env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_label.json").read_text())
    assert result["steps"] == STEPS
    assert "summary:" in (tmp_path / "gpu_label.log").read_text()
    assert result["versions"]["device"] == "cpu" and result["versions"]["threads"] == 1  # --quick: 1 thread
    assert _positive(result["peak"]["tflops"]) and result["peak"]["dtype"] == "bfloat16"
    assert _positive(result["flops"]["per_image"]) and result["flops"]["by_operator"]
    assert result["sanity"]["semantic_agreement"] > 0.99 and result["sanity"]["ok"]
    _check_row(result["per_image"])
    [batched] = result["batched"]
    _check_row(batched)
    assert batched["batch_size"] == 2 and _positive(batched["speedup_vs_per_image"])
    assert result["summary"]["forbidden_imports"] == []  # no Ray, boto3, pycocotools, pydensecrf on this path
    assert result["summary"]["skipped_batch_sizes"] == []


def test_gpu_wheels_downloads_nothing_when_nothing_is_missing(tmp_path):
    wheels = SCRIPT.parent / "gpu_wheels.sh"
    done = subprocess.run(["bash", str(wheels)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "no wheels needed" in done.stdout, done.stderr
