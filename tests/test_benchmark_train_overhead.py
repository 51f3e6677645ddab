"""Smoke test of benchmarks/train_overhead.py with tiny settings (no timing assertions beyond
"positive and finite").

The benchmark runs in a subprocess: it starts its own Ray and sets torch's thread count, neither
of which may leak into the other tests of this pytest process. One Ray Train run (1 worker) keeps
the test short; two-worker DDP training itself is covered by tests/test_ray_train.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_overhead.py"
IMAGES, BATCH, EPOCHS = 8, 4, 2


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_train_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.timeout(240)
def test_benchmark_measures_plain_and_ray_train(tmp_path):
    out = tmp_path / "overhead.json"
    command = [sys.executable, str(SCRIPT), "--images", str(IMAGES), "--image-size", "64", "--batch-size", str(BATCH),
               "--epochs", str(EPOCHS), "--workers", "1", "--threads", "2", "--json", str(out)]  # fmt: skip
    # The Train controller polls for reports every 2 s by default; faster polls shorten the fit.
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=230, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for label in ("| plain |", "| ray train, 1 worker |", "| plain (after) |"):
        assert label in table, table
    assert "ray.init" in table and "Mean loss, first -> last epoch" in table

    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "config", "fixed", "summary", "results", "total_wall_s"}
    assert report["config"]["images"] == IMAGES and report["config"]["batch_size"] == BATCH
    assert report["config"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert report["machine"]["device"] == "cpu" and "cuda_device" not in report["machine"]
    fixed = report["fixed"]
    assert _positive(fixed["ray_init_s"]) and _positive(fixed["materialize_s"])
    if fixed["plain_niceness"] == 0:  # Ray workers get the plain loop's priority (Ray's default: 15)
        assert fixed["ray_worker_niceness"] == report["config"]["ray_worker_niceness"] == 0

    results = report["results"]
    assert [(r["method"], r["workers"]) for r in results] == [("plain", 1), ("ray", 1), ("plain", 1)]
    assert results[1]["cpus_per_worker"] == 2.0
    steps = IMAGES // BATCH
    for row in results:
        assert row["status"] == "ok", row
        assert row["threads_per_worker"] == 2 and row["images_per_step"] == BATCH
        assert len(row["epochs"]) == EPOCHS
        for epoch in row["epochs"]:
            assert epoch["images"] == IMAGES and epoch["steps"] == steps
            assert _positive(epoch["seconds"]) and _positive(epoch["loss"])
        # Steady state = the epochs after the warm-up one, recomputed from the epochs.
        steady = row["epochs"][1:]
        assert row["steady_steps"] == sum(e["steps"] for e in steady)
        assert row["step_s"] == pytest.approx(sum(e["seconds"] for e in steady) / row["steady_steps"])
        assert row["images_per_s"] == pytest.approx(IMAGES * len(steady) / sum(e["seconds"] for e in steady))
        assert row["first_step_s"] == pytest.approx(row["epochs"][0]["seconds"] / steps)
        assert _positive(row["wall_s"]) and row["outside_epochs_s"] >= 0
        assert row["wall_s"] >= sum(e["seconds"] for e in row["epochs"])
    summary = report["summary"]
    plain = [r for r in results if r["method"] == "plain"]
    assert summary["plain_step_s"] == pytest.approx(sum(r["step_s"] for r in plain) / 2)
    for row in results:
        if row["method"] == "ray":
            assert row["step_ratio"] == pytest.approx(row["step_s"] / summary["plain_step_s"])
            assert row["throughput_ratio"] == pytest.approx(row["images_per_s"] / summary["plain_images_per_s"])
            assert row["end_to_end_s"] == pytest.approx(row["wall_s"] + fixed["ray_init_s"])
    # The plain loop is seeded: both runs of it train to the same losses.
    assert [e["loss"] for e in plain[0]["epochs"]] == [e["loss"] for e in plain[1]["epochs"]]


def test_bad_settings_exit_with_a_message(capsys):
    bench = _load_benchmark()
    with pytest.raises(SystemExit, match="must exceed --warmup-epochs"):
        bench.main(["--epochs", "1", "--warmup-epochs", "1"])
    with pytest.raises(SystemExit, match="cannot feed 4 workers"):
        bench.main(["--images", "3", "--workers", "1,4"])
    with pytest.raises(SystemExit) as info:
        bench.build_parser().parse_args(["--workers", "0"])
    assert info.value.code == 2 and "worker counts must be >= 1" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            bench.main(["--device", "cuda", "--images", "4", "--epochs", "2"])
