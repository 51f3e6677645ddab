"""Image sets read by Ray Data and planned block by block (irnet_ray.pipeline.inputs): the
streamed reading equals the driver's reader, and the streamed plan equals ``plan_table`` on the
whole table, also when ids repeat across blocks and when unrelated ids share a hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from irnet_ray.data.columnar import IMAGE_TABLE_SCHEMA, add_fingerprints, read_folder_table, read_manifest_table
from irnet_ray.data.sources import ClassVocabulary, ManifestError, UnknownClassError
from irnet_ray.data.storage import StorageOptions
from irnet_ray.pipeline import commit_log as cl
from irnet_ray.pipeline.inputs import HASH_COLUMN, id_hashes, plan_dataset, read_image_dataset, reraise_input_error
from irnet_ray.pipeline.planning import committed_table, key_column, plan_table

VOCABULARY = ClassVocabulary(("cat", "dog", "traffic light"))
pytestmark = pytest.mark.timeout(300)


def test_id_hashes_are_equal_for_equal_ids_and_differ_for_others():
    ids = pa.array(["a", "b", "ab", "ba", "", "a", "n01440764/n01440764_10026", "n01440764/n01440764_10027", "é"])
    hashes = id_hashes(ids)
    assert hashes.dtype == np.uint64 and len(hashes) == len(ids)
    assert hashes[0] == hashes[5]
    assert len(set(hashes.tolist())) == len(ids) - 1  # order, length and every byte count
    # Sliced and chunked arrays hash as their values.
    assert id_hashes(ids.slice(2, 3)).tolist() == hashes[2:5].tolist()
    assert id_hashes(pa.chunked_array([ids.slice(0, 4), ids.slice(4)])).tolist() == hashes.tolist()
    many = pa.array([f"img_{i:07d}" for i in range(200_000)])
    assert len(np.unique(id_hashes(many))) == 200_000


def _table(rows: list[tuple]) -> pa.Table:
    """(id, uri, classes, fingerprint) rows as an image table."""
    return pa.table({"image_id": [r[0] for r in rows], "uri": [r[1] for r in rows], "classes": [list(r[2]) for r in rows],
                     "semantic_uri": [None] * len(rows), "instance_uri": [None] * len(rows),
                     "source_row": list(range(1, len(rows) + 1)), "fingerprint": [r[3] for r in rows]},
                    schema=IMAGE_TABLE_SCHEMA)  # fmt: skip


def _rows() -> list[tuple]:
    rows = [(f"img{i}", f"/x/{i}.jpg", (1 + i % 3,), f"{i}:1") for i in range(40)]
    rows[3] = ("img3", "/x/3.jpg", (), "3:1")  # no classes
    rows[5] = ("img5", "/x/5.jpg", (1, 9), "5:1")  # class out of range
    rows[30] = ("img7", "/x/7b.jpg", (2,), "7:2")  # repeats img7 from another block
    rows[31] = ("img7", "/x/7c.jpg", (2,), "7:3")  # three times
    rows[12] = ("img12", "/x/12-new.jpg", (1,), "12:1")  # committed from /x/12.jpg: changed
    rows[14] = ("img14", "/x/14.jpg", (3,), "14:9")  # committed with fingerprint 14:1: changed
    rows[33] = ("img33", "/x/33.jpg", (), "33:1")  # no classes, but committed: skipped, not refused
    return rows


def _commits() -> list[dict]:
    data = {"image_ids": ["img1", "img2", "img12", "img14", "img33"], "errors": [], "file": {"path": "data/f.parquet"},
            "inputs": [["img1", 0, "/x/1.jpg", "1:1"], ["img2", 0, "/x/2.jpg", "2:1"], ["img12", 0, "/x/12.jpg", "12:1"],
                       ["img14", 0, "/x/14.jpg", "14:1"], ["img33", 0, "/x/33.jpg", "33:1"]]}  # fmt: skip
    error = cl.of.error_row(image_id="img7", occurrence=1, uri="/x/7b.jpg", classes=[2], stage="input",
                            reason="duplicate_id", message="m", run_id="r0")  # fmt: skip
    return [data, {"image_ids": [], "file": None, "errors": [error], "inputs": [["img7", 1, "/x/7b.jpg", "7:2"]]}]


def _dataset(table: pa.Table, hashes: np.ndarray, block_rows: int):
    import ray

    table = table.append_column(HASH_COLUMN, pa.array(hashes, pa.uint64()))
    return ray.data.from_arrow([table.slice(s, block_rows) for s in range(0, table.num_rows, block_rows)])


def _plans(table, hashes, block_rows):
    committed = committed_table(_commits())
    whole = plan_table(table, committed, 3, "run")
    streamed = plan_dataset(_dataset(table, hashes, block_rows), committed, 3, "run", "empty")
    return whole, streamed


def _sent(streamed) -> list[dict]:
    rows = streamed.send().take_all()
    return sorted(({k: (list(v) if k == "classes" else v) for k, v in r.items()} for r in rows),
                  key=lambda r: r["image_id"])  # fmt: skip


@pytest.mark.parametrize("hashing", ["real", "colliding"])
def test_the_streamed_plan_equals_the_plan_of_the_whole_table(ray_cluster, hashing):
    """Blocks of 8 rows; an id repeated across blocks, refusals, committed (skipped) rows,
    changed files. "colliding": every id's hash is its length, so unrelated ids share hashes and
    go to the driver's plan: the result must not change."""
    table = _table(_rows())
    ids = table.column("image_id")
    hashes = id_hashes(ids) if hashing == "real" else np.array([len(i) for i in ids.to_pylist()], np.uint64)
    whole, streamed = _plans(table, hashes, block_rows=8)

    assert streamed.rows == 40
    expected = sorted(whole.pending.to_pylist(), key=lambda r: r["image_id"])
    assert _sent(streamed) == expected and streamed.to_send == len(expected) == 30
    key = lambda e: (e["image_id"], e["occurrence"])  # noqa: E731
    assert sorted(streamed.errors, key=key) == sorted(whole.errors, key=key)
    assert sorted(map(tuple, streamed.inputs)) == sorted(map(tuple, whole.inputs))
    assert streamed.refused == whole.refused == {"class_out_of_range": 1, "duplicate_id": 2, "no_classes": 1}
    assert streamed.skipped == whole.skipped == 4  # img1, img2, img33 and the committed repeat of img7
    assert streamed.changed.to_pylist() == whole.changed.to_pylist()
    assert streamed.changed.column("image_id").to_pylist() == ["img12", "img14"]
    if hashing == "colliding":
        assert streamed.driver_rows.num_rows > 20  # most rows took the driver's path
    else:
        assert sorted(streamed.driver_rows.column("image_id").to_pylist()) == ["img12", "img14"] + ["img7"] * 3


