"""Smoke test of benchmarks/label_planning.py at 20,000 rows: both planning paths (columnar and
records) on a fresh output and a rerun over commit records on a moto S3 server agree on the
counts, and every mode reports a time and a peak memory (no timing bars: shared machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_planning.py"


@pytest.mark.timeout(60)
def test_benchmark_plans_20000_rows_both_ways(tmp_path):
    pytest.importorskip("moto.server")
    out = tmp_path / "planning.json"
    command = [sys.executable, str(SCRIPT), "--rows", "20000", "--commits", "100", "--old-timeout", "50",
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=58)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| output | manifest | mode | seconds | driver peak MiB |" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert len(results) == 8
    for row in results:
        assert not row.get("timed_out") and row["seconds"] > 0 and row["peak_rss_mib"] > 0
        expected = (20000, 0) if row["output"] == "fresh" else (0, 20000)
        assert (row["pending"], row["skipped"], row["refused"]) == (*expected, 0), row
