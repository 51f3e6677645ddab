"""The labeling job (issue 4): Ray Data pipeline, Parquet output, atomic commit, exactly once.

One local Ray cluster for the module (``conftest.ray_cluster``: 4 logical CPUs; actors take
0.5 CPU, decode / write tasks 0.25, so nothing waits on a 2-core machine). The models are
ResNet-18 CAM + IRNet with seeded random weights: what these tests check is the job's
guarantees (every input exactly once, files and manifest, resume, refusal, errors, metrics
merged exactly), which hold for any weights; label quality is the demo's and quality.md's job.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
import torch
from conftest import FAKE_ACCESS_KEY, FAKE_REGION, FAKE_SECRET_KEY
from PIL import Image

from irnet_ray import model_files
from irnet_ray.cli import main
from irnet_ray.config import BackboneConfig, CamInferenceConfig, SynthesisConfig, config_to_dict
from irnet_ray.data import output_format as of
from irnet_ray.data.decode import encode_png
from irnet_ray.data.sources import EmptyImageSetError, ImageRecord, builtin_spec, load_synthetic, synthetic_records
from irnet_ray.data.storage import StorageOptions, StorageUnreachable, write_bytes
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.evaluation import InstanceEvaluator, SemanticEvaluator
from irnet_ray.label import LabelJobConfig, LabelJobError, LabelJobFailed, label_images
from irnet_ray.label.scores import GroundTruth, ScoreBoard, score_image
from irnet_ray.model_files import ModelFileError
from irnet_ray.models.cam import CamNet
from irnet_ray.models.irnet import IRNet
from irnet_ray.pipeline import commit_log as out

DATA = SyntheticConfig(num_images=12, image_size=(64, 64), num_classes=2)
BACKBONE = BackboneConfig(arch="resnet18")
# Labels computed at 48 px and brought back to 64: every test also checks the original size.
CONFIG = LabelJobConfig(
    cam_inference=CamInferenceConfig(scales=(1.0,)), synthesis=SynthesisConfig(steps=16, displacement_iterations=10),
    max_side=48, rows_per_file=4, batch_size=2, decode_batch_size=4, min_actors=1, max_actors=1,
    cpus_per_actor=0.5, gpus_per_actor=0,
)  # fmt: skip


# --------------------------------------------------------------------------------------
# fixtures and helpers


def _save_models(folder: Path, vocabulary, seed: int, cam_folder: Path | None = None) -> tuple[str, str]:
    torch.manual_seed(seed)
    cam = CamNet(BACKBONE, vocabulary.num_classes)
    irn = IRNet(cam.backbone.channels)
    cam_uri = str(cam_folder or folder / "cam")
    if cam_folder is None:
        model_files.save_model(cam_uri, kind="cam", state_dict=cam.state_dict(), config={"backbone": config_to_dict(BACKBONE)},
                        vocabulary=vocabulary, metrics=[])  # fmt: skip
    irn_uri = str(folder / "irn")
    model_files.save_model(irn_uri, kind="irn", state_dict=irn.state_dict(),
                    config={"backbone": config_to_dict(BACKBONE), "cam_model": cam_uri},
                    vocabulary=vocabulary, metrics=[])  # fmt: skip
    return cam_uri, irn_uri


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_records(DATA)


@pytest.fixture(scope="module")
def models(synthetic, tmp_path_factory):
    """(cam_uri, irn_uri, other_irn_uri): two IRNets trained (here: seeded) on one CAM model."""
    folder = tmp_path_factory.mktemp("models")
    cam_uri, irn_uri = _save_models(folder, synthetic[1], seed=0)
    _, other_irn = _save_models(folder / "other", synthetic[1], seed=1, cam_folder=Path(cam_uri))
    return cam_uri, irn_uri, other_irn


def _sha256(path: str) -> str:
    return "sha256:" + hashlib.sha256(Path(path, "model.pt").read_bytes()).hexdigest()


def _read_local(output: Path):
    """(manifest, label rows, error rows) of a finished local output, read with plain pyarrow."""
    manifest = json.loads((output / "_manifest.json").read_text())
    labels = [row for f in manifest["data_files"] for row in pq.read_table(output / f["path"]).to_pylist()]
    errors = pq.read_table(output / manifest["errors_file"]["path"]).to_pylist()
    return manifest, labels, errors


def _keys(labels, errors) -> collections.Counter:
    return collections.Counter([(r["image_id"], 0) for r in labels] + [(e["image_id"], e["occurrence"]) for e in errors])


def _input_keys(records) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    keys = []
    for r in records:
        keys.append((r.image_id, seen[r.image_id]))
        seen[r.image_id] += 1
    return collections.Counter(keys)


def _assert_exactly_once(records, output: Path):
    """Every input row exactly once in the committed labels or errors; nothing else committed,
    and no file in data/ or errors/ that the manifest does not list."""
    manifest, labels, errors = _read_local(output)
    keys = _keys(labels, errors)
    assert [k for k, n in keys.items() if n > 1] == []
    assert keys == _input_keys(records)
    listed = {f["path"] for f in manifest["data_files"]} | {manifest["errors_file"]["path"]}
    on_disk = {f"{d}/{p.name}" for d in ("data", "errors") for p in (output / d).iterdir()}
    assert on_disk == listed
    assert manifest["complete"] is True and manifest["rows"] == len(labels) and manifest["errors"] == len(errors)
    return manifest, labels, errors


def _read_with_duckdb(output: Path, manifest: dict, labels: list[dict]) -> None:
    """The DuckDB queries of docs/output-format.md return what pyarrow read."""
    import duckdb

    files = [str(output / f["path"]) for f in manifest["data_files"]]
    con = duckdb.connect()
    con.execute(f"CREATE VIEW labels AS SELECT * FROM read_parquet({files!r})")
    rows = con.execute("SELECT image_id, height, width, len(instances) AS n FROM labels ORDER BY n DESC").fetchall()
    assert sorted(r[0] for r in rows) == sorted(row["image_id"] for row in labels)
    assert {r[0]: r[3] for r in rows} == {row["image_id"]: len(row["instances"]) for row in labels}
    instances = con.execute("SELECT image_id, i.class_name, i.score, i.area, i.bbox "
                            "FROM (SELECT image_id, unnest(instances) AS i FROM labels)").fetchall()  # fmt: skip
    assert len(instances) == sum(len(row["instances"]) for row in labels)
    listed = con.execute(f"SELECT unnest(data_files).path FROM read_json_auto('{output}/_manifest.json')").fetchall()
    assert sorted(path for (path,) in listed) == sorted(f["path"] for f in manifest["data_files"])


def _check_row_sizes(row: dict, size: tuple[int, int]) -> None:
    """The semantic PNG (Pillow) and every instance RLE (pycocotools) decode at ``size``."""
    assert (row["height"], row["width"]) == size
    semantic = np.asarray(Image.open(io.BytesIO(row["semantic_png"])))
    assert semantic.shape == size
    assert set(np.unique(semantic)) <= {0, *row["classes"]}
    for instance in row["instances"]:
        mask = mask_utils.decode([{"size": instance["rle"]["size"], "counts": instance["rle"]["counts"]}])[:, :, 0]
        assert mask.shape == size
        assert instance["area"] == int(mask.sum()) > 0
        assert instance["class_id"] in row["classes"]


# --------------------------------------------------------------------------------------
# without Ray: the pieces the driver trusts


def test_score_records_merge_into_the_same_metrics_as_one_pass():
    rng = np.random.default_rng(0)
    whole_sem, whole_ins = SemanticEvaluator(3), InstanceEvaluator(2)
    cam_whole, cc_whole = SemanticEvaluator(3), InstanceEvaluator(2)
    board = ScoreBoard(2, ("a", "b"))
    for _ in range(5):
        gt_sem = rng.integers(0, 3, (12, 10)).astype(np.uint8)
        gt_sem[0, :3] = 255
        gt_masks = rng.random((3, 12, 10)) > 0.6
        gt_classes = rng.integers(1, 3, 3)
        pred_sem = rng.integers(0, 3, (12, 10)).astype(np.uint8)
        masks = rng.random((4, 12, 10)) > 0.5
        classes, scores = rng.integers(1, 3, 4), rng.random(4).astype(np.float32)
        instances = np.zeros((12, 10), np.int32)
        for k, m in enumerate(gt_masks):
            instances[m] = k + 1
        gt = GroundTruth(gt_sem, instances, np.arange(1, 4, dtype=np.int32), gt_classes)
        # Baselines: the CAM row scores only a semantic map, the component rows only instances.
        cam_sem = rng.integers(0, 3, (12, 10)).astype(np.uint8)
        cc_masks, cc_classes, cc_scores = masks[::-1].copy(), classes[::-1].copy(), scores[::-1].copy()
        baselines = {"cam": (cam_sem, None, None, None), "cam_components": (None, cc_masks, cc_classes, cc_scores)}
        record = json.loads(json.dumps(score_image(2, pred_sem, masks, classes, scores, gt, baselines)))  # as committed
        board.add(record)
        whole_sem.process(pred_sem, gt_sem)
        whole_ins.process(masks, classes, scores, gt.instance_masks(), gt_classes)
        cam_whole.process(cam_sem, gt_sem)
        cc_whole.process(cc_masks, cc_classes, cc_scores, gt.instance_masks(), gt_classes)
    merged = ScoreBoard(2).add(board.compact()).evaluate()
    assert merged["images"] == 5
    assert merged["miou"] == whole_sem.evaluate()["miou"]
    assert (merged["ap50"], merged["ap70"]) == (whole_ins.evaluate()["ap50"], whole_ins.evaluate()["ap70"])
    cam, cc = merged["baselines"]["cam"], merged["baselines"]["cam_components"]
    assert cam["miou"] == cam_whole.evaluate()["miou"] and cam["ap50"] is None
    assert cc["miou"] is None and (cc["ap50"], cc["ap70"]) == (cc_whole.evaluate()["ap50"], cc_whole.evaluate()["ap70"])
    with pytest.raises(ValueError, match="unknown baseline"):
        score_image(2, pred_sem, masks, classes, scores, gt, {"crf": (pred_sem, None, None, None)})


def test_committer_never_commits_an_image_twice(tmp_path):
    output = str(tmp_path / "out")
    job = {"format": of.FORMAT_NAME, "models": {"cam": {"uri": "c", "id": "1"}, "irn": {"uri": "i", "id": "2"}},
           "settings": {}, "settings_id": "s"}  # fmt: skip
    state = out.prepare_output(output, job, StorageOptions(), overwrite=False)
    committer = out.Committer(output, state, StorageOptions(), "run")

    def data_file(ids):
        rows = [{**dict.fromkeys(of.LABEL_COLUMNS, ""), "image_id": i, "height": 1, "width": 1, "label_height": 1,
                 "label_width": 1, "classes": [1], "class_names": ["a"], "semantic_png": b"x", "instances": []}
                for i in ids]  # fmt: skip
        path = f"data/part-{'-'.join(ids)}.parquet"
        write_bytes(os.path.join(output, path), _parquet_bytes(of.labels_table(rows)))
        return {"path": path, "rows": len(ids), "bytes": 1}

    committer.commit({"file": data_file(["a", "b"]), "image_ids": ["a", "b"], "errors": []})
    # A retried task delivers b again with c: the file is rewritten with c only.
    record = committer.commit({"file": data_file(["b", "c"]), "image_ids": ["b", "c"], "errors": [
        of.error_row(image_id="a", uri="u", classes=[1], stage="decode", reason="missing", message="m", run_id="r"),
        of.error_row(image_id="d", uri="u", classes=[1], stage="decode", reason="missing", message="m", run_id="r"),
    ]})  # fmt: skip
    assert record["image_ids"] == ["c"] and [e["image_id"] for e in record["errors"]] == ["d"]
    assert pq.read_table(os.path.join(output, record["file"]["path"])).column("image_id").to_pylist() == ["c"]
    assert not os.path.exists(os.path.join(output, "data/part-b-c.parquet"))
    commits = out.read_commits(output, StorageOptions())
    assert [c["sequence"] for c in commits] == [0, 1] and committer.repaired == 1
    keys = collections.Counter(k for c in commits for k in out.commit_keys(c))
    assert set(keys) == {("a", 0), ("b", 0), ("c", 0), ("d", 0)} and max(keys.values()) == 1


def _parquet_bytes(table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_user_mistakes_fail_before_any_work(models, synthetic, tmp_path):
    cam_uri, irn_uri, _ = models
    records = synthetic[0][:2]
    with pytest.raises(ModelFileError, match="expected an IRNet"):
        label_images(records, cam_uri, cam_uri, str(tmp_path / "a"), CONFIG)
    with pytest.raises(ModelFileError, match="expected a CAM"):
        label_images(records, irn_uri, irn_uri, str(tmp_path / "a"), CONFIG)
    with pytest.raises(ModelFileError, match="no model there"):
        label_images(records, None, str(tmp_path / "nothing"), str(tmp_path / "a"), CONFIG)
    with pytest.raises(EmptyImageSetError):
        label_images([], None, irn_uri, str(tmp_path / "a"), CONFIG)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(LabelJobError, match="not empty"):
        label_images(records, None, irn_uri, str(tmp_path / "foreign"), CONFIG, overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="file"):  # a file where the output folder should go
        label_images(records, None, irn_uri, str(tmp_path / "file" / "out"), CONFIG)
    unreachable = StorageOptions(endpoint_url="http://127.0.0.1:9", connect_timeout=0.5, max_attempts=1)
    with pytest.raises(StorageUnreachable):
        label_images(records, cam_uri, irn_uri, "s3://bucket/labels", CONFIG, unreachable)
    with pytest.raises(ValueError, match="scales must include 1.0"):
        LabelJobConfig(cam_inference=CamInferenceConfig(scales=(0.5,)))
    with pytest.raises(ValueError, match="min_actors"):
        LabelJobConfig(min_actors=3, max_actors=2)
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "_manifest.json").exists()


# --------------------------------------------------------------------------------------
# the job on Ray


@pytest.mark.timeout(300)
def test_end_to_end_on_s3(ray_cluster, models, synthetic, s3_server, s3_client, s3_bucket):
    """Models, extra images, ground truth and the output on the S3 server, over HTTP; the
    output read back with plain pyarrow and decoded with pycocotools and Pillow."""
    options = StorageOptions(endpoint_url=s3_server)
    cam_local, irn_local, _ = models
    cam_uri, irn_uri = f"s3://{s3_bucket}/models/cam", f"s3://{s3_bucket}/models/irn"
    for local, uri in ((cam_local, cam_uri), (irn_local, irn_uri)):
        for name in ("model.pt", "model.json"):
            write_bytes(f"{uri}/{name}", Path(local, name).read_bytes(), options)
    rng = np.random.default_rng(1)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    write_bytes(f"s3://{s3_bucket}/images/wide.jpg", jpeg.getvalue(), options)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)).save(png, "PNG")
    write_bytes(f"s3://{s3_bucket}/images/tall.png", png.getvalue(), options)
    gt_semantic = np.zeros((70, 50), np.uint8)
    gt_semantic[10:40, 5:30], gt_semantic[50:65, 20:45] = 2, 1
    gt_semantic[9, 5:30] = 255  # VOC's ignore value
    gt_instances = np.zeros((70, 50), np.uint8)
    gt_instances[10:40, 5:30], gt_instances[50:65, 20:45] = 1, 2
    write_bytes(f"s3://{s3_bucket}/gt/tall_sem.png", encode_png(gt_semantic, of.voc_palette()), options)
    write_bytes(f"s3://{s3_bucket}/gt/tall_ins.png", encode_png(gt_instances, of.voc_palette()), options)
    records = list(synthetic[0]) + [
        ImageRecord("wide", f"s3://{s3_bucket}/images/wide.jpg", (1,)),
        ImageRecord("tall", f"s3://{s3_bucket}/images/tall.png", (1, 2), f"s3://{s3_bucket}/gt/tall_sem.png",
                    f"s3://{s3_bucket}/gt/tall_ins.png"),
        ImageRecord("gone", f"s3://{s3_bucket}/images/gone.jpg", (2,)),
    ]  # fmt: skip
    output = f"s3://{s3_bucket}/labels/run1"

    summary = label_images(records, cam_uri, irn_uri, output, CONFIG, options)
    assert (summary["labeled"], summary["errors"], summary["skipped"]) == (14, 1, 0)
    assert summary["errors_by_reason"] == {"missing": 1}
    assert summary["images_per_second"] > 0 and summary["files"] == 4  # 15 rows / 4 per file

    host_port = s3_server.split("://", 1)[1]
    fs = pafs.S3FileSystem(access_key=FAKE_ACCESS_KEY, secret_key=FAKE_SECRET_KEY, region=FAKE_REGION,
                           endpoint_override=host_port, scheme="http")  # fmt: skip
    manifest = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="labels/run1/_manifest.json")["Body"].read())
    paths = [f"{s3_bucket}/labels/run1/{f['path']}" for f in manifest["data_files"]]
    table = pq.ParquetDataset(paths, filesystem=fs).read()
    assert table.schema.equals(of.LABEL_SCHEMA) and table.num_rows == 14 == manifest["rows"]
    assert all(f["rows"] <= CONFIG.rows_per_file for f in manifest["data_files"])
    errors = pq.read_table(f"{s3_bucket}/labels/run1/{manifest['errors_file']['path']}", filesystem=fs).to_pylist()
    assert [(e["image_id"], e["reason"], e["stage"]) for e in errors] == [("gone", "missing", "decode")]
    listed = sorted(paths + [f"{s3_bucket}/labels/run1/{manifest['errors_file']['path']}"])
    stored = sorted(i.path for d in ("data", "errors")
                    for i in fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/labels/run1/{d}")))  # fmt: skip
    assert stored == listed

    rows = {r["image_id"]: r for r in table.to_pylist()}
    sizes = {r.image_id: (64, 64) for r in synthetic[0]} | {"wide": (60, 80), "tall": (70, 50)}
    for image_id, row in rows.items():
        _check_row_sizes(row, sizes[image_id])
        assert (row["cam_model_id"], row["irn_model_id"]) == (_sha256(cam_local), _sha256(irn_local))
        assert row["run_id"] == summary["run_id"] and row["config_id"] == manifest["settings_id"]
        assert max(row["label_height"], row["label_width"]) == 48  # labeled downscaled
    assert sum(len(r["instances"]) for r in rows.values()) > 0  # RLE decoding was exercised

    # The metrics merged from per-file records equal one evaluation of the committed rows
    # (in commit order, as the merge adds them).
    names = synthetic[1].names
    semantic, instance = SemanticEvaluator(len(names) + 1), InstanceEvaluator(len(names))
    for row in table.to_pylist():
        if row["image_id"] == "wide":
            continue  # no ground truth
        if row["image_id"] == "tall":
            gt_sem, gt_masks, gt_classes = gt_semantic, np.stack([gt_instances == 1, gt_instances == 2]), [2, 1]
        else:
            sample = load_synthetic(records[[r.image_id for r in records].index(row["image_id"])].uri)
            ids = np.arange(1, len(sample.instance_classes) + 1)
            gt_sem, gt_masks, gt_classes = sample.semantic, sample.instances[None] == ids[:, None, None], sample.instance_classes
        semantic.process(of.decode_semantic(row["semantic_png"]), gt_sem)
        masks, classes, scores = of.decode_instances(row)
        instance.process(masks, classes, scores, gt_masks, np.asarray(gt_classes))
    metrics = manifest["metrics"]
    assert metrics["images"] == 13
    assert metrics["miou"] == pytest.approx(semantic.evaluate()["miou"], abs=1e-9)
    assert metrics["ap50"] == pytest.approx(instance.evaluate()["ap50"], abs=1e-9)
    assert metrics["ap70"] == pytest.approx(instance.evaluate()["ap70"], abs=1e-9)
    baselines = metrics["baselines"]  # the paper's comparison rows, scored on the same images
    assert set(baselines) == {"cam", "cam_components", "boundary_components"}
    assert 0 <= baselines["cam"]["miou"] <= 100 and baselines["cam"]["ap50"] is None
    assert all(0 <= baselines[k]["ap50"] <= 100 for k in ("cam_components", "boundary_components"))
    assert summary["metrics"]["miou"] == metrics["miou"]
    for stage in ("decode", "inference", "synthesis", "encode", "write"):
        assert manifest["timings"]["seconds"][stage] > 0, stage
    assert manifest["models"]["irn"]["id"] == _sha256(irn_local)


@pytest.mark.timeout(240)
def test_an_actor_killed_mid_run_leaves_every_image_exactly_once(ray_cluster, models, synthetic, tmp_path, monkeypatch):
    """The actor dies mid-run, and every written file comes back more than once (its first row
    alone, then all its rows, twice): each image still ends committed once."""
    cam_uri, irn_uri, _ = models
    marker = tmp_path / "killed"
    records = list(synthetic[0])
    faults.ship_by_value()
    monkeypatch.setattr("irnet_ray.label.job.LabelActor", faults.killing_label_actor(5, str(marker)))
    monkeypatch.setattr("irnet_ray.pipeline.run.write_file", faults.redelivering_writer())
    summary = label_images(records, cam_uri, irn_uri, str(tmp_path / "out"), CONFIG)
    assert marker.exists()  # the actor process did die, in its third batch
    assert (summary["labeled"], summary["errors"]) == (12, 0)
    manifest, labels, _ = _assert_exactly_once(records, tmp_path / "out")
    run = manifest["runs"][summary["run_id"]]
    assert len(labels) == 12 and run["labeled"] == 12
    assert run["repaired_files"] >= 1  # files holding committed rows and new ones were rewritten


@pytest.mark.timeout(240)
def test_a_stopped_job_is_resumed_and_labels_only_the_rest(ray_cluster, models, synthetic, tmp_path, monkeypatch):
    cam_uri, irn_uri, _ = models
    output = tmp_path / "out"
    records = list(synthetic[0]) + [ImageRecord("nothing", str(tmp_path / "nothing.png"), (1,))]
    with monkeypatch.context() as patched:
        faults.stop_after_commits(patched, 1)  # files of the batches in flight stay uncommitted
        with pytest.raises(LabelJobFailed, match="injected fault"):
            label_images(records, cam_uri, irn_uri, str(output), CONFIG)
    assert not (output / "_manifest.json").exists()  # visibly unfinished
    commits = out.read_commits(str(output), StorageOptions())
    committed = set().union(*(out.commit_keys(c) for c in commits))
    assert 1 <= len(committed) < len(records)
    orphan = output / "data" / "part-orphan.parquet"  # as a task killed after writing leaves
    shutil.copy(output / [c for c in commits if c["file"]][-1]["file"]["path"], orphan)

    summary = label_images(records, cam_uri, irn_uri, str(output), CONFIG)
    assert summary["skipped"] == len(committed)
    assert summary["labeled"] + summary["errors"] == len(records) - len(committed)
    assert summary["total_labeled"] == 12 and summary["total_errors"] == 1
    manifest, labels, errors = _assert_exactly_once(records, output)  # the orphan is gone, nothing twice
    assert [e["reason"] for e in errors] == ["missing"]
    _read_with_duckdb(output, manifest, labels)
    assert len(manifest["runs"]) == 2
    assert sum(run["labeled"] + run["errors"] for run in manifest["runs"].values()) == len(records)
    assert manifest["metrics"]["images"] == 12  # scores of the first run's images count once


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", sorted(faults.DRIVER_FAULTS))
def test_a_killed_driver_is_resumed_and_every_image_is_committed_once(ray_cluster, models, synthetic, tmp_path, fault):
    """The labeling command in its own process (its own local Ray), its driver killed (SIGKILL,
    no clean-up of any kind) at a random commit (seeded, named in the failure message): before
    its record is created, half-way through writing it, or right after. The same job run again
    finishes the output exactly once."""
    import random

    cam_uri, irn_uri, _ = models
    output = tmp_path / "out"
    seed = random.randrange(2**32)
    at = random.Random(seed).randint(1, 10)  # of 12 data files
    command = [sys.executable, str(Path(faults.__file__)), fault, str(at), "--", "label", "--images",
               builtin_spec(DATA), "--cam", cam_uri, "--irn", irn_uri, "--output", str(output), "--max-side", "48",
               "--scales", "1.0", "--walk-steps", "16", "--batch-size", "1", "--rows-per-file", "1",
               "--cpus-per-actor", "0.5", "--gpus-per-actor", "0"]  # fmt: skip
    where = f"{fault} at data commit {at} (seed {seed})"
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    try:
        _, stderr = driver.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # its Ray: no task of the dead job writes on
    assert driver.returncode == -signal.SIGKILL, f"{where}: the driver was not killed\n{stderr[-3000:]}"
    assert not (output / "_manifest.json").exists()
    commits = out.read_commits(str(output), StorageOptions())
    committed = set().union(*(out.commit_keys(c) for c in commits))
    assert len([c for c in commits if c["file"]]) == at - (fault != "after-commit"), where
    if fault == "during-commit":
        assert list((output / "_commits").glob(".*.tmp")), f"{where}: no half-written record"

    same_labels = dataclasses.replace(CONFIG, synthesis=SynthesisConfig(steps=16))  # what the command labeled with
    summary = label_images(builtin_spec(DATA), cam_uri, irn_uri, str(output), same_labels)
    assert summary["skipped"] == len(committed) and summary["labeled"] == 12 - len(committed), where
    _assert_exactly_once(synthetic[0], output)


@pytest.mark.timeout(240)
def test_a_rerun_retries_transient_failures_and_counts_each_image_once(ray_cluster, models, synthetic, tmp_path):
    cam_uri, irn_uri, _ = models
    output = tmp_path / "out"
    flaky = tmp_path / "flaky.png"
    flaky.mkdir()  # a folder where the image should be: a storage error, not a verdict on the image
    records = list(synthetic[0][:4]) + [ImageRecord("flaky", str(flaky), (1,)),
                                        ImageRecord("broken", str(tmp_path / "broken.png"), (1,))]  # fmt: skip
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    first = label_images(records, cam_uri, irn_uri, str(output), CONFIG)
    assert first["errors_by_reason"] == {"not_an_image": 1, "storage_error": 1}

    flaky.rmdir()  # the store recovers
    Image.fromarray(load_synthetic(synthetic[0][4].uri).image).save(flaky)
    second = label_images(records, cam_uri, irn_uri, str(output), CONFIG)
    assert second["retried"] == 1 and second["labeled"] == 1 and second["errors"] == 0
    assert second["total_labeled"] == 5 and second["errors_by_reason"] == {"not_an_image": 1}
    manifest, labels, errors = _assert_exactly_once(records, output)
    assert "flaky" in {r["image_id"] for r in labels} and [e["image_id"] for e in errors] == ["broken"]

    third = label_images(records, cam_uri, irn_uri, str(output), CONFIG)  # a permanent error stays
    assert third["retried"] == 0 and third["labeled"] == third["errors"] == 0


@pytest.mark.timeout(240)
def test_a_finished_output_is_kept_other_models_are_refused_and_overwrite_starts_over(
    ray_cluster, models, synthetic, tmp_path
):
    cam_uri, irn_uri, other_irn = models
    output = tmp_path / "out"
    records = list(synthetic[0][:4])
    first = label_images(records, cam_uri, irn_uri, str(output), CONFIG)
    assert first["labeled"] == 4
    before = (output / "_manifest.json").read_text()

    again = label_images(records, cam_uri, irn_uri, str(output), CONFIG)
    assert (again["labeled"], again["skipped"]) == (0, 4)
    with pytest.raises(LabelJobError, match="IRN model .* is not the one used before.*--overwrite"):
        label_images(records, cam_uri, other_irn, str(output), CONFIG)
    with pytest.raises(LabelJobError, match="label settings differ \\(synthesis\\)"):
        label_images(records, cam_uri, irn_uri, str(output),
                     dataclasses.replace(CONFIG, synthesis=SynthesisConfig(steps=8, displacement_iterations=10)))
    assert json.loads((output / "_manifest.json").read_text())["data_files"] == json.loads(before)["data_files"]

    rerun = label_images(records, cam_uri, other_irn, str(output), CONFIG, overwrite=True)
    assert (rerun["labeled"], rerun["skipped"]) == (4, 0)
    manifest, labels, _ = _assert_exactly_once(records, output)
    assert {r["irn_model_id"] for r in labels} == {_sha256(other_irn)}
    assert list(manifest["runs"]) == [rerun["run_id"]]
    assert len(out.read_commits(str(output), StorageOptions())) == manifest["commits"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("inputs", ["ray", "driver"])  # the set read by Ray Data (a run's default) or in the driver
def test_the_bad_input_corpus_ends_labeled_or_in_errors_with_its_reason(ray_cluster, tmp_path, inputs):
    from bad_inputs import build_bad_input_corpus, corpus_records

    manifest_path, names, expectations = build_bad_input_corpus(tmp_path / "corpus")
    records = corpus_records(manifest_path, names)
    from irnet_ray.data.sources import ClassVocabulary

    _, irn_uri = _save_models(tmp_path / "models", ClassVocabulary(tuple(names)), seed=0)
    output = tmp_path / "out"
    # Through the manifest, as `irnet-ray label --images manifest.jsonl` reads it: its repeated
    # id must become per-row errors, not a refusal of the whole file.
    # A corpus of mostly bad inputs: accepted whatever the share of errors.
    config = dataclasses.replace(CONFIG, max_side=64, max_error_rate=1.0)
    summary = label_images(str(manifest_path), None, irn_uri, str(output), config, inputs=inputs)
    _, labels, errors = _assert_exactly_once(records, output)
    labeled = {r["image_id"]: r for r in labels}
    reasons = collections.defaultdict(set)
    for e in errors:
        reasons[e["image_id"]].add(e["reason"])
    for image_id, (outcome, detail) in expectations.items():
        if outcome == "labeled":
            assert image_id in labeled and image_id not in reasons, image_id
            _check_row_sizes(labeled[image_id], tuple(detail))
        else:
            assert image_id not in labeled and reasons[image_id] == {detail}, (image_id, reasons.get(image_id))
    assert summary["errors"] == len(errors) == sum(summary["errors_by_reason"].values())


@pytest.mark.timeout(240)
def test_cli_labels_and_reports_user_mistakes_in_one_line(ray_cluster, models, tmp_path, capfd, caplog):
    """Also: the run's stderr shows our progress lines, and Ray Data logs no progress (INFO)
    records in the driver (in a terminal Ray prints them by the hundred)."""
    cam_uri, irn_uri, _ = models
    output = tmp_path / "out"
    spec = "builtin:num_images=3,image_size=64x64,num_classes=2"
    flags = ["--scales", "1.0", "--walk-steps", "16", "--max-side", "48", "--rows-per-file", "2", "--batch-size", "2",
             "--cpus-per-actor", "0.5", "--gpus-per-actor", "0", "--summary", str(tmp_path / "summary.json")]  # fmt: skip
    assert main(["label", "--images", spec, "--irn", irn_uri, "--output", str(output), *flags]) == 0
    captured = capfd.readouterr()
    printed = captured.out
    assert "labeled 3 image(s), 0 error(s)" in printed and "images/s" in printed and "mIoU" in printed
    assert "labeling: 3/3 images (100%)" in captured.err and " images/s, " in captured.err, captured.err
    assert printed.count("labeled 3 image(s)") == 1  # the summary once, on stdout
    for ray_line in ("logging_progress", "streaming_executor", "Running Dataset", "execution finished"):
        assert ray_line not in captured.err, captured.err
    ray_data_info = [r.getMessage() for r in caplog.records if r.name.startswith("ray.data") and r.levelno < logging.WARNING]
    assert ray_data_info == []
    assert json.loads((tmp_path / "summary.json").read_text())["total_labeled"] == 3
    assert (output / "_manifest.json").exists()

    for argv, message in (
        (["--irn", cam_uri], "expected an IRNet"),
        (["--irn", str(tmp_path / "none")], "no model there"),
        (["--irn", irn_uri, "--max-side", "8"], "max_side must be >= 16"),
        (["--irn", irn_uri, "--scales", "0.5,x"], "--scales must be comma-separated numbers"),
        (["--irn", irn_uri, "--min-actors", "9", "--max-actors", "9"], "the job would hang"),
    ):
        code = main(["label", "--images", spec, "--output", str(tmp_path / "other"), *argv])
        err = capfd.readouterr().err
        lines = err.strip().splitlines()  # the plan's "labeling N image(s) into ..." line may come first
        assert code == 2 and message in lines[-1] and all(line.startswith("labeling ") for line in lines[:-1]), err
        assert "Traceback" not in err


@pytest.mark.timeout(300)
def test_a_run_where_most_images_fail_ends_without_a_manifest(ray_cluster, models, synthetic, tmp_path):
    cam_uri, irn_uri, _ = models
    records = list(synthetic[0][:2]) + [ImageRecord(f"gone{i}", str(tmp_path / f"gone{i}.png"), (1,)) for i in range(3)]
    output = tmp_path / "out"
    with pytest.raises(LabelJobFailed, match=r"3 of 5 image\(s\) failed \(60%.*missing 3"):
        label_images(records, cam_uri, irn_uri, str(output), CONFIG)  # default max_error_rate 0.5
    assert not (output / "_manifest.json").exists()  # unfinished, not a complete manifest of errors
    summary = label_images(records, cam_uri, irn_uri, str(output), dataclasses.replace(CONFIG, max_error_rate=0.6))
    assert (summary["labeled"], summary["total_errors"], summary["skipped"]) == (0, 3, 5)  # all committed before
    manifest, labels, errors = _read_local(output)
    assert manifest["complete"] and sorted(e["reason"] for e in errors) == ["missing"] * 3


@pytest.mark.timeout(300)
def test_a_changed_file_under_a_committed_id_is_refused_or_relabeled(ray_cluster, models, synthetic, tmp_path):
    """A rerun whose image file was rewritten (other bytes, same id and path) is refused naming
    the id; --relabel-changed labels it again, the old row withdrawn through a commit (its
    committed file stays on disk, unlisted); every input row once in data or errors."""
    cam_uri, irn_uri, _ = models
    folder = tmp_path / "images"
    folder.mkdir()
    lines = ["image_id,image,classes"]
    names = dict(enumerate(synthetic[1].names, start=1))
    for record in synthetic[0][:5]:
        sample = load_synthetic(record.uri)
        Image.fromarray(sample.image).save(folder / f"{record.image_id}.png")
        lines.append(f"{record.image_id},images/{record.image_id}.png,{'|'.join(names[c] for c in record.classes)}")
    manifest = tmp_path / "set.csv"
    manifest.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    first = label_images(str(manifest), cam_uri, irn_uri, str(output), CONFIG)
    assert first["labeled"] == 5
    changed = synthetic[0][1].image_id
    time.sleep(0.01)
    Image.fromarray(load_synthetic(synthetic[0][6].uri).image).save(folder / f"{changed}.png")  # other bytes

    with pytest.raises(LabelJobError, match=rf"1 image id\(s\) committed .* now name another file \(e.g. {changed}:"):
        label_images(str(manifest), cam_uri, irn_uri, str(output), CONFIG)
    assert label_images(str(manifest), cam_uri, irn_uri, str(output), CONFIG, dry_run=True)["changed"] == 1

    second = label_images(str(manifest), cam_uri, irn_uri, str(output), CONFIG, relabel_changed=True)
    assert second["changed"] == 1 and second["labeled"] == 1 and second["skipped"] == 4
    manifest_json, labels, errors = _read_local(output)
    assert sorted(r["image_id"] for r in labels) == sorted(r.image_id for r in synthetic[0][:5]) and errors == []
    relabeled = [r for r in labels if r["image_id"] == changed]
    assert relabeled[0]["run_id"] == second["run_id"]
    commits = out.read_commits(str(output), StorageOptions())
    replaced = [c["replaces"] for c in commits if c.get("replaces")]
    assert replaced and all((output / path).exists() for path in replaced)  # committed files never deleted
    assert not set(replaced) & {f["path"] for f in manifest_json["data_files"]}
    third = label_images(str(manifest), cam_uri, irn_uri, str(output), CONFIG)  # nothing changed now
    assert third["changed"] == 0 and third["labeled"] == 0 and third["skipped"] == 5
