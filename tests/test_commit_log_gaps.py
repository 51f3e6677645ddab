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

from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import content_name, write_table
from irnet_ray.data.storage import StorageNotFound, StorageOptions, join
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
