"""Safe commits: the output folder stays correct with re-delivered results, two writers, a dead
writer and multi-node clusters (docs/output-format.md, "Commit protocol and lease").

The unit tests need no Ray. The two-writer tests run the first ``irnet-ray label`` as its own
process (its own local Ray) and the second in this process: the second is refused before it
starts Ray, so only one Ray runs at a time on a 2-core machine.
"""

from __future__ import annotations

import collections
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from irnet_ray import model_files
from irnet_ray.cli import main
from irnet_ray.config import BackboneConfig, config_to_dict
from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import content_name
from irnet_ray.data.sources import builtin_spec, synthetic_records
from irnet_ray.data.storage import StorageOptions, exists, read_bytes, write_bytes
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.models.cam import CamNet
from irnet_ray.models.irnet import IRNet
from irnet_ray.pipeline import commit_log as cl
from irnet_ray.pipeline.lease import Lease, LeaseConfig, LeaseLost, OutputLeased, read_lease
from irnet_ray.pipeline.run import PipelineFailed, check_local_output, finish_output

DATA = SyntheticConfig(num_images=6, image_size=(48, 48), num_classes=2)
BACKBONE = BackboneConfig(arch="resnet18")
JOB = {"format": of.FORMAT_NAME, "models": {"cam": {"uri": "c", "id": "1"}, "irn": {"uri": "i", "id": "2"}},
       "settings": {}, "settings_id": "s"}  # fmt: skip


# --------------------------------------------------------------------------------------
# re-delivered commit metadata (no Ray)