def test_changed_rows_withdrawn_are_planned_again_and_sent(ray_cluster):
    table = _table(_rows())
    committer_table = committed_table(_commits())
    streamed = plan_dataset(_dataset(table, id_hashes(table.column("image_id")), 8), committer_table, 3, "run", "e")
    withdrawn = committer_table.filter(pa.compute.invert(pa.compute.is_in(
        committer_table.column("image_id"), value_set=pa.array(["img12", "img14"]))))  # fmt: skip
    streamed.replan(withdrawn, 3, "run")
    assert streamed.changed.num_rows == 0 and streamed.to_send == 32
    assert {"img12", "img14"} <= {r["image_id"] for r in _sent(streamed)}


def test_missing_keys_are_found_in_the_blocks_and_in_the_driver(ray_cluster):
    """After a run, StreamPlan.missing names exactly the expected keys that were not committed."""
    table = _table(_rows())
    committed = committed_table(_commits())
    streamed = plan_dataset(_dataset(table, id_hashes(table.column("image_id")), 8), committed, 3, "run", "e")
    sent = [r["image_id"] for r in _sent(streamed)]
    refused = [(e["image_id"], e["occurrence"]) for e in streamed.errors]
    everything = _committed_keys([(i, 0) for i in sent] + refused)
    assert streamed.missing(everything).to_pylist() == []
    lost_block_row, lost_refusal = "img20", refused[0]
    partial = _committed_keys([(i, 0) for i in sent if i != lost_block_row] + refused[1:])
    assert sorted(streamed.missing(partial).to_pylist()) == sorted(
        [f"{lost_block_row}\x1f0", f"{lost_refusal[0]}\x1f{lost_refusal[1]}"])  # fmt: skip


