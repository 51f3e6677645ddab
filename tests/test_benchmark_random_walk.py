"""Smoke test of benchmarks/random_walk.py on tiny maps (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "random_walk.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_random_walk", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_both_methods_and_agrees(tmp_path, capsys):
    bench = _load_benchmark()
    out = tmp_path / "rw.json"
    # One torch thread: the tiny sparse walk is dominated by OpenMP synchronisation otherwise,
    # which takes seconds when another process keeps the cores busy.
    report = bench.main(
        ["--sizes", "12x16,20x24", "--repeats", "1", "--maps", "4", "--threads", "1", "--json", str(out)]
    )
    table = capsys.readouterr().out
    assert "| 12x16 |" in table and "| 20x24 |" in table
    assert "torch threads" in table

    saved = json.loads(out.read_text())
    assert set(saved) >= {"machine", "config", "results", "total_wall_s"}
    assert set(saved["machine"]) >= {"cpu_count", "torch", "torch_threads", "device"}
    assert [row["size"] for row in saved["results"]] == ["12x16", "20x24"]
    for row in saved["results"]:
        assert set(row) >= {
            "size", "image_size", "n", "sparse", "dense", "time_ratio", "memory_ratio", "max_rel_diff"
        }
        assert row["n"] == row["height"] * row["width"]
        for method in ("sparse", "dense"):
            result = row[method]
            assert result["status"] == "ok", result
            assert set(result) >= {"time_s", "times_s", "peak_mib"}
            assert result["time_s"] > 0 and result["peak_mib"] >= 0
        assert row["time_ratio"] is not None
        assert row["max_rel_diff"] < 1e-3
    assert saved["results"] == json.loads(json.dumps(report["results"]))


def test_dense_is_skipped_when_too_large(tmp_path):
    bench = _load_benchmark()
    args = bench.build_parser().parse_args(["--dense-max-gib", "4", "--dense-max-n", "12000"])
    reason, needs = bench.dense_skip_reason(256 * 256, args)
    assert reason.startswith("skipped: needs") and needs > 4
    reason, _ = bench.dense_skip_reason(128 * 128, args)  # 3 GiB fits, but N = 16384 > 12000
    assert reason == "skipped: N > 12000"
    assert bench.dense_skip_reason(94 * 125, args)[0] is None
    assert args.sizes == bench.parse_sizes(bench.DEFAULT_SIZES)
