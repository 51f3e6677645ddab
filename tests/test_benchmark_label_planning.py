"""Smoke test of benchmarks/label_planning.py at 5,000 rows and 50 commit records: the planning
paths (columnar from the log's snapshot, columnar record by record, and records) on a fresh output and a rerun over commit records on a moto S3
server (started and stopped by the script) agree on the counts, and every mode reports a time,
its phases and a peak memory (no timing bars: shared machine). About 20 s on a loaded 2-core
machine (8 fresh processes, each importing pyarrow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_planning.py"
ROWS, COMMITS = 5000, 50


@pytest.mark.timeout(120)
def test_benchmark_plans_both_ways(tmp_path):
    pytest.importorskip("moto.server")
    out = tmp_path / "planning.json"
    command = [sys.executable, str(SCRIPT), "--rows", str(ROWS), "--commits", str(COMMITS), "--old-timeout", "60",
               "--modes", "columnar,columnar-nosnap,records", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| output | manifest | mode | seconds | driver peak MiB |" in done.stdout
    report = json.loads(out.read_text())
    assert (report["rows"], report["commits"]) == (ROWS, COMMITS)
    results = report["results"]
    assert sorted((r["output"], r["format"], r["mode"]) for r in results) == sorted(
        [(o, f, m) for o in ("fresh", "rerun") for f in ("parquet", "csv") for m in ("columnar", "records")]
        + [("rerun", f, "columnar-nosnap") for f in ("parquet", "csv")])
    for row in results:
        assert not row.get("timed_out") and row["seconds"] > 0 and row["peak_rss_mib"] > 0, row
        assert set(row["phases"]) == {"load", "read_commits", "plan"}, row
        expected = (ROWS, 0) if row["output"] == "fresh" else (0, ROWS)
        assert (row["pending"], row["skipped"], row["refused"]) == (*expected, 0), row
    # The rerun really read the commit log (the server was up and held the records).
    assert all(r["phases"]["read_commits"] > 0 for r in results if r["output"] == "rerun")
    # Both paths give the same plan for each input.
    by_input = {}
    for r in results:
        by_input.setdefault((r["output"], r["format"]), set()).add((r["pending"], r["skipped"], r["refused"]))
    assert all(len(plans) == 1 for plans in by_input.values()), by_input


@pytest.mark.timeout(180)
def test_benchmark_plans_with_ray_data_as_in_the_driver(tmp_path):
    """The labeling run's path (Ray Data blocks, a local Ray started in the child) on a rerun over
    commit records plans what the driver's columnar planner plans, and reports its phases."""
    pytest.importorskip("moto.server")
    out = tmp_path / "planning.json"
    command = [sys.executable, str(SCRIPT), "--rows", str(ROWS), "--commits", str(COMMITS), "--modes", "columnar,ray",
               "--formats", "csv", "--outputs", "rerun", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"columnar", "ray"}
    assert set(results["ray"]["phases"]) == {"ray_start", "read_commits", "load_and_plan"}
    for row in results.values():
        assert (row["pending"], row["skipped"], row["refused"]) == (0, ROWS, 0), row
        assert row["peak_rss_mib"] > 0 and row["phases"]["read_commits"] > 0, row
