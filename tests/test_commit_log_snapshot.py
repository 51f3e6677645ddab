"""The commit log compacts: snapshots of the log read as the JSON records they copy, a rerun
reads one snapshot and the records after it, an unreadable snapshot falls back to the records,
and the committed keys live in :class:`CommittedKeys` (digests, not a Python set of tuples).
Locally and on S3 (moto over HTTP). No Ray."""

from __future__ import annotations

import hashlib
import itertools
import os

import pyarrow as pa
import pytest

from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import content_name, write_table
from irnet_ray.data.storage import StorageOptions, join, list_files, write_bytes
from irnet_ray.pipeline import commit_log as cl
from irnet_ray.pipeline.run import finish_output

JOB = {"format": of.FORMAT_NAME, "models": {"cam": {"uri": "c", "id": "1"}, "irn": {"uri": "i", "id": "2"}},
       "settings": {}, "settings_id": "s"}  # fmt: skip


def _deliver(output: str, ids: list[str], options: StorageOptions, errors: tuple[str, ...] = ()) -> dict:
    """A writer task's result for ``ids`` (a data file named after them) and error rows for ``errors``."""
    path = f"{cl.DATA}/{content_name('part', ids)}"
    write_table(join(output, cl.DATA), path.split("/")[-1], pa.table({"image_id": ids}), options)
    rows = [of.error_row(image_id=i, uri=f"/img/{i}.png", classes=[1], stage="decode", reason="not_an_image",
                         message="bad", run_id="r", occurrence=0) for i in errors]  # fmt: skip
    inputs = [[i, 0, f"/img/{i}.png", f"{len(i)}:7"] for i in [*ids, *errors]]
    return {"file": {"path": path, "rows": len(ids), "bytes": 1}, "image_ids": list(ids), "errors": rows,
            "inputs": inputs}  # fmt: skip


def _json_only(output: str, options: StorageOptions) -> list[dict]:
    """Every JSON record, read one by one (what the log holds, ignoring snapshots)."""
    uris = [u for u in list_files(join(output, cl.COMMITS), options, suffixes=(".json",))]
    return sorted(cl._parallel_read(uris, options), key=lambda c: c["sequence"])


def _snapshots(output: str, options: StorageOptions) -> list[str]:
    return sorted(u.rsplit("/", 1)[-1] for u in list_files(join(output, cl.COMMITS), options, suffixes=(".parquet",)))


def _log_with_snapshots(output: str, options: StorageOptions, monkeypatch) -> cl.Committer:
    monkeypatch.setattr(cl, "SNAPSHOT_EVERY", 3)
    monkeypatch.setattr(cl, "_SNAPSHOT_ROW_GROUP", 2)  # snapshots of several row groups, read a group at a time
    committer = cl.Committer(output, cl.prepare_output(output, JOB, options, overwrite=False), options, "run")
    for n in range(7):
        committer.commit(_deliver(output, [f"img{n}a", f"img{n}b"], options, errors=(f"bad{n}",) if n % 2 else ()))
    return committer


def _check_snapshots(output: str, options: StorageOptions, monkeypatch) -> None:
    _log_with_snapshots(output, options, monkeypatch)
    # Records 0..2 and 0..5 were copied when the log reached 3 and 6 records.
    assert _snapshots(output, options) == ["snapshot-00000002.parquet", "snapshot-00000005.parquet"]
    written = _json_only(output, options)
    assert cl.read_commits(output, options) == written  # snapshot 5 + record 6 read as the records

    commits, inputs = cl.read_snapshot(join(output, cl.COMMITS, "snapshot-00000005.parquet"), options)
    assert cl.attach_inputs(commits, inputs) == written[:6]
    assert inputs.schema == cl.INPUTS_SCHEMA and inputs.num_rows == sum(len(c["inputs"]) for c in written[:6])

    # A rerun starts from the log as read through the snapshot: numbering goes on, nothing
    # committed is committed again, and the keys table is the one of the records.
    state = cl.prepare_output(output, JOB, options, overwrite=False)
    assert state.next_sequence == 7 and all("inputs" not in c for c in state.commits)
    rerun = cl.Committer(output, state, options, "rerun")
    assert ("img3a", 0) in rerun.committed and ("bad3", 0) in rerun.committed and ("new", 0) not in rerun.committed
    assert rerun.committed_table().sort_by("image_id") == cl.committed_table(written).sort_by("image_id")
    rerun.commit(_deliver(output, ["img0a", "new"], options))  # a re-delivered committed id is dropped
    assert cl.read_commits(output, options)[-1]["image_ids"] == ["new"]


def test_snapshots_read_as_the_records_local(tmp_path, monkeypatch):
    _check_snapshots(str(tmp_path / "out"), StorageOptions(), monkeypatch)


def test_snapshots_read_as_the_records_s3(s3_server, s3_bucket, monkeypatch):
    _check_snapshots(f"s3://{s3_bucket}/out", StorageOptions(endpoint_url=s3_server), monkeypatch)


