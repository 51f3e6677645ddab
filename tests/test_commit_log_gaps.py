"""Gaps in the commit protocol's fast tests that mutation testing found (irnet_ray/pipeline/commit_log.py):
the manifest round trip, the orphan deletion rule, the errors table, copies without withdrawn rows,
withdrawals and the size of the committed-keys set. Local outputs in tmp_path; no Ray."""

from __future__ import annotations

import calendar
import json
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import content_name, write_table
from irnet_ray.data.storage import StorageNotFound, StorageOptions, join, list_files, write_bytes
from irnet_ray.pipeline import commit_log as cl

OPTIONS = StorageOptions()
JOB = {"format": of.FORMAT_NAME, "models": {"cam": {"uri": "c", "id": "1"}, "irn": {"uri": "i", "id": "2"}},
       "settings": {}, "settings_id": "s"}  # fmt: skip


def _error(image_id: str, occurrence: int = 0) -> dict:
    return of.error_row(image_id=image_id, uri=f"/img/{image_id}.png", classes=[1], stage="decode",
                        reason="not_an_image", message="bad", run_id="r", occurrence=occurrence)  # fmt: skip


def _deliver(output: str, ids: list[str], errors: tuple[str, ...] = ()) -> dict:
    """A writer task's result for ``ids`` (a data file named after them, a ``score`` column) and error rows."""
    path = f"{cl.DATA}/{content_name('part', ids)}"
    table = pa.table({"image_id": ids, "score": [float(len(i)) for i in ids]})
    write_table(join(output, cl.DATA), path.split("/")[-1], table, OPTIONS)
    inputs = [[i, 0, f"/img/{i}.png", f"{len(i)}:7"] for i in [*ids, *errors]]
    return {"file": {"path": path, "rows": len(ids), "bytes": 1}, "image_ids": list(ids),
            "errors": [_error(i) for i in errors], "inputs": inputs}  # fmt: skip


def _committer(output: str) -> cl.Committer:
    return cl.Committer(output, cl.prepare_output(output, JOB, OPTIONS, overwrite=False), OPTIONS, "run")


def _ids(output: str, path: str) -> list[str]:
    return pq.read_table(os.path.join(output, path)).column("image_id").to_pylist()