def _committed_keys(keys: list[tuple[str, int]]) -> pa.Table:
    return pa.table({"image_id": [k[0] for k in keys], "occurrence": pa.array([k[1] for k in keys], pa.int64())})


def test_an_empty_set_raises_the_callers_message(ray_cluster):
    import ray

    empty = ray.data.from_arrow(_table([]).append_column(HASH_COLUMN, pa.array([], pa.uint64())))
    with pytest.raises(ValueError, match="nothing to label here"):
        plan_dataset(empty, committed_table([]), 3, "run", "nothing to label here")


# --------------------------------------------------------------------------------------
# reading


def _write(table: pa.Table, path: Path) -> str:
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=2)
    elif path.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return str(path)


def _streamed_rows(spec: str, **columns) -> list[dict]:
    rows = read_image_dataset(spec, StorageOptions(), VOCABULARY, **columns).take_all()
    for row in rows:
        assert row.pop(HASH_COLUMN) == id_hashes(pa.array([row["image_id"]]))[0]
        row["classes"] = list(row["classes"])
    return sorted(rows, key=lambda r: r["uri"])


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_manifest_read_by_ray_data_equals_the_drivers_read(ray_cluster, tmp_path, fmt):
    (tmp_path / "img").mkdir()
    for name in "abcde":
        (tmp_path / "img" / f"{name}.png").write_bytes(b"0" * (ord(name) - 90))
    manifest = _write(pa.table({"name": ["0001", "0002", "0003", "0004", "0005"],
                                "image": [f"img/{n}.png" for n in "abcde"],
                                "labels": ["cat", "cat|dog", "cat", "traffic light", "dog"]}), tmp_path / f"m.{fmt}")  # fmt: skip
    columns = {"id_column": "name", "classes_column": "labels"}
    whole, _ = read_manifest_table(manifest, StorageOptions(), VOCABULARY, **columns)
    expected = sorted(add_fingerprints(whole, StorageOptions()).to_pylist(), key=lambda r: r["uri"])
    for row in expected:
        row["source_row"] = None  # a block's place in the file is not known
    assert _streamed_rows(manifest, **columns) == expected
    assert [r["image_id"] for r in expected] == ["0001", "0002", "0003", "0004", "0005"]  # ids stay text
    assert [int(r["fingerprint"].split(":")[0]) for r in expected] == [7, 8, 9, 10, 11]

    with pytest.raises(ManifestError, match="missing required column.*'classes'"):
        _plan(manifest, id_column="name")  # Parquet, CSV: from the header, before reading; JSON: in a block
    bad = _write(pa.table({"image": ["img/a.png", "img/b.png"], "classes": ["cat", "cat dog"]}), tmp_path / f"bad.{fmt}")
    with pytest.raises(UnknownClassError, match=r"^manifest .*bad\..*: image .*b\.png: unknown class 'cat dog'; did you"):
        _plan(bad)


def _plan(spec: str, **columns):
    """Plan ``spec`` as the labeling job does: the set's mistakes raised as themselves."""
    try:
        return plan_dataset(read_image_dataset(spec, StorageOptions(), VOCABULARY, **columns), committed_table([]), 3,
                            "r", "empty")  # fmt: skip
    except Exception as exc:
        reraise_input_error(exc)
        raise