def test_a_finished_run_leaves_a_current_snapshot(tmp_path, monkeypatch):
    output, options = str(tmp_path / "out"), StorageOptions()
    committer = _log_with_snapshots(output, options, monkeypatch)
    expected = {(f"img{n}{s}", 0) for n in range(7) for s in "ab"} | {(f"bad{n}", 0) for n in range(1, 7, 2)}
    manifest = finish_output(output, committer, expected, options, dict(JOB), max_error_rate=1.0)
    assert manifest["rows"] == 14 and manifest["errors"] == 3
    # The rerun of a finished output reads one snapshot and no JSON record.
    assert _snapshots(output, options)[-1] == "snapshot-00000006.parquet"
    read = []
    monkeypatch.setattr(cl, "_parallel_read", lambda uris, options: read.extend(uris) or [])
    commits, _ = cl.read_commit_log(output, options)
    assert read == [] and [c["sequence"] for c in commits] == list(range(7))


def test_an_unreadable_snapshot_falls_back_to_the_records(tmp_path, monkeypatch):
    output, options = str(tmp_path / "out"), StorageOptions()
    _log_with_snapshots(output, options, monkeypatch)
    write_bytes(join(output, cl.COMMITS, "snapshot-00000005.parquet"), b"not parquet", options)
    with pytest.warns(UserWarning, match="snapshot-00000005.parquet is unreadable"):
        commits = cl.read_commits(output, options)
    assert commits == _json_only(output, options)  # through snapshot 2 and records 3..6
    os.remove(os.path.join(output, cl.COMMITS, "snapshot-00000002.parquet"))
    with pytest.warns(UserWarning):
        assert cl.read_commits(output, options) == _json_only(output, options)


def test_withdrawing_a_key_read_from_a_snapshot(tmp_path, monkeypatch):
    """A changed input relabelled after a rerun read the log from its snapshot: the replacing
    commit carries the kept images' inputs, which came from the snapshot's table."""
    output, options = str(tmp_path / "out"), StorageOptions()
    _log_with_snapshots(output, options, monkeypatch)
    rerun = cl.Committer(output, cl.prepare_output(output, JOB, options, overwrite=False), options, "rerun")
    assert rerun.withdraw([("img1a", 0)]) == 1
    replacing = cl.read_commits(output, options)[-1]
    assert replacing["withdrawn"] == [["img1a", 0]] and replacing["image_ids"] == ["img1b"]
    assert replacing["inputs"] == [["img1b", 0, "/img/img1b.png", "5:7"]]
    assert ("img1a", 0) not in rerun.committed and ("img1b", 0) in rerun.committed


def test_keys_find_their_inputs_a_range_of_commits_at_a_time(tmp_path, monkeypatch):
    """The keys table finds the URI and fingerprint each key was made from a slice of keys at a
    time (bounded memory): with slices of 1 and 3 keys it equals the one made in one slice, and
    a key withdrawn and committed again from another file takes the URI of the commit that
    stands, not the first one that named it."""
    output, options = str(tmp_path / "out"), StorageOptions()
    committer = _log_with_snapshots(output, options, monkeypatch)
    assert committer.withdraw([("img2a", 0), ("bad3", 0)]) == 2
    again = _deliver(output, ["img2a"], options, errors=("bad3",))
    again["inputs"] = [["img2a", 0, "/moved/img2a.png", "9:9"], ["bad3", 0, "/moved/bad3.png", "9:9"]]
    committer.commit(again)
    whole = committer.committed_table().sort_by("image_id")
    by_id = {r["image_id"]: r for r in whole.to_pylist()}
    assert (by_id["img2a"]["uri"], by_id["img2a"]["fingerprint"]) == ("/moved/img2a.png", "9:9")
    assert (by_id["bad3"]["uri"], by_id["bad3"]["fingerprint"]) == ("/moved/bad3.png", "9:9")
    assert (by_id["img4b"]["uri"], by_id["img4b"]["fingerprint"]) == ("/img/img4b.png", "5:7")
    for rows in (1, 3):
        monkeypatch.setattr(cl, "_MATCH_ROWS", rows)
        assert committer.committed_table().sort_by("image_id") == whole
        rerun = cl.Committer(output, cl.prepare_output(output, JOB, options, overwrite=False), options, "rerun")
        assert rerun.committed_table().sort_by("image_id") == whole


def _digest_ends_in_nul() -> tuple[str, int]:
    for n in itertools.count():
        key = (f"id{n}", 0)
        if hashlib.blake2b(f"{key[0]}\x1f0".encode(), digest_size=16).digest().endswith(b"\x00"):
            return key
    raise AssertionError


def test_committed_keys_is_a_set():
    nul = _digest_ends_in_nul()  # NumPy drops trailing NUL bytes of byte strings read back
    keys = cl.CommittedKeys([("a", 0), ("b", 1), nul])
    assert ("a", 0) in keys and ("b", 1) in keys and nul in keys
    assert ("a", 1) not in keys and ("b", 0) not in keys and ("c", 0) not in keys
    assert len(keys) == 3
    keys |= {("c", 0), ("a", 0)}
    keys -= {("b", 1), ("zz", 0)}
    assert ("c", 0) in keys and ("b", 1) not in keys and len(keys) == 3
    keys.add(("b", 1))
    assert ("b", 1) in keys and keys.missing([("b", 1), ("d", 0), ("a", 3)]) == [("a", 3), ("d", 0)]
    assert len(cl.CommittedKeys()) == 0 and ("a", 0) not in cl.CommittedKeys()
