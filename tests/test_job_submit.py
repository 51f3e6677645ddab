"""`ray job submit` against a real Ray head with its dashboard, as users launch the jobs.

The head runs in its own process session and temp dir (so no other test's ``ray.init()``
finds it) and is torn down by killing that session, never with ``ray stop`` (which would stop
every Ray instance on the machine). Token authentication is switched off for this throwaway
loopback cluster, on the head and in the client alike.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rjs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "4", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
         "--object-store-memory", str(200 * 1024**2), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
                    json.loads(response.read())
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not start (exit status {head.poll()})")
                time.sleep(1)
        yield address, env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)


def _submit(address: str, env: dict, *job: str) -> subprocess.CompletedProcess:
    # The entrypoint names this interpreter: the head's PATH need not lead to the virtual env.
    runtime_env = {"excludes": [".venv", ".git", "runs", "__pycache__", ".pytest_cache"]}
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, *job],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.timeout(600)
def test_train_cam_job_submitted_to_a_cluster(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "runs"
    done = _submit(address, env, "jobs/train_cam.py", "--images", "builtin:num_images=8,image_size=64x64,num_classes=2",
                   "--storage", str(storage), "--run-name", "cam", "--arch", "resnet18", "--train-batchnorm",
                   "--first-trainable-stage", "0", "--epochs", "1", "--batch-size", "2", "--crop", "64",
                   "--long-side", "56,64", "--num-workers", "2", "--cpus-per-worker", "0.5")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CAM model:" in done.stdout
    meta = json.loads((storage / "cam" / "model" / "model.json").read_text())
    assert meta["kind"] == "cam" and len(meta["metrics"]) == 1

    # A user mistake inside a submitted job: the job fails with the one-line message in its logs.
    failed = _submit(address, env, "jobs/train_cam.py", "--images", str(tmp_path / "nowhere"), "--storage",
                     str(storage), "--run-name", "other", "--from-scratch")  # fmt: skip
    assert failed.returncode != 0
    assert "irnet-ray train-cam: image set not found" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout
