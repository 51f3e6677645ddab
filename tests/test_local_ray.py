"""The commands' Ray next to a `ray start --head` on the same machine: a running one is used as it
is (said on stderr), and one killed without `ray stop` is ignored and a private Ray starts.
Before, `ray.init(num_cpus=...)` joined the
last `ray start` cluster and failed ("num_cpus and num_gpus must not be provided"), or hung on
a dead one.

Every process here gets its own TMPDIR, so Ray's "last cluster" file (``$TMPDIR/ray/
ray_current_cluster``) and session folders are this test's alone; the head runs in its own
process session and is killed by its process group (never `ray stop`, which would stop every
Ray on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
_PROBE = (
    "import sys, ray\n"
    "from irnet_ray.train.ray_train import ensure_ray\n"
    "ensure_ray(num_cpus=2, address=sys.argv[1] or None, include_dashboard=False)\n"
    "print('CPUS', int(ray.cluster_resources()['CPU']))\n"
)


def _env(tmpdir: str) -> dict:
    env = {**os.environ, "TMPDIR": tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TMPDIR", None)
    return env


def _probe(tmpdir: str, address: str = "") -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, address], env=_env(tmpdir), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cpus = [line for line in done.stdout.splitlines() if line.startswith("CPUS ")]
    return int(cpus[-1].split()[1]), done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_a_running_ray_start_cluster_is_used_and_a_dead_one_ignored():
    tmpdir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "3", "--port", str(port),
         "--include-dashboard", "false", "--object-store-memory", str(100 * 1024**2), "--disable-usage-stats"],
        env=_env(tmpdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        address_file = Path(tmpdir) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 90
        while not address_file.exists() or not address_file.read_text().strip():
            assert head.poll() is None and time.monotonic() < deadline, "the `ray start` head did not come up"
            time.sleep(0.5)

        cpus, said = _probe(tmpdir)
        assert cpus == 3 and "using the Ray cluster already running" in said  # joined as it is
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # died without `ray stop`: its address file stays
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
    time.sleep(1)
    assert address_file.exists()
    cpus, said = _probe(tmpdir)
    assert cpus == 2 and "is no longer running" in said