def _record(output: str, sequence: int) -> dict:
    with open(os.path.join(output, cl.COMMITS, f"{sequence:08d}.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------
# manifest


def test_manifest_round_trip_at_output_manifest_json(tmp_path):
    """write_manifest puts the fields plus a UTC `written` stamp in OUTPUT/_manifest.json; read_manifest reads it."""
    output = str(tmp_path / "out")
    assert cl.read_manifest(output, OPTIONS) is None  # no manifest: None, not an error
    given = {"files": [{"path": "data/part-x.parquet", "rows": 2}], "counts": {"labeled": 2}}
    before = time.time()
    cl.write_manifest(output, given, OPTIONS)
    assert given == {"files": [{"path": "data/part-x.parquet", "rows": 2}], "counts": {"labeled": 2}}  # not mutated
    assert sorted(os.listdir(output)) == ["_manifest.json"]
    with open(os.path.join(output, "_manifest.json"), encoding="utf-8") as f:
        on_disk = json.load(f)
    stamp = on_disk.pop("written")
    assert on_disk == {"files": [{"path": "data/part-x.parquet", "rows": 2}], "counts": {"labeled": 2}}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert int(before) - 1 <= calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) <= time.time() + 1
    assert cl.read_manifest(output, OPTIONS) == {**on_disk, "written": stamp}


# --------------------------------------------------------------------------------------
# orphans

STARTED = 1_700_000_000.0


def _file(output: str, relative: str, modified: float) -> None:
    path = os.path.join(output, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    os.utime(path, ns=(int(modified * 1e9), int(modified * 1e9)))


def _orphan_output(output: str) -> None:
    _file(output, "data/a-keep-old.parquet", STARTED - 100)  # committed, older than the lease
    _file(output, "data/b-keep-new.parquet", STARTED + 100)  # committed, written during this run
    _file(output, "data/c-mine-new.parquet", STARTED + 100)  # this run's orphan
    _file(output, "data/d-old.parquet", STARTED - 100)  # an orphan older than the lease
    _file(output, "data/e-other-new.parquet", STARTED + 100)  # another writer's, maybe in flight
    _file(output, "data/f-other-at-start.parquet", STARTED)  # modified at the lease start: not older
    _file(output, "errors/a-keep.parquet", STARTED - 100)
    _file(output, "errors/b-old.parquet", STARTED - 100)
    _file(output, "errors/c-other-new.parquet", STARTED + 100)


KEEP = ["data/a-keep-old.parquet", "data/b-keep-new.parquet", "errors/a-keep.parquet"]


def _left(output: str) -> list[str]:
    return sorted(f"{d}/{n}" for d in ("data", "errors") if os.path.isdir(os.path.join(output, d))
                  for n in os.listdir(os.path.join(output, d)))  # fmt: skip


def test_delete_orphans_deletes_only_own_or_older_uncommitted_files(tmp_path):
    """An orphan goes only if this run delivered it OR it is older than `started`; kept and in-flight files stay."""
    output = str(tmp_path / "out")
    _orphan_output(output)
    deleted = cl.delete_orphans(output, KEEP, OPTIONS, started=STARTED, written=["data/c-mine-new.parquet"])
    assert deleted == ["data/c-mine-new.parquet", "data/d-old.parquet", "errors/b-old.parquet"]
    assert _left(output) == ["data/a-keep-old.parquet", "data/b-keep-new.parquet", "data/e-other-new.parquet",
                             "data/f-other-at-start.parquet", "errors/a-keep.parquet",
                             "errors/c-other-new.parquet"]  # fmt: skip


def test_delete_orphans_without_start_deletes_every_uncommitted_file(tmp_path):
    """started=None means any age: every file not in `keep` is deleted, written or not; `keep` still stays."""
    output = str(tmp_path / "out")
    _orphan_output(output)
    deleted = cl.delete_orphans(output, KEEP, OPTIONS)
    assert deleted == ["data/c-mine-new.parquet", "data/d-old.parquet", "data/e-other-new.parquet",
                       "data/f-other-at-start.parquet", "errors/b-old.parquet",
                       "errors/c-other-new.parquet"]  # fmt: skip
    assert _left(output) == sorted(KEEP)


def test_delete_orphans_treats_an_unlistable_missing_folder_as_empty(tmp_path, monkeypatch):
    """A folder whose listing raises StorageNotFound is skipped as empty; the other folder is still cleaned."""
    output = str(tmp_path / "out")
    _orphan_output(output)
    real = cl.file_times

    def file_times(uri, options):
        if uri.endswith("/errors"):
            raise StorageNotFound("gone", uri)
        return real(uri, options)

    monkeypatch.setattr(cl, "file_times", file_times)
    deleted = cl.delete_orphans(output, KEEP, OPTIONS, started=STARTED, written=[])
    assert deleted == ["data/d-old.parquet"]
    assert "errors/b-old.parquet" in _left(output)


# --------------------------------------------------------------------------------------
# errors table


def test_write_errors_table_writes_every_committed_error_sorted(tmp_path):
    """All commits' error rows go to errors/errors-<hash of 'id\\x01occ'>.parquet, sorted by (id, occurrence)."""
    output = str(tmp_path / "out")
    commits = [{"sequence": 0, "errors": [_error("b", 1), _error("c")]},
               {"sequence": 1, "image_ids": ["x"]},  # no errors key at all
               {"sequence": 2, "errors": [_error("b", 0), _error("a")]}]  # fmt: skip
    written = cl.write_errors_table(output, commits, OPTIONS)
    name = content_name("errors", ["a\x010", "b\x010", "b\x011", "c\x010"])
    assert written["path"] == f"errors/{name}" and written["rows"] == 4
    assert written["bytes"] == os.path.getsize(os.path.join(output, "errors", name))
    table = pq.read_table(os.path.join(output, "errors", name))
    assert table.schema == of.ERROR_SCHEMA
    assert list(zip(table.column("image_id").to_pylist(), table.column("occurrence").to_pylist())) == [
        ("a", 0), ("b", 0), ("b", 1), ("c", 0)]  # fmt: skip


def test_write_errors_table_is_written_without_errors(tmp_path):
    """With no committed error the table is still written, empty, under the name of no keys."""
    output = str(tmp_path / "out")
    written = cl.write_errors_table(output, [{"sequence": 0, "image_ids": ["a"], "errors": []}], OPTIONS)
    name = content_name("errors", [])
    assert written["path"] == f"errors/{name}" and written["rows"] == 0
    assert pq.read_table(os.path.join(output, "errors", name)).num_rows == 0


# --------------------------------------------------------------------------------------
# copies of committed files without withdrawn rows


def test_copy_without_writes_a_copy_and_leaves_the_original(tmp_path):
    """copy_without drops exactly the given ids into data/<name of kept ids>; the original file is untouched."""
    output = str(tmp_path / "out")
    original = _deliver(output, ["a", "bb", "ccc"])["file"]["path"]
    copy = cl.copy_without(output, original, {"bb", "not-there"}, OPTIONS)
    assert copy["path"] == f"data/{content_name('part', ['a', 'ccc'])}" and copy["rows"] == 2
    assert copy["bytes"] == os.path.getsize(os.path.join(output, copy["path"]))
    table = pq.read_table(os.path.join(output, copy["path"]))
    assert table.column("image_id").to_pylist() == ["a", "ccc"] and table.column("score").to_pylist() == [1.0, 3.0]
    assert _ids(output, original) == ["a", "bb", "ccc"]
    one = cl.copy_without(output, original, {"a", "bb"}, OPTIONS)  # a single row left is still a file
    assert one["path"] == f"data/{content_name('part', ['ccc'])}" and one["rows"] == 1
    assert _ids(output, one["path"]) == ["ccc"]


def test_copy_without_every_row_writes_nothing(tmp_path):
    """Dropping every id returns None and writes no file."""
    output = str(tmp_path / "out")
    original = _deliver(output, ["a", "b"])["file"]["path"]
    assert cl.copy_without(output, original, {"a", "b"}, OPTIONS) is None
    assert os.listdir(os.path.join(output, "data")) == [original.split("/")[-1]]


# --------------------------------------------------------------------------------------
# withdrawals


def test_withdraw_replaces_data_files_and_lists_withdrawn_errors(tmp_path):
    """withdraw: a data key by a commit replacing its file with the kept ids, an error key by a `withdrawn` list."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    first = committer.commit(_deliver(output, ["a", "b", "c"]))["file"]["path"]
    second = committer.commit(_deliver(output, ["d"], errors=("e",)))["file"]["path"]
    third = committer.commit(_deliver(output, ["f", "g"]))["file"]["path"]
    assert committer.withdraw([("nobody", 0)]) == 0 and committer.sequence == 3  # nothing committed: no commit

    assert committer.withdraw([("b", 0), ("e", 0), ("g", 0)]) == 3  # one per replaced file, one for the errors
    assert committer.sequence == 6
    kept = f"data/{content_name('part', ['a', 'c'])}"
    replacing = _record(output, 3)
    assert replacing["file"]["path"] == kept and replacing["file"]["rows"] == 2
    assert replacing["image_ids"] == ["a", "c"] and replacing["errors"] == []
    assert replacing["withdrawn"] == [["b", 0]] and replacing["replaces"] == first
    assert replacing["inputs"] == [["a", 0, "/img/a.png", "1:7"], ["c", 0, "/img/c.png", "1:7"]]
    assert replacing["timings"] == {} and replacing["timed_images"] == 0
    other = _record(output, 4)
    assert other["image_ids"] == ["f"] and other["replaces"] == third and other["withdrawn"] == [["g", 0]]
    assert other["file"]["path"] == f"data/{content_name('part', ['f'])}"
    errors = _record(output, 5)
    assert errors["file"] is None and errors["image_ids"] == [] and errors["withdrawn"] == [["e", 0]]
    assert "replaces" not in errors
    assert _ids(output, first) == ["a", "b", "c"] and _ids(output, kept) == ["a", "c"]  # the replaced file stays
    assert kept in committer.delivered and kept in committer.committed_paths and second in committer.committed_paths
    keys = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0), ("f", 0), ("g", 0)]
    assert [k for k in keys if k in committer.committed] == [("a", 0), ("c", 0), ("d", 0), ("f", 0)]
    assert len(committer.committed) == 4


def test_withdraw_every_row_of_a_file_commits_no_file(tmp_path):
    """Withdrawing all ids of a data file makes a replacing commit with no file and no ids (no copy written)."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    only = committer.commit(_deliver(output, ["d"]))["file"]["path"]
    assert committer.withdraw([("d", 0)]) == 1
    record = _record(output, 1)
    assert record["file"] is None and record["image_ids"] == [] and record["inputs"] == []
    assert record["withdrawn"] == [["d", 0]] and record["replaces"] == only
    assert os.listdir(os.path.join(output, "data")) == [only.split("/")[-1]]
    assert ("d", 0) not in committer.committed and len(committer.committed) == 0


# --------------------------------------------------------------------------------------
# committed keys


def test_committed_keys_len_counts_earlier_added_and_removed_keys():
    """len(CommittedKeys): earlier keys, minus discarded earlier ones, plus added keys not held before."""
    keys = cl.CommittedKeys([("a", 0), ("b", 0), ("c", 1), ("a", 0)])
    assert len(keys) == 3  # a repeated key counts once
    keys.add(("a", 0))  # held before: no change
    assert len(keys) == 3
    keys.add(("d", 0))  # new
    assert len(keys) == 4
    keys.add(("d", 0))
    assert len(keys) == 4
    keys.discard(("b", 0))  # held before
    assert len(keys) == 3
    keys.discard(("b", 0))
    assert len(keys) == 3
    keys.discard(("d", 0))  # added, not held before
    assert len(keys) == 2
    keys.discard(("x", 0))  # never held
    assert len(keys) == 2
    keys.add(("b", 0))  # back again
    assert len(keys) == 3
    keys.discard(("a", 0))  # held before and added again
    assert len(keys) == 2
    assert sorted(k for k in [("a", 0), ("b", 0), ("c", 1), ("d", 0)] if k in keys) == [("b", 0), ("c", 1)]


def test_committed_keys_len_of_an_empty_start():
    """An empty CommittedKeys has length 0 and grows by one per new key added."""
    keys = cl.CommittedKeys()
    assert len(keys) == 0
    keys |= [("a", 0), ("a", 1), ("a", 0)]
    assert len(keys) == 2
    keys -= [("a", 0)]
    assert len(keys) == 1


# --------------------------------------------------------------------------------------
# the job record: what a rerun with other models or settings is told


def _refusal(output: str, job: dict) -> str:
    with pytest.raises(cl.JobInputError) as caught:
        cl.prepare_output(output, job, OPTIONS, overwrite=False)
    return str(caught.value)


def _advice(output: str, differences: str) -> str:
    return (f"output {output} holds labels made differently: {differences}. Pass --overwrite (overwrite=True) to "
            "delete them and start over, or choose another output folder")  # fmt: skip


def test_a_rerun_with_another_model_is_refused_naming_both_models(tmp_path):
    """The message names the kind, the new and the old model (URI and the id's first 19 characters), kinds sorted."""
    output = str(tmp_path / "out")
    old = {**JOB, "models": {"cam": {"uri": "c", "id": "1"}, "irn": {"uri": "i", "id": "0123456789abcdefghij-old"}}}
    cl.prepare_output(output, old, OPTIONS, overwrite=False)
    new = {**JOB, "models": {"cam": {"uri": "c2", "id": "9"}, "irn": {"uri": "i2", "id": "0123456789abcdefghij-new"}}}
    assert _refusal(output, new) == _advice(
        output, "CAM model c2 (9) is not the one used before (c, 1); "
        "IRN model i2 (0123456789abcdefghi) is not the one used before (i, 0123456789abcdefghi)")  # fmt: skip


def test_a_rerun_with_other_settings_is_refused_naming_the_changed_ones(tmp_path):
    """Changed and added settings are named, sorted, under the job's settings name ('label' by default);
    settings that differ only in their id (e.g. another output format) are called 'format'."""
    output = str(tmp_path / "out")
    cl.prepare_output(output, {**JOB, "settings": {"a": 1, "b": 2, "c": 3}, "settings_id": "s1"}, OPTIONS, False)
    changed = {**JOB, "settings": {"a": 1, "c": 4, "b": 5, "d": 6}, "settings_id": "s2"}
    assert _refusal(output, changed) == _advice(output, "label settings differ (b, c, d)")
    mining = {**changed, "settings_name": "mining"}
    assert _refusal(output, mining) == _advice(output, "mining settings differ (b, c, d)")
    same = {**JOB, "settings": {"a": 1, "b": 2, "c": 3}, "settings_id": "s3"}
    assert _refusal(output, same) == _advice(output, "label settings differ (format)")
    assert cl.prepare_output(output, {**same, "settings_id": "s1"}, OPTIONS, False).job["settings_id"] == "s1"


def test_a_job_record_without_models_or_settings_is_compared_as_empty(tmp_path):
    """An older job record lacking `models`, one kind of model or `settings`: the missing ones read as None."""
    output = str(tmp_path / "out")
    os.makedirs(output)
    with open(os.path.join(output, cl.JOB_RECORD), "w") as f:
        json.dump({"format": JOB["format"], "settings_id": "old"}, f)
    assert _refusal(output, {**JOB, "settings": {"x": 1}}) == _advice(
        output, "CAM model c (1) is not the one used before (None, None); "
        "IRN model i (2) is not the one used before (None, None); label settings differ (x)")  # fmt: skip
    with open(os.path.join(output, cl.JOB_RECORD), "w") as f:
        json.dump({**JOB, "models": {"cam": JOB["models"]["cam"]}}, f)
    assert _refusal(output, JOB) == _advice(output, "IRN model i (2) is not the one used before (None, None)")


# --------------------------------------------------------------------------------------
# starting over


def test_overwrite_clears_the_output_but_not_the_lease_or_other_files(tmp_path, monkeypatch):
    """--overwrite deletes the manifest first, then the commit log, data, errors and the job record, and
    writes the new job record; the lease folder and files outside the output's folders stay."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    committer.commit(_deliver(output, ["a", "b"], errors=("e",)))
    committer.snapshot()
    cl.write_errors_table(output, committer.commits, OPTIONS)
    cl.write_manifest(output, {"files": []}, OPTIONS)
    _file(output, "_lease/00000000.json", STARTED)
    _file(output, "notes/readme.txt", STARTED)
    deleted = []
    real = cl.delete_file
    monkeypatch.setattr(cl, "delete_file", lambda uri, options: deleted.append(uri) or real(uri, options))
    new = {**JOB, "settings_id": "other"}
    state = cl.prepare_output(output, new, OPTIONS, overwrite=True)
    assert state.job == new and state.commits == [] and state.previous_manifest is None
    assert deleted[0] == join(output, cl.MANIFEST) and deleted[-1] == join(output, cl.JOB_RECORD)
    assert len(deleted) == 6  # the manifest, the record, the snapshot, the data file, the errors table, the job record
    left = sorted(os.path.relpath(os.path.join(d, n), output) for d, _, names in os.walk(output) for n in names)
    assert left == ["_job.json", "_lease/00000000.json", "notes/readme.txt"]
    with open(os.path.join(output, cl.JOB_RECORD)) as f:
        assert json.load(f) == new


# --------------------------------------------------------------------------------------
# records: JSON of id lists read from snapshots


def test_records_holding_id_lists_are_written_as_json_lists():
    """_dump writes an IdList (a record's ids read from a snapshot) as a JSON list; anything else unknown is refused
    naming its type."""
    ids = cl.IdList(pa.array(["a", "b"], pa.string()))
    assert json.loads(cl._dump({"image_ids": ids, "n": 1})) == {"image_ids": ["a", "b"], "n": 1}
    with pytest.raises(TypeError, match=r"^set is not JSON serializable$"):
        cl._dump({"image_ids": {"a"}})


def test_id_lists_read_like_lists():
    """IdList: items and slices as Python values, equal to a list of the same ids only, repr of a list."""
    ids = cl.IdList(pa.array(["a", "b", "c"], pa.string()))
    assert ids[0] == "a" and ids[-1] == "c" and ids[1:] == ["b", "c"] and isinstance(ids[1:], list)
    assert ids == ["a", "b", "c"] and ids == ("a", "b", "c") and ids == cl.IdList(pa.array(["a", "b", "c"]))
    assert ids != ["a", "b"] and ids != ["a", "b", "x"] and ids != "abc" and ids != {"a", "b", "c"}
    assert cl.IdList(pa.array(["a", "b"])) != "ab" and cl.IdList(pa.array([], pa.string())) != ""
    assert repr(ids) == "['a', 'b', 'c']" and len(ids) == 3 and list(ids) == ["a", "b", "c"]


# --------------------------------------------------------------------------------------
# the committed keys as a table


def test_committed_table_of_an_empty_log_and_of_errors_or_data_alone():
    """No commit, only errors, only data rows: each is a table of COMMITTED_SCHEMA with the rows it holds."""
    empty = cl.committed_table([])
    assert empty.schema == cl.COMMITTED_SCHEMA and empty.num_rows == 0
    errors_only = cl.committed_table([{"sequence": 0, "file": None, "image_ids": [], "errors": [_error("e")],
                                       "inputs": [["e", 0, "/in/e.png", "f-e"]]}])  # fmt: skip
    assert errors_only.schema == cl.COMMITTED_SCHEMA
    assert errors_only.to_pylist() == [{"image_id": "e", "occurrence": 0, "uri": "/in/e.png", "fingerprint": "f-e",
                                        "reason": "not_an_image", "path": None}]  # fmt: skip
    data_only = cl.committed_table([{"sequence": 0, "file": {"path": "data/p.parquet"}, "image_ids": ["a"],
                                     "errors": [], "inputs": [["a", 0, "/in/a.png", "f-a"]]}])  # fmt: skip
    assert data_only.schema == cl.COMMITTED_SCHEMA
    assert data_only.to_pylist() == [{"image_id": "a", "occurrence": 0, "uri": "/in/a.png", "fingerprint": "f-a",
                                      "reason": None, "path": "data/p.parquet"}]  # fmt: skip


def test_committed_table_matches_inputs_by_sequence_and_falls_back_to_the_error_uri():
    """Keys find their inputs by the records' sequence numbers (not their positions); each data row names its file;
    an error committed before records had inputs takes its URI from the error row; retried keys are left out."""
    commits = [
        {"sequence": 5, "file": {"path": "data/p5.parquet"}, "image_ids": ["a", "b"],
         "inputs": [["a", 0, "/in/a.png", "f-a"], ["b", 0, "/in/b.png", "f-b"]]},  # no errors key
        {"sequence": 9, "file": None, "image_ids": [], "errors": [_error("c"), _error("d", 2)],
         "inputs": [["c", 0, "/in/c.png", "f-c"]]},  # d: no inputs row (an older record)
        {"sequence": 12, "file": {"path": "data/p12.parquet"}, "image_ids": ["e"], "errors": [_error("r", 1)],
         "inputs": [["e", 0, "/in/e.png", "f-e"], ["r", 1, "/in/r.png", "f-r"]]},
    ]  # fmt: skip
    table = cl.committed_table(commits, retried=[["r", "1"]])
    assert table.schema == cl.COMMITTED_SCHEMA
    assert table.to_pylist() == [
        {"image_id": "a", "occurrence": 0, "uri": "/in/a.png", "fingerprint": "f-a", "reason": None,
         "path": "data/p5.parquet"},
        {"image_id": "b", "occurrence": 0, "uri": "/in/b.png", "fingerprint": "f-b", "reason": None,
         "path": "data/p5.parquet"},
        {"image_id": "e", "occurrence": 0, "uri": "/in/e.png", "fingerprint": "f-e", "reason": None,
         "path": "data/p12.parquet"},
        {"image_id": "c", "occurrence": 0, "uri": "/in/c.png", "fingerprint": "f-c", "reason": "not_an_image",
         "path": None},
        {"image_id": "d", "occurrence": 2, "uri": "/img/d.png", "fingerprint": None, "reason": "not_an_image",
         "path": None},
    ]  # fmt: skip
    light, inputs = cl.split_inputs(commits)
    assert cl.committed_table(light, [("r", 1)], inputs) == table  # the same from the columnar inputs
    assert cl.committed_table(commits).num_rows == 6  # nothing retried: r too


def test_input_rows_need_commit_order_and_separate_the_key_parts():
    """_input_rows refuses inputs out of commit order (even two rows); a key's three parts are joined with a
    separator, so (1, '2a', 0) and (10, 'a', 2) stay two keys."""
    keys = pa.table({"sequence": pa.array([1, 10], pa.int64()), "image_id": ["x", "a"],
                     "occurrence": pa.array([0, 2], pa.int64())})  # fmt: skip
    unordered = pa.table({"sequence": pa.array([2, 1], pa.int64()), "image_id": ["x", "y"],
                          "occurrence": pa.array([0, 0], pa.int64())})  # fmt: skip
    with pytest.raises(ValueError, match=r"^the inputs table must be in commit order$"):
        cl._input_rows(keys, unordered)
    inputs = pa.table({"sequence": pa.array([1, 1, 10], pa.int64()), "image_id": ["2a", "x", "a"],
                       "occurrence": pa.array([0, 0, 2], pa.int64())})  # fmt: skip
    assert cl._input_rows(keys, inputs).to_pylist() == [1, 2]
    none = cl._input_rows(keys.slice(0, 0), inputs)
    assert none.type == pa.int64() and len(none) == 0


# --------------------------------------------------------------------------------------
# repairing a re-delivered file


def test_drop_rows_keeps_the_first_row_of_a_repeated_id_and_names_the_file_after_the_kept_ids(tmp_path):
    """drop_rows: rows of dropped ids go, a repeated id keeps its first row; the new file is data/<name of kept ids>
    with its rows and bytes; the old file is deleted."""
    output = str(tmp_path / "out")
    table = pa.table({"image_id": ["a", "b", "a", "c", "b"], "score": [1.0, 2.0, 3.0, 4.0, 5.0]})
    write_table(join(output, cl.DATA), "part-old.parquet", table, OPTIONS)
    new = cl.drop_rows(output, "data/part-old.parquet", {"c"}, OPTIONS, protected=["data/part-other.parquet"])
    name = content_name("part", ["a", "b"])
    assert new == {"path": f"data/{name}", "rows": 2, "bytes": os.path.getsize(os.path.join(output, "data", name))}
    assert pq.read_table(os.path.join(output, new["path"])).to_pydict() == {"image_id": ["a", "b"], "score": [1.0, 2.0]}
    assert os.listdir(os.path.join(output, "data")) == [name]


def test_drop_rows_never_rewrites_a_committed_file(tmp_path):
    """A committed path is refused before anything is read; so is a result named like a committed file."""
    output = str(tmp_path / "out")
    write_table(join(output, cl.DATA), "part-old.parquet", pa.table({"image_id": ["a", "b"]}), OPTIONS)
    with pytest.raises(ValueError, match=r"^data/part-old\.parquet is committed: it is never rewritten$"):
        cl.drop_rows(output, "data/part-old.parquet", set(), OPTIONS, protected=["data/part-old.parquet"])
    taken = f"data/{content_name('part', ['a'])}"
    with pytest.raises(ValueError, match=rf"^{re.escape(taken)} is committed: it is never rewritten$"):
        cl.drop_rows(output, "data/part-old.parquet", {"b"}, OPTIONS, protected=[taken])
    assert not os.path.exists(os.path.join(output, taken))


# --------------------------------------------------------------------------------------
# withdrawals of records as older runs wrote them


def test_withdraw_reads_records_without_error_or_id_lists(tmp_path):
    """Records lacking `errors` or `image_ids` (older writers) are withdrawn from like the others; the errors'
    withdrawal is a record of exactly file, image_ids, errors and withdrawn."""
    output = str(tmp_path / "out")
    cl.prepare_output(output, JOB, OPTIONS, overwrite=False)
    path = _deliver(output, ["a", "b"])["file"]["path"]
    commits = [{"sequence": 0, "file": {"path": path, "rows": 2, "bytes": 1}, "image_ids": ["a", "b"]},
               {"sequence": 1, "file": None, "errors": [_error("e")]}]  # fmt: skip
    committer = cl.Committer(output, cl.OutputState(job=JOB, commits=commits), OPTIONS, "run")
    assert committer.withdraw([("a", 0), ("e", 0)]) == 2
    replacing = _record(output, 2)
    assert replacing["image_ids"] == ["b"] and replacing["replaces"] == path and replacing["withdrawn"] == [["a", 0]]
    errors = _record(output, 3)
    assert {k: v for k, v in errors.items() if k not in ("created", "time")} == {
        "sequence": 3, "run_id": "run", "file": None, "image_ids": [], "errors": [], "withdrawn": [["e", 0]]}
    assert [k for k in [("a", 0), ("b", 0), ("e", 0)] if k in committer.committed] == [("b", 0)]


def test_withdrawing_every_row_of_a_file_reads_nothing(tmp_path, monkeypatch):
    """A file whose every row is withdrawn is not read (there is nothing to copy)."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    committer.commit(_deliver(output, ["a", "b"]))

    def read_table(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(cl, "read_table", read_table)
    assert committer.withdraw([("a", 0), ("b", 0)]) == 1
    assert _record(output, 1)["file"] is None and _record(output, 1)["image_ids"] == []


def test_copy_without_nothing_to_drop_names_the_file_itself(tmp_path):
    """Dropping no row gives the file's own name (the name of the ids it keeps) and all its rows."""
    output = str(tmp_path / "out")
    original = _deliver(output, ["a", "b"])["file"]["path"]
    copy = cl.copy_without(output, original, set(), OPTIONS)
    assert copy["path"] == original and copy["rows"] == 2 and _ids(output, original) == ["a", "b"]


# --------------------------------------------------------------------------------------
# the manifest's time stamp


def test_the_manifest_is_stamped_in_utc_whatever_the_local_time_zone(tmp_path, monkeypatch):
    """`written` is UTC even when the machine's local time zone is not."""
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: never the same hour as UTC
    time.tzset()
    try:
        output = str(tmp_path / "out")
        before = time.time()
        cl.write_manifest(output, {}, OPTIONS)
        stamp = cl.read_manifest(output, OPTIONS)["written"]
        assert int(before) - 1 <= calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) <= time.time() + 1
    finally:
        monkeypatch.undo()
        time.tzset()


# --------------------------------------------------------------------------------------
# the same protocol on S3 (moto over HTTP): every step passes the output's storage options on


def test_the_commit_protocol_passes_its_storage_options_on_s3(s3_server, s3_bucket, monkeypatch):
    """A run's every store operation on an S3 output (job record, commits, repair, withdrawal, errors table,
    orphans, manifest, starting over) reaches the endpoint of its options; the environment's default endpoint is
    a closed port, so a step that dropped the options fails."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    options = StorageOptions(endpoint_url=s3_server, max_attempts=1)
    output = f"s3://{s3_bucket}/out"

    def deliver(ids: list[str], errors: tuple[str, ...] = ()) -> dict:
        name = content_name("part", ids)
        write_table(join(output, cl.DATA), name, pa.table({"image_id": ids}), options)
        return {"file": {"path": f"{cl.DATA}/{name}", "rows": len(ids), "bytes": 1}, "image_ids": ids,
                "errors": [_error(i) for i in errors], "inputs": [[i, 0, f"/img/{i}", "f"] for i in [*ids, *errors]]}

    write_bytes(join(output, "_lease", "00000000.json"), b"{}", options)  # a lease: the folder is still new
    committer = cl.Committer(output, cl.prepare_output(output, JOB, options, overwrite=False), options, "run")
    committer.commit(deliver(["a", "b"], errors=("e",)))
    repaired = committer.commit(deliver(["b", "c"]))["file"]["path"]  # b committed: the file is rewritten
    assert repaired == f"data/{content_name('part', ['c'])}"
    write_table(join(output, cl.DATA), "part-orphan.parquet", pa.table({"image_id": ["z"]}), options)
    assert committer.withdraw([("a", 0), ("e", 0)]) == 2
    kept = [c["file"]["path"] for c in committer.standing if c.get("file")]
    assert kept == [repaired, f"data/{content_name('part', ['b'])}"]
    errors = cl.write_errors_table(output, committer.standing, options)
    assert errors["rows"] == 0
    committed = [f["path"] for f in cl.committed_files(committer.commits)]  # the replaced file too, as runs keep it
    assert len(committed) == 3
    asked = _counting_exists(monkeypatch)
    assert cl.files_exist(output, committed, options) == [True, True, True] and asked == []  # one listing
    real_resolve = cl.resolve

    def resolve(uri, options):
        if uri.rstrip("/").endswith("/data"):
            raise StorageNotFound("cannot list", uri)
        return real_resolve(uri, options)

    monkeypatch.setattr(cl, "resolve", resolve)
    assert cl.files_exist(output, committed + ["data/gone.parquet"], options) == [True, True, True, False]
    assert len(asked) == 4  # one check per file, with the options
    monkeypatch.setattr(cl, "resolve", real_resolve)
    with pytest.raises(cl.CommitConflict, match=r"already written by another run \(run\) while run late"):
        cl.write_commit(output, {"sequence": 0, "run_id": "late"}, options)
    deleted = cl.delete_orphans(output, committed + [errors["path"]], options, started=None)
    assert deleted == ["data/part-orphan.parquet"]
    cl.write_manifest(output, {"files": kept}, options)
    assert cl.read_manifest(output, options)["files"] == kept
    state = cl.prepare_output(output, {**JOB, "settings_id": "other"}, options, overwrite=True)
    assert state.commits == [] and cl.read_manifest(output, options) is None
    assert sorted(u[len(output) + 1:] for u in list_files(output, options)) == [cl.JOB_RECORD, "_lease/00000000.json"]


# --------------------------------------------------------------------------------------
# the job record of another job, and what a rerun reads


def test_a_folder_of_another_job_is_refused_naming_both_formats(tmp_path):
    output = str(tmp_path / "out")
    cl.prepare_output(output, {**JOB, "format": "other-format"}, OPTIONS, overwrite=False)
    with pytest.raises(cl.JobInputError) as caught:
        cl.prepare_output(output, JOB, OPTIONS, overwrite=True)  # not even --overwrite clears another job's folder
    assert str(caught.value) == (f"{join(output, cl.JOB_RECORD)} is not a record of this job ('other-format', "
                                 f"expected {JOB['format']!r}); choose another output folder")  # fmt: skip
    assert os.path.exists(os.path.join(output, cl.JOB_RECORD))


def test_a_rerun_reads_the_job_record_the_manifest_and_the_log(tmp_path):
    """A fresh output gets OUTPUT/_job.json; a rerun with the same job is handed the record, the previous manifest
    and the commits."""
    output = str(tmp_path / "out")
    fresh = cl.prepare_output(output, JOB, OPTIONS, overwrite=False)
    assert fresh.job == JOB and fresh.previous_manifest is None and fresh.commits == [] and fresh.next_sequence == 0
    with open(os.path.join(output, cl.JOB_RECORD)) as f:
        assert json.load(f) == JOB
    committer = cl.Committer(output, fresh, OPTIONS, "run")
    committer.commit(_deliver(output, ["a"]))
    cl.write_manifest(output, {"files": ["x"]}, OPTIONS)
    rerun = cl.prepare_output(output, JOB, OPTIONS, overwrite=False)
    assert rerun.previous_manifest == cl.read_manifest(output, OPTIONS) and rerun.previous_manifest["files"] == ["x"]
    assert [c["image_ids"] for c in rerun.commits] == [["a"]] and rerun.next_sequence == 1


def test_commit_keys_of_records_without_ids_or_errors():
    """commit_keys reads a record lacking `image_ids` or `errors` as having none."""
    assert cl.commit_keys({"sequence": 0}) == set()
    assert cl.commit_keys({"sequence": 0, "image_ids": ["a", 1]}) == {("a", 0), ("1", 0)}
    assert cl.commit_keys({"sequence": 0, "errors": [_error("e", 2)]}) == {("e", 2)}


# --------------------------------------------------------------------------------------
# snapshots


def test_a_committer_writes_a_snapshot_only_when_the_log_has_moved(tmp_path):
    """Committer.snapshot: nothing for an empty log, the snapshot of the last record once, then nothing until
    another record is written."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    assert committer.snapshot() is None
    committer.commit(_deliver(output, ["a"]))
    assert committer.snapshot() == "_commits/snapshot-00000000.parquet" and committer.snapshot_sequence == 0
    assert committer.snapshot() is None
    committer.commit(_deliver(output, ["b"]))
    assert committer.snapshot() == "_commits/snapshot-00000001.parquet" and committer.snapshot() is None


def test_snapshots_refuse_records_out_of_order_or_not_strict_json(tmp_path):
    """A snapshot's records must have increasing sequence numbers (two records suffice to check) and be strict JSON."""
    output = str(tmp_path / "out")
    empty = cl.INPUTS_SCHEMA.empty_table()
    for sequences in ([1, 0], [0, 0], [0, 2, 1]):
        with pytest.raises(ValueError, match=r"^commit records must be in commit order$"):
            cl.write_snapshot(output, [{"sequence": s} for s in sequences], empty, OPTIONS)
    with pytest.raises(ValueError, match="JSON"):
        cl.write_snapshot(output, [{"sequence": 0, "scores": {"miou": float("nan")}}], empty, OPTIONS)
    assert cl.write_snapshot(output, [], empty, OPTIONS) is None
    assert not os.path.exists(os.path.join(output, cl.COMMITS))


def test_a_snapshot_holds_records_without_inputs_in_row_groups_read_one_at_a_time(tmp_path, monkeypatch):
    """Records handed with their inputs lists are stored without them (the inputs are their own column); a snapshot
    is written in groups of _SNAPSHOT_ROW_GROUP records and read a group at a time, each record's ids a slice
    (IdList) of the group's id array; records read from a snapshot can be snapshot again."""
    monkeypatch.setattr(cl, "_SNAPSHOT_ROW_GROUP", 3)
    output = str(tmp_path / "out")
    committer = _committer(output)
    for n in range(8):
        committer.commit(_deliver(output, [f"i{n}", f"j{n}"], errors=("e",) if n == 0 else ()))
    written = cl.read_commits(output, OPTIONS)  # records with their inputs lists
    path = cl.write_snapshot(output, written, committer.inputs, OPTIONS)
    parquet = pq.ParquetFile(os.path.join(output, path))
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)] == [3, 3, 2]
    assert all("inputs" not in json.loads(text) for text in parquet.read().column("record").to_pylist())

    sizes = []
    real = cl.read_batches

    def read_batches(uri, options, *args):
        for table in real(uri, options, *args):
            sizes.append(table.num_rows)
            yield table

    monkeypatch.setattr(cl, "read_batches", read_batches)
    commits, inputs = cl.read_snapshot(join(output, path), OPTIONS)
    assert sizes == [3, 3, 2]
    assert all(isinstance(c["image_ids"], cl.IdList) for c in commits)
    assert cl.attach_inputs(commits, inputs) == written
    again = cl.write_snapshot(output, commits, inputs, OPTIONS)  # IdLists written back as JSON lists
    assert again == path and cl.attach_inputs(*cl.read_snapshot(join(output, again), OPTIONS)) == written


def test_a_snapshot_whose_sequences_do_not_match_its_records_is_skipped_with_a_warning(tmp_path):
    """A snapshot whose sequence column disagrees with its records is unreadable: read_commit_log warns naming it
    and the reason, and reads the JSON records instead."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    committer.commit(_deliver(output, ["a"]))
    committer.commit(_deliver(output, ["b"]))
    good = cl._snapshot_table(committer.commits, committer.inputs)
    bad = good.set_column(0, "sequence", pa.array([0, 5], pa.int64()))
    write_table(join(output, cl.COMMITS), "snapshot-00000001.parquet", bad, OPTIONS)
    uri = join(output, cl.COMMITS, "snapshot-00000001.parquet")
    message = (f"commit-log snapshot {uri} is unreadable (ValueError: its sequence column does not match its "
               "records); reading the records it covers instead")  # fmt: skip
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        commits, _ = cl.read_commit_log(output, OPTIONS)
    assert [list(c["image_ids"]) for c in commits] == [["a"], ["b"]]


# --------------------------------------------------------------------------------------
# the standing log: withdrawals, replaced files, transient errors


def test_effective_commits_drop_withdrawn_errors_and_replaced_files():
    """An error withdrawn by a later record no longer counts (ids and occurrences compared as str / int), one
    committed again at or after its withdrawal does; a replaced file's record keeps nothing but its other fields."""
    commits = [
        {"sequence": 0, "file": {"path": "data/p0"}, "image_ids": ["a", "b"], "scores": {"n": 2},
         "errors": [_error("e"), _error("k"), _error("7", 1)], "timings": {"x": 1}},
        {"sequence": 1, "file": None, "image_ids": [], "withdrawn": [["e", "0"], [7, "1"]]},  # no errors key
        {"sequence": 2, "file": None, "image_ids": [], "errors": [_error("e")], "withdrawn": [["w", 0]]},
        {"sequence": 3, "file": None, "image_ids": [], "errors": [_error("w")]},  # w: withdrawn before, committed now
        {"sequence": 4, "file": {"path": "data/p4"}, "image_ids": ["b"], "withdrawn": [["a", 0]],
         "replaces": "data/p0", "errors": [_error("s")], "withdrawn_and_kept": True},
        {"sequence": 5, "file": None, "image_ids": [], "errors": [_error("s")], "withdrawn": [["s", 0]]},
    ]  # fmt: skip
    standing = cl.effective_commits(iter(commits))
    assert standing[0] == {"sequence": 0, "file": None, "image_ids": [], "scores": None, "errors": [_error("k")],
                           "timings": {"x": 1}}  # fmt: skip
    assert standing[1:4] == commits[1:4]
    assert standing[4] == {**commits[4], "errors": []}  # s is withdrawn at 5
    assert standing[5] == commits[5]  # withdrawn and committed again in the same record: it stands
    assert commits[0]["file"] == {"path": "data/p0"} and len(commits[0]["errors"]) == 3  # the input is not changed


def test_transient_errors_are_the_standing_errors_worth_a_retry():
    """transient_errors: keys of standing errors whose reason may go away (TRANSIENT_REASONS), in log order."""
    def error(image_id: str, reason: str, occurrence: int = 0) -> dict:
        return {**_error(image_id, occurrence), "reason": reason}

    commits = [{"sequence": 0, "errors": [error("t", "unreachable"), error("p", "not_an_image"),
                                          error("u", "access_denied", 2)]},
               {"sequence": 1, "image_ids": ["x"]},
               {"sequence": 2, "errors": [], "withdrawn": [["u", 2]]}]  # fmt: skip
    assert set(of.TRANSIENT_REASONS) >= {"unreachable", "access_denied"} and "not_an_image" not in of.TRANSIENT_REASONS
    assert cl.transient_errors(commits) == [("t", 0)]
    assert cl.transient_errors(commits[:2]) == [("t", 0), ("u", 2)]


def test_attach_inputs_puts_the_lists_back_and_keeps_records_that_have_them():
    table = cl.split_inputs([{"sequence": 1, "inputs": [["a", 0, "/a", "f"]]}])[1]
    records = [{"sequence": 0, "inputs": [["z", 0, "/z", "g"]]}, {"sequence": 1}, {"sequence": 2}]
    assert cl.attach_inputs(records, table) == [{"sequence": 0, "inputs": [["z", 0, "/z", "g"]]},
                                                {"sequence": 1, "inputs": [["a", 0, "/a", "f"]]},
                                                {"sequence": 2, "inputs": []}]  # fmt: skip


# --------------------------------------------------------------------------------------
# the committer's own state and records


class _Lease:
    created = 1234.5

    def check(self) -> None:
        pass


def test_a_committer_starts_from_its_start_time_its_lease_or_now(tmp_path):
    output = str(tmp_path / "out")
    state = cl.prepare_output(output, JOB, OPTIONS, overwrite=False)
    assert cl.Committer(output, state, OPTIONS, "r", started=99.0, lease=_Lease()).started == 99.0
    assert cl.Committer(output, state, OPTIONS, "r", lease=_Lease()).started == 1234.5
    before = time.time()
    committer = cl.Committer(output, state, OPTIONS, "r")
    assert before <= committer.started <= time.time()
    assert committer.allow_local_output_on_cluster is False and committer.snapshot_sequence == -1
    assert committer.processed == committer.errors == committer.repaired == committer.duplicates == 0


def test_a_rerun_withdraws_transient_errors_first_and_can_snapshot_the_log_it_read(tmp_path):
    """Transient errors of earlier runs are withdrawn in a record of their own before anything else; a committer
    over a log of two records writes the snapshot of record 1 when asked."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    committer.commit({"file": None, "image_ids": [], "errors": [{**_error("t"), "reason": "unreachable"}],
                      "inputs": [["t", 0, "/img/t.png", "1:7"]]})  # fmt: skip
    committer.commit(_deliver(output, ["a"]))
    rerun = _committer(output)
    assert rerun.retried == [("t", 0)] and rerun.sequence == 3 and ("t", 0) not in rerun.committed
    record = _record(output, 2)
    assert {k: v for k, v in record.items() if k not in ("created", "time")} == {
        "sequence": 2, "run_id": "run", "file": None, "image_ids": [], "errors": [], "withdrawn": [["t", 0]]}
    other = str(tmp_path / "other")
    first = _committer(other)
    first.commit(_deliver(other, ["a"]))
    first.commit(_deliver(other, ["b"]))
    assert _committer(other).snapshot() == "_commits/snapshot-00000001.parquet"


def test_commit_records_carry_utc_creation_and_time_stamps(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        output = str(tmp_path / "out")
        committer = _committer(output)
        before = time.time()
        record = committer.commit(_deliver(output, ["a"]))
        after = time.time()
        assert record == _record(output, 0) and before <= record["time"] <= after
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["created"])
        created = calendar.timegm(time.strptime(record["created"], "%Y-%m-%dT%H:%M:%SZ"))
        assert int(before) - 1 <= created <= after + 1
    finally:
        monkeypatch.undo()
        time.tzset()


def test_commit_counts_and_repairs_repeated_ids_and_reads_partial_results(tmp_path):
    """A delivery repeating an id is repaired (first row kept); repairs, rows and errors are counted across
    commits; a result without `errors`, or without `file` and `image_ids`, is committed; summarize sees the ids
    committed."""
    output = str(tmp_path / "out")
    seen = []

    def summarize(meta: dict, ids: list) -> dict:
        seen.append(list(ids))
        return {"n": len(ids), "tag": meta.get("tag")}

    committer = cl.Committer(output, cl.prepare_output(output, JOB, OPTIONS, overwrite=False), OPTIONS, "run",
                             summarize=summarize)  # fmt: skip
    path = f"{cl.DATA}/{content_name('part', ['a', 'b', 'a'])}"
    write_table(join(output, cl.DATA), path.split("/")[-1], pa.table({"image_id": ["a", "b", "a"]}), OPTIONS)
    first = committer.commit({"file": {"path": path, "rows": 3, "bytes": 1}, "image_ids": ["a", "b", "a"], "tag": 7})
    assert first["image_ids"] == ["a", "b"] and first["errors"] == [] and first["n"] == 2 and first["tag"] == 7
    assert path in committer.delivered
    assert _ids(output, first["file"]["path"]) == ["a", "b"] and committer.repaired == 1
    second = committer.commit({**_deliver(output, ["b", "c"]), "errors": [_error("e")]})  # b is committed
    assert second["image_ids"] == ["c"] and committer.repaired == 2
    third = committer.commit({"errors": [_error("f"), _error("g")]})
    assert third["file"] is None and third["image_ids"] == [] and len(third["errors"]) == 2
    assert seen == [["a", "b"], ["c"], []]
    assert committer.processed == 3 and committer.errors == 3 and committer.duplicates == 0


# --------------------------------------------------------------------------------------
# reading the log: which files it lists, what a damaged output is told, where warnings point


def _counting_exists(monkeypatch) -> list[str]:
    asked = []
    real = cl.exists
    monkeypatch.setattr(cl, "exists", lambda uri, options: asked.append(uri) or real(uri, options))
    return asked


def test_files_exist_lists_each_folder_once_and_checks_files_one_by_one_only_where_it_cannot(tmp_path, monkeypatch):
    """Listable folders (a missing one included) are answered from one listing, with no per-file check; a folder
    that cannot be listed is answered by one check per file."""
    output = str(tmp_path / "out")
    for folder, name in (("data", "a.parquet"), ("data", "b.parquet"), ("deep", "c.parquet")):
        _file(output, f"{folder}/{name}", STARTED)
    _file(output, "top.json", STARTED)
    paths = ["data/a.parquet", "data/gone.parquet", "top.json", "errors/x.parquet", "deep/c.parquet",
             "data/b.parquet", "deep/gone.parquet", "nothing.json"]  # fmt: skip
    expected = [True, False, True, False, True, True, False, False]
    asked = _counting_exists(monkeypatch)
    assert cl.files_exist(output, paths, OPTIONS) == expected and asked == []

    real = cl.resolve

    def resolve(uri, options):
        if uri.rstrip("/").endswith("/deep") or uri.rstrip("/").endswith("/data"):
            raise StorageNotFound("cannot list", uri)
        return real(uri, options)

    monkeypatch.setattr(cl, "resolve", resolve)
    assert cl.files_exist(output, paths, OPTIONS) == expected
    assert sorted(asked) == sorted(join(output, p) for p in paths if p.split("/")[0] in ("data", "deep"))


def test_read_commit_log_reads_only_the_commit_folder(tmp_path):
    """A lease record (_lease/00000000.json) or a JSON file elsewhere named like a record is not a commit."""
    output = str(tmp_path / "out")
    committer = _committer(output)
    committer.commit(_deliver(output, ["a"]))
    _file(output, "_lease/00000005.json", STARTED)
    _file(output, "data/00000006.json", STARTED)
    commits, inputs = cl.read_commit_log(output, OPTIONS)
    assert [c["sequence"] for c in commits] == [0] and inputs.column("image_id").to_pylist() == ["a"]


def test_a_missing_committed_file_is_reported_with_what_to_do(tmp_path):
    output = str(tmp_path / "out")
    committer = _committer(output)
    path = committer.commit(_deliver(output, ["a"]))["file"]["path"]
    os.remove(os.path.join(output, path))
    with pytest.raises(cl.JobInputError) as caught:
        cl.read_commit_log(output, OPTIONS)
    assert str(caught.value) == (f"output {output} is damaged: {path} (commit 0) is missing; pass --overwrite "
                                 "(overwrite=True) to start over")  # fmt: skip


def test_an_unreadable_snapshot_warning_points_at_the_caller(tmp_path):
    output = str(tmp_path / "out")
    committer = _committer(output)
    committer.commit(_deliver(output, ["a"]))
    _file(output, "_commits/snapshot-00000000.parquet", STARTED)  # not Parquet
    with pytest.warns(UserWarning, match="is unreadable") as caught:
        cl.read_commit_log(output, OPTIONS)
    # Not commit_log.py itself (stacklevel=2: here in a plain run; mutmut's trampoline adds a frame of its own).
    assert len(caught) == 1 and not caught[0].filename.endswith(os.path.join("pipeline", "commit_log.py"))


# --------------------------------------------------------------------------------------
# a folder that is not an output, a taken record


def test_a_non_empty_folder_is_refused_unless_it_holds_only_a_lease(tmp_path):
    """A new output folder may hold a lease (_lease/...) and nothing else; otherwise the refusal counts the files
    and names the first one."""
    output = str(tmp_path / "out")
    _file(output, "_lease/00000000.json", STARTED)
    assert cl.prepare_output(output, JOB, OPTIONS, overwrite=False).job == JOB
    other = str(tmp_path / "other")
    _file(other, "_lease/00000000.json", STARTED)
    _file(other, "a/_lease/b.txt", STARTED)
    _file(other, "z.txt", STARTED)
    with pytest.raises(cl.JobInputError) as caught:
        cl.prepare_output(other, JOB, OPTIONS, overwrite=False)
    assert str(caught.value) == (f"output folder {other} is not empty and holds no {JOB['format']} output (2 file(s), "
                                 f"e.g. {join(other, 'a/_lease/b.txt')}); choose an empty or new folder")  # fmt: skip
    assert not os.path.exists(os.path.join(other, cl.JOB_RECORD))
    near = str(tmp_path / "near")
    _file(near, "X_lease/00000000.json", STARTED)  # not the lease folder
    with pytest.raises(cl.JobInputError, match=r"is not empty and holds no .* output \(1 file\(s\)"):
        cl.prepare_output(near, JOB, OPTIONS, overwrite=False)


def test_a_taken_record_names_the_run_that_took_it(tmp_path):
    output = str(tmp_path / "out")
    cl.write_commit(output, {"sequence": 3, "run_id": "first"}, OPTIONS)
    with pytest.raises(cl.CommitConflict) as caught:
        cl.write_commit(output, {"sequence": 3, "run_id": "second"}, OPTIONS)
    assert str(caught.value) == (f"commit 00000003 of {output} was already written by another run (first) while run "
                                 "second was writing: two runs are writing this output; this run stops, and what is "
                                 "committed stays (rerun once the other run has finished)")  # fmt: skip


def test_a_record_taken_and_cleared_in_the_meantime_names_an_unknown_run(tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    cl.write_commit(output, {"sequence": 0, "run_id": "first"}, OPTIONS)

    def cleared(uri, options):
        raise StorageNotFound("gone", uri)

    monkeypatch.setattr(cl, "_json", cleared)
    with pytest.raises(cl.CommitConflict, match=r"already written by another run \(unknown\) while run second"):
        cl.write_commit(output, {"sequence": 0, "run_id": "second"}, OPTIONS)


def test_records_and_manifests_are_indented_sorted_strict_json():
    """The bytes of a record or manifest: keys sorted, one space of indent, no NaN."""
    assert cl._dump({"b": 1, "a": [1]}) == b'{\n "a": [\n  1\n ],\n "b": 1\n}'
    with pytest.raises(ValueError, match="JSON"):
        cl._dump({"score": float("nan")})