def _parquet_bytes(table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _deliver(output: str, ids: list[str]) -> dict:
    """What a writer task delivers for ``ids``: the file named as the real writer names it (a
    content hash of the ids, so a retried write of the same ids has the same name)."""
    rows = [{**dict.fromkeys(of.LABEL_COLUMNS, ""), "image_id": i, "height": 1, "width": 1, "label_height": 1,
             "label_width": 1, "classes": [1], "class_names": ["a"], "semantic_png": b"x", "instances": []}
            for i in ids]  # fmt: skip
    path = f"{cl.DATA}/{content_name('part', ids)}"
    write_bytes(os.path.join(output, path), _parquet_bytes(of.labels_table(rows)))
    return {"file": {"path": path, "rows": len(ids), "bytes": 1}, "image_ids": list(ids), "errors": []}


def _committed_keys(commits) -> collections.Counter:
    return collections.Counter(k for c in cl.effective_commits(commits) for k in cl.commit_keys(c))


def test_a_redelivered_file_never_deletes_a_committed_file(tmp_path):
    output = str(tmp_path / "out")
    state = cl.prepare_output(output, JOB, StorageOptions(), overwrite=False)
    committer = cl.Committer(output, state, StorageOptions(), "run")
    first = _deliver(output, ["a", "b"])
    committer.commit(first)
    committed = first["file"]["path"]

    # The same result delivered again (a retried writer task): a duplicate, the file stays.
    again = committer.commit(json.loads(json.dumps(first)))
    assert again["file"] is None and again["image_ids"] == []
    assert os.path.exists(os.path.join(output, committed))
    # Another file with the committed ids plus new ones: only the new ones are committed, in a
    # file of another name; the committed file is untouched.
    delivered = _deliver(output, ["a", "b", "c"])
    bigger = committer.commit(delivered)
    assert bigger["image_ids"] == ["c"] and bigger["file"]["path"] not in (committed, None)
    assert pq.read_table(os.path.join(output, committed)).column("image_id").to_pylist() == ["a", "b"]
    # That file delivered again, after its repair removed it: every row is committed, nothing new.
    assert not os.path.exists(os.path.join(output, delivered["file"]["path"]))
    again = committer.commit(json.loads(json.dumps(delivered)))
    assert again["file"] is None and again["image_ids"] == [] and committer.duplicates == 2

    commits = cl.read_commits(output, StorageOptions())  # raised "damaged" before the fix
    keys = _committed_keys(commits)
    assert set(keys) == {("a", 0), ("b", 0), ("c", 0)} and max(keys.values()) == 1
    for f in cl.committed_files(commits):
        assert os.path.exists(os.path.join(output, f["path"]))
    # A rerun finds the output intact and finishes it.
    rerun_state = cl.prepare_output(output, JOB, StorageOptions(), overwrite=False)
    rerun = cl.Committer(output, rerun_state, StorageOptions(), "rerun")
    manifest = finish_output(output, rerun, {("a", 0), ("b", 0), ("c", 0)}, StorageOptions(), dict(JOB))
    listed = [os.path.join(output, f["path"]) for f in manifest["data_files"]]
    assert sorted(i for path in listed for i in pq.read_table(path).column("image_id").to_pylist()) == ["a", "b", "c"]


def test_a_taken_sequence_number_is_never_overwritten(tmp_path):
    """Two committers that started from the same commit log: the second one's record would have
    replaced the first's; now it stops with an error naming the other writer's record."""
    output = str(tmp_path / "out")
    state = cl.prepare_output(output, JOB, StorageOptions(), overwrite=False)
    one = cl.Committer(output, state, StorageOptions(), "one")
    two = cl.Committer(output, state, StorageOptions(), "two")
    one.commit(_deliver(output, ["a"]))
    with pytest.raises(cl.CommitConflict, match="another run"):
        two.commit(_deliver(output, ["b"]))
    [record] = cl.read_commits(output, StorageOptions())
    assert record["run_id"] == "one" and record["image_ids"] == ["a"]


def test_the_manifest_is_not_written_when_a_listed_file_is_missing(tmp_path):
    output = str(tmp_path / "out")
    state = cl.prepare_output(output, JOB, StorageOptions(), overwrite=False)
    committer = cl.Committer(output, state, StorageOptions(), "run")
    gone = committer.commit(_deliver(output, ["a"]))["file"]["path"]
    committer.commit(_deliver(output, ["b"]))
    os.unlink(os.path.join(output, gone))
    with pytest.raises(PipelineFailed, match=gone):
        finish_output(output, committer, {("a", 0), ("b", 0)}, StorageOptions(), dict(JOB))
    assert not os.path.exists(os.path.join(output, cl.MANIFEST))


def test_orphans_of_a_concurrent_writer_are_not_deleted(tmp_path):
    """An uncommitted file older than the run is an orphan of a dead run (deleted); one written
    after the run started by someone else is left alone."""
    output = str(tmp_path / "out")
    state = cl.prepare_output(output, JOB, StorageOptions(), overwrite=False)
    old = _deliver(output, ["old"])["file"]["path"]  # left by a run killed an hour ago
    past = time.time() - 3600
    os.utime(os.path.join(output, old), (past, past))
    committer = cl.Committer(output, state, StorageOptions(), "run", started=time.time() - 1)
    committer.commit(_deliver(output, ["a"]))
    foreign = _deliver(output, ["foreign"])["file"]["path"]  # not delivered to this committer
    finish_output(output, committer, {("a", 0)}, StorageOptions(), dict(JOB))
    assert not os.path.exists(os.path.join(output, old))
    assert os.path.exists(os.path.join(output, foreign))


# --------------------------------------------------------------------------------------
# the lease (no Ray)


def _age(lease: Lease, seconds: float) -> None:
    """Make ``lease`` look as if its holder stopped ``seconds`` ago (its last heartbeat)."""
    document = json.loads(read_bytes(lease.uri))
    document["heartbeat_time"] -= seconds
    write_bytes(lease.uri, json.dumps(document).encode())


def test_a_fresh_lease_is_refused_and_a_stale_one_is_taken_over(tmp_path):
    output = str(tmp_path / "out")
    quiet = LeaseConfig(heartbeat_s=300, timeout_s=600)  # no renewal during the test
    holder = Lease.acquire(output, StorageOptions(), "run-one", quiet)
    with pytest.raises(OutputLeased) as refused:
        Lease.acquire(output, StorageOptions(), "run-two", quiet)
    message = str(refused.value)
    assert "\n" not in message and "run-one" in message and str(os.getpid()) in message
    assert socket.gethostname() in message and "--take-over-lease" in message

    _age(holder, 601)
    taker = Lease.acquire(output, StorageOptions(), "run-two", quiet)
    assert read_lease(output, StorageOptions())["run_id"] == "run-two"
    with pytest.raises(LeaseLost, match="run-two"):
        holder.check()
    holder.release()  # the old holder's release does not remove the new holder's lease
    assert read_lease(output, StorageOptions())["run_id"] == "run-two"
    # Fresh: refused, unless the take-over is forced.
    with pytest.raises(OutputLeased, match="run-two"):
        Lease.acquire(output, StorageOptions(), "run-three", quiet)
    forced = Lease.acquire(output, StorageOptions(), "run-three", LeaseConfig(heartbeat_s=300, take_over=True))
    with pytest.raises(LeaseLost):
        taker.check()
    forced.release()
    assert read_lease(output, StorageOptions()) is None
    Lease.acquire(output, StorageOptions(), "run-four", quiet).release()


def test_the_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(tmp_path):
    output = str(tmp_path / "out")
    quiet = LeaseConfig(heartbeat_s=300, timeout_s=600)
    holder = Lease.acquire(output, StorageOptions(), "killed", quiet)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that existed and is gone (reaped), like a SIGKILLed driver's
    document = json.loads(read_bytes(holder.uri))
    write_bytes(holder.uri, json.dumps({**document, "pid": dead.pid}).encode())
    Lease.acquire(output, StorageOptions(), "next", quiet).release()
    # The same record from another machine (or container) is not judged by pid: it is fresh.
    other = Lease.acquire(output, StorageOptions(), "other", quiet)
    document = json.loads(read_bytes(other.uri))
    write_bytes(other.uri, json.dumps({**document, "pid": dead.pid, "boot_id": "another-machine"}).encode())
    with pytest.raises(OutputLeased, match="other"):
        Lease.acquire(output, StorageOptions(), "next", quiet)


def test_two_takers_of_a_stale_lease_one_wins(tmp_path):
    output = str(tmp_path / "out")
    quiet = LeaseConfig(heartbeat_s=300, timeout_s=600)
    _age(Lease.acquire(output, StorageOptions(), "dead", quiet), 601)
    results: dict[str, object] = {}
    barrier = threading.Barrier(4)

    def take(name: str) -> None:
        barrier.wait()
        try:
            results[name] = Lease.acquire(output, StorageOptions(), name, quiet)
        except OutputLeased as error:
            results[name] = error

    threads = [threading.Thread(target=take, args=(f"taker-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if isinstance(r, Lease)]
    assert len(winners) == 1 and read_lease(output, StorageOptions())["run_id"] == winners[0]


def test_the_heartbeat_renews_the_lease(tmp_path):
    output = str(tmp_path / "out")
    lease = Lease.acquire(output, StorageOptions(), "run", LeaseConfig(heartbeat_s=0.2, timeout_s=600))
    try:
        first = read_lease(output, StorageOptions())["heartbeat_time"]
        deadline = time.monotonic() + 10
        while read_lease(output, StorageOptions())["heartbeat_time"] == first:
            assert time.monotonic() < deadline, "no heartbeat within 10 s"
            time.sleep(0.1)
    finally:
        lease.release()
    assert read_lease(output, StorageOptions()) is None


# --------------------------------------------------------------------------------------
# two `irnet-ray label` runs on one output


def _save_models(folder: Path) -> tuple[str, str]:
    vocabulary = synthetic_records(DATA)[1]
    torch.manual_seed(0)
    cam = CamNet(BACKBONE, vocabulary.num_classes)
    irn = IRNet(cam.backbone.channels)
    config = {"backbone": config_to_dict(BACKBONE)}
    cam_uri, irn_uri = str(folder / "cam"), str(folder / "irn")
    model_files.save_model(cam_uri, kind="cam", state_dict=cam.state_dict(), config=config, vocabulary=vocabulary,
                           metrics=[])  # fmt: skip
    model_files.save_model(irn_uri, kind="irn", state_dict=irn.state_dict(), config={**config, "cam_model": cam_uri},
                           vocabulary=vocabulary, metrics=[])  # fmt: skip
    return cam_uri, irn_uri


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _save_models(tmp_path_factory.mktemp("models"))


def _label_args(cam_uri: str, irn_uri: str, output: str, endpoint: str | None) -> list[str]:
    return ["label", "--images", builtin_spec(DATA), "--cam", cam_uri, "--irn", irn_uri, "--output", output,
            "--max-side", "48", "--scales", "1.0", "--walk-steps", "8", "--batch-size", "2", "--rows-per-file", "2",
            "--cpus-per-actor", "0.5", "--gpus-per-actor", "0", "--max-actors", "1", "--no-eval",
            *(["--endpoint-url", endpoint] if endpoint else [])]  # fmt: skip


@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_label_run_on_a_running_output_is_refused(where, models, tmp_path, request, capsys):
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        output, options, endpoint = f"s3://{bucket}/labels", StorageOptions(endpoint_url=server), server
    else:
        output, options, endpoint = str(tmp_path / "out"), StorageOptions(), None
    args = _label_args(*models, output, endpoint)
    first = subprocess.Popen([sys.executable, "-m", "irnet_ray.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        # The job record is written once the first run holds the output (before the fix: once it
        # started writing there).
        while not exists(f"{output}/{cl.JOB_RECORD}", options):
            assert first.poll() is None, f"the first run ended early: {first.stdout.read()}"
            assert time.monotonic() < deadline, "the first run wrote nothing within 60 s"
            time.sleep(0.2)
        refused_at = time.monotonic()
        capsys.readouterr()
        status = main(args)
        err = capsys.readouterr().err.strip()
        assert status == 2, err
        assert time.monotonic() - refused_at < 30
        assert len(err.splitlines()) == 1 and f"pid {first.pid}" in err and socket.gethostname() in err
        assert first.poll() is None, "the first run must still be running when the second is refused"
        assert first.wait(timeout=120) == 0, first.stdout.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    manifest = json.loads(read_bytes(f"{output}/{cl.MANIFEST}", options))
    listed = [f["path"] for f in manifest["data_files"]] + [manifest["errors_file"]["path"]]
    assert all(exists(f"{output}/{path}", options) for path in listed)
    tables = [pq.read_table(io.BytesIO(read_bytes(f"{output}/{f['path']}", options))) for f in manifest["data_files"]]
    ids = [i for table in tables for i in table.column("image_id").to_pylist()]
    errors = pq.read_table(io.BytesIO(read_bytes(f"{output}/{manifest['errors_file']['path']}", options)))
    keys = collections.Counter(ids + errors.column("image_id").to_pylist())
    assert keys == collections.Counter(r.image_id for r in synthetic_records(DATA)[0])
    assert read_lease(output, options) is None  # released at the end of the first run


# --------------------------------------------------------------------------------------
# local outputs on clusters


@pytest.mark.timeout(180)
def test_a_local_output_is_refused_on_a_two_node_cluster(models, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from irnet_ray.label import LabelJobConfig, LabelJobError, label_images

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        output = tmp_path / "out"
        with pytest.raises(LabelJobError, match="its own disk") as refused:
            label_images(builtin_spec(DATA), *models, str(output), LabelJobConfig(max_side=48, gpus_per_actor=0))
        assert "\n" not in str(refused.value) and "--allow-local-output-on-cluster" in str(refused.value)
        assert not (output / cl.MANIFEST).exists()
        check_local_output(str(output), allow=True)  # a shared mount, said so
        check_local_output("s3://bucket/labels", allow=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
