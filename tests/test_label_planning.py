"""Planning a labeling run on Arrow columns (no Ray): the columnar plan equals the record plan,
class cells, the input fingerprint and ``--dry-run`` counts on a hand-made output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from irnet_ray import model_files
from irnet_ray.cli import main
from irnet_ray.config import BackboneConfig, config_to_dict
from irnet_ray.data.columnar import read_manifest_table, table_of_records
from irnet_ray.data.sources import ClassVocabulary, ImageRecord, read_manifest
from irnet_ray.data.storage import StorageOptions
from irnet_ray.label import label_images
from irnet_ray.models.cam import CamNet
from irnet_ray.models.irnet import IRNet
from irnet_ray.pipeline import commit_log as cl
from irnet_ray.pipeline.planning import committed_table, plan_table

# The per-row planner the jobs used before the columnar one: the reference the plan is checked against.
_spec = importlib.util.spec_from_file_location("label_planning_benchmark",
                                               Path(__file__).resolve().parents[1] / "benchmarks" / "label_planning.py")
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)
plan_records = _benchmark.plan_records

VOCABULARY = ClassVocabulary(("cat", "dog", "traffic light"))


def _records():
    return [
        ImageRecord("a", "/x/a.jpg", (1,)), ImageRecord("b", "/x/b.jpg", (2, 3)),
        ImageRecord("dup", "/x/d1.jpg", (1,)), ImageRecord("c", "/x/c.jpg", ()),
        ImageRecord("dup", "/x/d2.jpg", (2,)), ImageRecord("far", "/x/f.jpg", (1, 7)),
        ImageRecord("done", "/x/done.jpg", (1,)), ImageRecord("dup", "/x/d3.jpg", ()),
        ImageRecord("e", "/x/e.jpg", (3, 1)),
    ]  # fmt: skip


def test_the_columnar_plan_equals_the_record_plan():
    records = _records()
    commits = [{"image_ids": ["done"], "errors": [], "file": None},
               {"image_ids": [], "file": None, "errors": [cl.of.error_row(image_id="dup", occurrence=1, uri="/x/d2.jpg",
                classes=[2], stage="input", reason="duplicate_id", message="m", run_id="r0")]}]  # fmt: skip
    committed = set().union(*(cl.commit_keys(c) for c in commits))
    pending, errors, skipped = plan_records(records, committed, 3, "run")
    plan = plan_table(table_of_records(records), committed_table(commits), 3, "run")
    assert plan.pending.column("image_id").to_pylist() == [r.image_id for r in pending] == ["a", "b", "e"]
    assert plan.pending.column("classes").to_pylist() == [list(r.classes) for r in pending]
    assert plan.errors == errors and len(errors) == 4
    assert plan.skipped == skipped == 2
    assert plan.refused == {"class_out_of_range": 1, "duplicate_id": 2, "no_classes": 1}


def test_class_cells_split_at_bars_and_semicolons_only(tmp_path):
    """A class name may hold a space (``traffic light``); cells separate names with ``|`` or
    ``;`` or hold a JSON list, and training (records) reads them as labeling (table) does."""
    (tmp_path / "m.csv").write_text('image,classes\nimg/1.jpg,traffic light\nimg/2.jpg,cat|dog\n'
                                    'img/3.jpg, dog | traffic light \nimg/4.jpg,\nimg/5.jpg,dog; cat\n'
                                    'img/6.jpg,"[""traffic light"", ""cat""]"\n')  # fmt: skip
    table, _ = read_manifest_table(str(tmp_path / "m.csv"), vocabulary=VOCABULARY)
    assert table.column("classes").to_pylist() == [[3], [1, 2], [2, 3], [], [1, 2], [1, 3]]
    assert table.column("image_id").to_pylist() == ["1", "2", "3", "4", "5", "6"]
    records, vocabulary = read_manifest(str(tmp_path / "m.csv"))  # the vocabulary read from the cells
    assert vocabulary.names == ("cat", "dog", "traffic light")
    assert [r.classes for r in records] == [(3,), (1, 2), (2, 3), (), (1, 2), (1, 3)]
    (tmp_path / "json.csv").write_text('image,classes\nimg/1.jpg,cat\nimg/2.jpg,"[""cat"", 3]"\n')
    with pytest.raises(ValueError, match="row 2: column 'classes': a JSON cell must be a list of class names"):
        read_manifest_table(str(tmp_path / "json.csv"), vocabulary=VOCABULARY)
    assert table.column("uri").to_pylist()[0] == str(tmp_path / "img" / "1.jpg")
    pq.write_table(pa.table({"image": ["x.jpg"], "classes": [["traffic light", "cat"]]}), tmp_path / "m.parquet")
    assert read_manifest_table(str(tmp_path / "m.parquet"), vocabulary=VOCABULARY)[0].column("classes").to_pylist() == [[1, 3]]
    with pytest.raises(ValueError, match="row 1.*unknown class 'cat dog'"):
        (tmp_path / "bad.csv").write_text("image,classes\nx.jpg,cat dog\n")
        read_manifest_table(str(tmp_path / "bad.csv"), vocabulary=VOCABULARY)



def _write_manifest(table: pa.Table, path: Path) -> str:
    fmt = path.suffix[1:]
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    elif fmt == "parquet":
        pq.write_table(table, path, row_group_size=3)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_manifest_read_in_chunks_equals_one_read_whole(tmp_path, monkeypatch, fmt):
    """The reader normalises a manifest CHUNK_ROWS rows at a time (bounded driver memory):
    with chunks of 2 rows, the table, the vocabulary built from every chunk, the row numbers
    and the fingerprints equal those of one chunk, and a mistake names its row in the file."""
    from irnet_ray.data import columnar
    from irnet_ray.data.columnar import add_fingerprints

    (tmp_path / "img").mkdir()
    for name in "abcde":
        (tmp_path / "img" / f"{name}.png").write_bytes(b"0" * (ord(name) - 90))
    images = [f"img/{n}.png" for n in "abcde"]
    manifest = _write_manifest(pa.table({"image": images, "classes": ["cat", "cat|dog", "cat", "traffic light", "dog"]}),
                               tmp_path / f"m.{fmt}")  # fmt: skip

    whole, whole_vocabulary = read_manifest_table(manifest)
    monkeypatch.setattr(columnar, "CHUNK_ROWS", 2)
    chunked, vocabulary = read_manifest_table(manifest)
    assert vocabulary.names == whole_vocabulary.names == ("cat", "dog", "traffic light")
    assert chunked.to_pylist() == whole.to_pylist()
    assert chunked.column("source_row").to_pylist() == [1, 2, 3, 4, 5]
    assert chunked.column("classes").to_pylist() == [[1], [1, 2], [1], [3], [2]]
    prints = add_fingerprints(chunked, StorageOptions()).column("fingerprint").to_pylist()
    assert prints == add_fingerprints(whole, StorageOptions()).column("fingerprint").to_pylist()
    assert [int(p.split(":")[0]) for p in prints] == [7, 8, 9, 10, 11]

    bad = _write_manifest(pa.table({"image": images, "classes": ["cat", "cat", "dog", "dog", "cat dog"]}),
                          tmp_path / f"bad.{fmt}")  # fmt: skip
    with pytest.raises(ValueError, match="row 5.*unknown class 'cat dog'"):
        read_manifest_table(bad, vocabulary=VOCABULARY)


@pytest.mark.parametrize("check_rows", [2, 65_536])
def test_changed_files_found_a_slice_of_rows_at_a_time(monkeypatch, check_rows):
    """A committed id whose input now names another file (other URI) or the same URI with
    another fingerprint is changed; one whose fingerprint was unknown then is not. The check
    runs CHECK_ROWS rows at a time (bounded memory) and finds the same rows either way."""
    from irnet_ray.pipeline import planning

    monkeypatch.setattr(planning, "CHECK_ROWS", check_rows)
    table = table_of_records([ImageRecord(i, f"/x/{i}.jpg", (1,)) for i in "abcdef"])
    table = table.set_column(table.schema.get_field_index("fingerprint"), "fingerprint",
                             pa.array(["1:1", "2:2", "3:3", "4:4", "5:5", "6:6"]))  # fmt: skip
    inputs = [[i, 0, f"/x/{i}.jpg", p] for i, p in zip("abcdef", ["1:1", "2:2", "3:9", "", "5:5", "6:6"])]
    inputs[4][2] = "/old/e.jpg"
    commits = [{"sequence": 0, "run_id": "r", "file": {"path": "data/p.parquet", "rows": 6, "bytes": 1},
                "image_ids": list("abcdef"), "errors": [], "inputs": inputs}]  # fmt: skip
    plan = plan_table(table, committed_table(commits), VOCABULARY.num_classes, "r")
    assert plan.changed.column("image_id").to_pylist() == ["c", "e"]  # d's fingerprint was unknown then
    assert plan.changed.column("old_uri").to_pylist() == ["/x/c.jpg", "/old/e.jpg"]
    assert plan.changed.column("old_fingerprint").to_pylist() == ["3:9", "5:5"]
    assert plan.skipped == 4 and plan.pending.num_rows == 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    backbone = BackboneConfig(arch="resnet18")
    torch.manual_seed(0)
    cam = CamNet(backbone, VOCABULARY.num_classes)
    model_files.save_model(str(folder / "cam"), kind="cam", state_dict=cam.state_dict(),
                           config={"backbone": config_to_dict(backbone)}, vocabulary=VOCABULARY, metrics=[])  # fmt: skip
    model_files.save_model(str(folder / "irn"), kind="irn", state_dict=IRNet(cam.backbone.channels).state_dict(),
                           config={"backbone": config_to_dict(backbone), "cam_model": str(folder / "cam")},
                           vocabulary=VOCABULARY, metrics=[])  # fmt: skip
    return str(folder / "cam"), str(folder / "irn")


def _error(image_id, reason, uri, occurrence=0):
    return cl.of.error_row(image_id=image_id, occurrence=occurrence, uri=uri, classes=[1], stage="decode",
                           reason=reason, message="m", run_id="r0")  # fmt: skip


@pytest.mark.timeout(300)
def test_dry_run_counts_a_hand_made_output(models, tmp_path, capsys):
    """Output: 3 images labeled (one of them since rewritten), 1 transient error, 1 permanent error,
    a duplicate id refused; input: those plus 2 new images. Nothing is written, Ray never starts."""
    images = tmp_path / "images"
    images.mkdir()
    for name in "abcdefg":
        (images / f"{name}.png").write_bytes(b"0" * 10)
    manifest = tmp_path / "set.csv"
    manifest.write_text("image_id,image,classes\n" + "".join(f"{n},images/{n}.png,cat\n" for n in "abcdefg")
                        + "g,images/g.png,dog\n")  # fmt: skip
    listed = read_manifest_table(str(manifest), vocabulary=VOCABULARY)[0]
    from irnet_ray.data.columnar import add_fingerprints

    prints = dict(zip(listed.column("image_id").to_pylist(), add_fingerprints(listed, StorageOptions()).column("fingerprint").to_pylist()))
    output = tmp_path / "out"
    (output / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["a", "b", "c"]}), output / "data" / "part-1.parquet")
    uri = lambda n: str(images / f"{n}.png")  # noqa: E731
    inputs = [[n, 0, uri(n), prints[n]] for n in "abde"]
    commits = [
        {"file": {"path": "data/part-1.parquet", "rows": 3, "bytes": 1}, "image_ids": ["a", "b", "c"], "errors": [],
         "inputs": inputs[:2] + [["c", 0, uri("c"), "10:1"]]},  # c's file has changed since
        {"file": None, "image_ids": [], "errors": [_error("d", "unreachable", uri("d")), _error("e", "not_an_image", uri("e"))],
         "inputs": inputs[2:]},
        {"file": None, "image_ids": [], "errors": [cl.of.error_row(image_id="g", occurrence=1, uri=uri("g"), classes=[2],
         stage="input", reason="duplicate_id", message="m", run_id="r0")]},
    ]  # fmt: skip
    for sequence, commit in enumerate(commits):
        cl.write_commit(str(output), {"sequence": sequence, "run_id": "r0", **commit}, StorageOptions())
    before = sorted(p.relative_to(output) for p in output.rglob("*"))

    summary = label_images(str(manifest), *models, str(output), dry_run=True)
    assert summary["images"] == 8
    assert summary["skipped"] == 4  # a, b, e and g's second row; c changed, d is retried
    assert summary["changed"] == 1 and summary["changed_examples"][0]["image_id"] == "c"
    assert summary["retried"] == 1
    assert summary["refused"] == 1 and summary["refused_by_reason"] == {"duplicate_id": 1}
    assert summary["to_label"] == 2  # d (retried) and f (new); c only with relabel_changed
    assert label_images(str(manifest), *models, str(output), dry_run=True, relabel_changed=True)["to_label"] == 3
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before
    import ray

    assert not ray.is_initialized()

    assert main(["label", "--images", str(manifest), "--irn", models[1], "--output", str(output), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would label 2 image(s)" in printed and "duplicate_id 1" in printed and "c: " in printed

    # Planned as a run plans it (Ray Data blocks, pipeline/inputs.py): the same counts.
    try:
        streamed = label_images(str(manifest), *models, str(output), dry_run=True, inputs="ray")
    finally:
        ray.shutdown()
    assert streamed == summary
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before


def test_manifest_columns_are_named_on_the_command_line(models, tmp_path, capsys):
    """A manifest with other column names is read through --image-column / --classes-column /
    --id-column (a dry run: nothing written, no Ray); the flags on an image set that is not a
    manifest are one clear line, exit status 2."""
    (tmp_path / "m.csv").write_text("path,labels,id\na.png,cat,0001\nb.png,traffic light|dog,0002\nc.png,,0003\n")
    argv = ["label", "--images", str(tmp_path / "m.csv"), "--irn", models[1], "--output", str(tmp_path / "out"),
            "--dry-run"]  # fmt: skip
    assert main(argv) == 2 and "missing required column(s) 'image', 'classes'" in capsys.readouterr().err
    assert main([*argv, "--image-column", "path", "--classes-column", "labels", "--id-column", "id"]) == 0
    printed = capsys.readouterr().out
    assert "3 input row(s)" in printed and "would label 2 image(s)" in printed and "no_classes 1" in printed
    assert not (tmp_path / "out").exists()
    assert main(["label", "--images", "builtin:num_images=2", "--irn", models[1], "--output", str(tmp_path / "o2"),
                 "--classes-column", "labels", "--dry-run"]) == 2  # fmt: skip
    assert "--classes-column name columns of a manifest table" in capsys.readouterr().err