def test_a_folder_tree_listed_by_ray_tasks_equals_the_drivers_listing(ray_cluster, tmp_path):
    root = tmp_path / "tree"
    for cls, names in {"cat": ["a.jpg", "b.PNG", ".hidden.jpg"], "dog": ["c.jpg", "sub/d.jpg", "notes.txt"],
                       "traffic light": ["e.jpeg"]}.items():  # fmt: skip
        for name in names:
            (root / cls / name).parent.mkdir(parents=True, exist_ok=True)
            (root / cls / name).write_bytes(b"x" * len(name))
    whole, _ = read_folder_table(str(root), StorageOptions(), VOCABULARY)
    assert _streamed_rows(f"folder:{root}") == sorted(whole.to_pylist(), key=lambda r: r["uri"])
    assert len(whole) == 5

    (root / "horse").mkdir()
    (root / "horse" / "h.jpg").write_bytes(b"x")
    with pytest.raises(UnknownClassError, match="^image folder .*tree: class folder 'horse': unknown class 'horse'"):
        _plan(f"folder:{root}")


def test_key_column_of_the_driver_and_blocks_agree():
    # The keys checked after a run are built the same way on both sides.
    assert key_column(pa.array(["a"]), pa.array([0], pa.int64())).to_pylist() == ["a\x1f0"]


def test_a_manifest_and_a_tree_on_s3_are_read_by_ray_data_as_by_the_driver(ray_cluster, s3_server, s3_client, s3_bucket):
    """Over HTTP from a local S3-compatible server: the Ray Data reader (in Ray workers, with the
    job's storage options) lists and reads what the driver's reader does, fingerprints included."""
    options = StorageOptions(endpoint_url=s3_server)
    for cls, names in {"cat": ["a.jpg", "b.jpg"], "dog": ["c.jpg"]}.items():
        for name in names:
            s3_client.put_object(Bucket=s3_bucket, Key=f"tree/{cls}/{name}", Body=b"x" * len(cls + name))
    import pyarrow.csv as pacsv

    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.table({"image": ["tree/cat/a.jpg", "tree/dog/c.jpg"], "classes": ["cat", "dog|cat"]}), sink)
    s3_client.put_object(Bucket=s3_bucket, Key="sets/m.csv", Body=sink.getvalue().to_pybytes())
    manifest = f"s3://{s3_bucket}/sets/m.csv"

    whole, _ = read_manifest_table(manifest, options, VOCABULARY)
    whole = add_fingerprints(whole, options)
    rows = sorted(read_image_dataset(manifest, options, VOCABULARY).take_all(), key=lambda r: r["uri"])
    assert [r["uri"] for r in rows] == whole.column("uri").to_pylist() == [f"s3://{s3_bucket}/sets/tree/cat/a.jpg",
                                                                          f"s3://{s3_bucket}/sets/tree/dog/c.jpg"]  # fmt: skip
    assert [r["fingerprint"] for r in rows] == whole.column("fingerprint").to_pylist()

    tree, _ = read_folder_table(f"s3://{s3_bucket}/tree", options, VOCABULARY)
    listed = sorted(read_image_dataset(f"folder:s3://{s3_bucket}/tree", options, VOCABULARY).take_all(),
                    key=lambda r: r["uri"])  # fmt: skip
    assert [(r["image_id"], r["uri"], list(r["classes"]), r["fingerprint"]) for r in listed] == [
        (r["image_id"], r["uri"], r["classes"], r["fingerprint"]) for r in tree.to_pylist()]  # fmt: skip
    assert [r["image_id"] for r in listed] == ["cat/a", "cat/b", "dog/c"]
    assert all(r["fingerprint"].split(":")[0] == str(len(r["image_id"].replace("/", "")) + 4) for r in listed)
