"""Ray Train wiring: distributed CAM / IRNet training, checkpoints, resume, S3 storage, bad input.

One small local Ray cluster for the module (4 logical CPUs on any machine: two training
workers at 0.5 CPU plus decode tasks at 0.25 CPU never wait for each other). Every training
run is tiny (24 synthetic 64 px images, ResNet-18, a few epochs).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time

import faults
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from PIL import Image

from irnet_ray import model_files
from irnet_ray.config import BackboneConfig, CamTrainConfig, IrnTrainConfig, RelationConfig
from irnet_ray.data.decode import encode_png
from irnet_ray.data.sources import ImageRecord, load_synthetic, synthetic_records
from irnet_ray.data.storage import StorageOptions, StorageUnreachable
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.models.cam import normalize_images
from irnet_ray.train import ray_train
from irnet_ray.train.ray_train import (
    RunOptions,
    ScalingOptions,
    TrainingJobError,
    train_cam_job,
    train_irn_job,
)

BACKBONE = BackboneConfig(arch="resnet18", frozen_batchnorm=False, first_trainable_stage=0)
CAM = CamTrainConfig(epochs=8, batch_size=6, lr=0.01, backbone_lr_scale=1.0, crop_size=64, rescale_long_side=(56, 64))
IRN = IrnTrainConfig(epochs=4, batch_size=6, lr=0.05, crop_size=64, rescale=(0.9, 1.1), displacement_lr_scale=1.0)
RELATIONS = RelationConfig(radius=5)
TWO = ScalingOptions(num_workers=2, cpus_per_worker=0.5)
ONE = ScalingOptions(num_workers=1, cpus_per_worker=0.5)
DATA = SyntheticConfig(num_images=24, image_size=(64, 64), num_classes=2)


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_records(DATA)


@pytest.fixture(scope="module")
def cam_run(ray_cluster, synthetic, tmp_path_factory):
    """One CAM training on two workers, shared by the CAM and IRNet tests. It streams
    (``cache_decoded=False``: the workers' shards are decoded inside every epoch) and one of the
    24 rows names a missing image, which one worker meets and both report."""
    records, vocabulary = synthetic
    storage = tmp_path_factory.mktemp("runs")
    rows = list(records[:23]) + [ImageRecord("gone", str(storage / "gone.png"), (1,))]  # 12 + 12 rows
    faults.ship_by_value()
    digests = tmp_path_factory.mktemp("parameters")  # each worker's parameters after each epoch
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(ray_train, "train_loop_per_worker", faults.train_loop_recording_parameters(str(digests)))
        summary = train_cam_job(rows, vocabulary, backbone=BACKBONE, train=CAM, scaling=TWO,
                                run=RunOptions("cam", str(storage)), cache_decoded=False)  # fmt: skip
    return {**summary, "parameter_digests": {p.name: p.read_text() for p in digests.iterdir()}}


def _ir_label_parquet(path, records, like=None) -> str:
    """IR labels for the tests: the synthetic ground truth with an ignored band around every
    object (test input only; the product mines them from CAMs). Records that are not synthetic
    get the labels of ``like``."""
    from scipy import ndimage

    rows = []
    for r in records:
        semantic = load_synthetic(r.uri if r.uri.startswith("synthetic://") else like.uri).semantic
        edge = ndimage.binary_dilation(semantic > 0, iterations=2) & ~ndimage.binary_erosion(semantic > 0, iterations=2)
        labels = semantic.copy()
        labels[edge] = 255
        rows.append({"image_id": r.image_id, "uri": r.uri, "classes": list(r.classes), "ir_labels_png": encode_png(labels)})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image_id", pa.string()), ("uri", pa.string()), ("classes", pa.list_(pa.int32())), ("ir_labels_png", pa.binary()),
    ]))  # fmt: skip
    pq.write_table(table, path)
    return str(path)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# building blocks, without a cluster


def test_decode_batch_never_raises_and_downscales(tmp_path, synthetic):
    import pandas as pd

    from irnet_ray.data.images import row_image
    from irnet_ray.data.ray_datasets import decode_batch

    records, _ = synthetic
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    big = tmp_path / "big.png"
    big.write_bytes(_png(np.zeros((60, 200, 3), np.uint8)))
    rows = [records[0].to_row(), ImageRecord("broken", str(broken), (1,)).to_row(),
            ImageRecord("gone", str(tmp_path / "gone.png")).to_row(), ImageRecord("big", str(big), (2,)).to_row(),
            ImageRecord("weird", "synthetic://0/999999").to_row()]  # fmt: skip
    for batch in (pd.DataFrame(rows), {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}):
        out = decode_batch(batch, StorageOptions(), max_side=50)
        assert list(out["image_id"]) == ["synthetic-0-000000", "broken", "gone", "big", "weird"]
        errors = [e.split(":")[0] for e in out["error"]]
        assert errors[0] == "" and errors[3] == "", list(out["error"])
        assert errors[1] in ("not_an_image", "truncated") and errors[2] == "missing" and errors[4] == "bad_uri"
        assert (out["height"][0], out["width"][0]) == (50, 50) and (out["height"][3], out["width"][3]) == (15, 50)
        assert out["image"][1] == b"" and out["height"][1] == 0
        assert row_image({k: v[0] for k, v in out.items()}).shape == (50, 50, 3)
        assert [list(c) for c in out["classes"]] == [list(records[0].classes), [1], [], [2], []]


def test_decode_ir_batch_checks_the_label_map(synthetic):
    from irnet_ray.data.images import row_labels
    from irnet_ray.data.ray_datasets import decode_ir_batch

    records, _ = synthetic
    labels = np.full((64, 64), 255, np.uint8)
    labels[10:20, 10:20] = 1
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "uri": np.array([records[0].uri] * 3, dtype=object),
        "classes": np.array([[1], [1], [1]], dtype=object),
        "ir_labels_png": np.array([encode_png(labels), encode_png(labels[:32]), b"junk"], dtype=object),
    }
    out = decode_ir_batch(batch, StorageOptions(), max_side=32)
    assert out["error"][0] == "" and out["error"][1].startswith("label_size_mismatch: ")
    assert out["error"][2].startswith("bad_labels: ")
    small = row_labels({k: v[0] for k, v in out.items()})
    assert small.shape == (32, 32) and set(np.unique(small)) == {1, 255}  # nearest: no new values


def test_model_files_hold_no_secrets_and_load_weights_only(tmp_path, synthetic):
    _, vocabulary = synthetic
    state = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="credentials"):
        model_files.save_model(str(tmp_path / "m"), kind="cam", state_dict=state, config={"s3": {"secret_key": "x"}},
                        vocabulary=vocabulary, metrics=[])  # fmt: skip
    with pytest.raises(ValueError, match="mean_displacement"):
        model_files.save_model(str(tmp_path / "m"), kind="irn", state_dict=state, config={}, vocabulary=vocabulary, metrics=[])
    model_files.save_model(str(tmp_path / "m"), kind="cam", state_dict=state, config={"a": 1}, vocabulary=vocabulary,
                    metrics=[{"epoch": 0, "loss": 1.0}])  # fmt: skip
    loaded, meta = model_files.load_model(str(tmp_path / "m"))
    assert torch.equal(loaded["w"], state["w"]) and meta["config"] == {"a": 1} and meta["irnet_ray_version"]
    # A model.pt carrying arbitrary pickled objects is refused, never executed.
    torch.save({"w": torch.ones(2), "payload": _Payload()}, tmp_path / "m" / "model.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        model_files.load_model(str(tmp_path / "m"))


class _Payload:
    pass


@pytest.mark.timeout(30)
def test_options_validate_and_map_to_ray(tmp_path, s3_env):
    scaling = ScalingOptions(num_workers=2, cpus_per_worker=0.5).to_ray()
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 0.5}
    gpu = ScalingOptions(num_workers=1, use_gpu=True, gpus_per_worker=0.5).to_ray()
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    with pytest.raises(ValueError, match="name"):
        RunOptions("a/b", str(tmp_path))
    local = RunOptions("r", str(tmp_path), max_failures=1, keep_checkpoints=3).to_ray()
    assert local.storage_path == str(tmp_path) and local.storage_filesystem is None
    assert local.failure_config.max_failures == 1 and local.checkpoint_config.num_to_keep == 3
    remote = RunOptions("r", "s3://bucket/runs", StorageOptions(endpoint_url="http://127.0.0.1:9000")).to_ray()
    assert remote.storage_path == "bucket/runs" and type(remote.storage_filesystem).__name__ == "S3FileSystem"


# --------------------------------------------------------------------------------------
# 1-2: both stages on two workers


@pytest.mark.timeout(180)
def test_cam_training_on_two_workers(cam_run, synthetic):
    records, vocabulary = synthetic
    history = cam_run["history"]
    assert [h["epoch"] for h in history] == list(range(CAM.epochs))
    assert cam_run["epochs_run"] == list(range(CAM.epochs))
    assert cam_run["resumed_from_epoch"] is None and cam_run["worker_restarts"] == []
    assert history[-1]["loss"] < history[0]["loss"], [h["loss"] for h in history]
    assert all(h["images"] == 23 and h["errors"] == 1 for h in history)
    assert [e["image_id"] for e in cam_run["errors"]] == ["gone"] and cam_run["images"] == 23
    assert cam_run["errors"][0]["error"].startswith("missing: ")
    assert history[-1]["lr"] < CAM.lr
    # Data parallel: the workers train on different halves, and after every epoch both hold the
    # same parameters (DDP averaged their gradients); without the sync they would drift apart.
    digests = cam_run["parameter_digests"]
    assert sorted(digests) == sorted(f"epoch{e}.rank{r}" for e in range(CAM.epochs) for r in (0, 1))
    assert all(digests[f"epoch{e}.rank0"] == digests[f"epoch{e}.rank1"] for e in range(CAM.epochs)), digests
    assert len({digests[f"epoch{e}.rank0"] for e in range(CAM.epochs)}) == CAM.epochs  # they did train

    model_dir = cam_run["model_uri"]
    assert os.path.isfile(os.path.join(model_dir, "model.pt")) and os.path.isfile(os.path.join(model_dir, "model.json"))
    state, meta = model_files.load_model(model_dir)
    assert meta["kind"] == "cam" and meta["vocabulary"] == list(vocabulary.names)
    assert [m["epoch"] for m in meta["metrics"]] == list(range(CAM.epochs))
    assert meta["config"]["backbone"]["arch"] == "resnet18"
    text = json.dumps(meta).lower()
    assert "secret" not in text and FAKE_SECRET_KEY.lower() not in text
    model = model_files.build_cam_model(state, meta)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    image = torch.from_numpy(load_synthetic(records[0].uri).image).permute(2, 0, 1)[None]
    with torch.no_grad():
        assert model(normalize_images(image)).shape == (1, vocabulary.num_classes)


@pytest.mark.timeout(180)
def test_irn_training_on_two_workers(cam_run, synthetic, tmp_path):
    records, vocabulary = synthetic
    # 23 good rows and one whose image is gone (24 rows: the two shards are equal, none dropped).
    rows = list(records[:23]) + [ImageRecord("gone", str(tmp_path / "gone.png"), (1,))]
    labels = _ir_label_parquet(tmp_path / "ir_labels.parquet", rows, like=records[0])
    summary = train_irn_job(labels, cam_run["model_uri"], irn=IRN, relations=RELATIONS, scaling=TWO,
                            run=RunOptions("irn", str(tmp_path / "runs")))  # fmt: skip
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(IRN.epochs))
    assert history[-1]["loss"] < history[0]["loss"], [h["loss"] for h in history]
    assert all(h["images"] == 23 and h["errors"] == 1 for h in history)
    assert summary["images"] == 23
    assert [e["image_id"] for e in summary["errors"]] == ["gone"]
    assert summary["errors"][0]["error"].startswith("missing: ")
    mean = summary["mean_displacement"]
    assert len(mean) == 2 and all(np.isfinite(mean))

    state, meta = model_files.load_model(summary["model_uri"])
    assert meta["kind"] == "irn" and meta["config"]["cam_model"] == cam_run["model_uri"]
    assert meta["extra"]["mean_displacement"] == pytest.approx(mean)
    assert state["mean_displacement"].tolist() == pytest.approx(mean)
    irnet, cam, _ = model_files.load_irn_model(summary["model_uri"])
    assert irnet.mean_displacement.tolist() == pytest.approx(mean)
    image = torch.from_numpy(load_synthetic(records[0].uri).image).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = irnet(cam.backbone(normalize_images(image)))
    assert out.boundary.shape == (1, 16, 16) and out.displacement.shape == (1, 2, 16, 16)


# --------------------------------------------------------------------------------------
# 3: resume after a driver stop, and after a worker death


@pytest.mark.timeout(180)
def test_rerun_resumes_from_last_checkpoint_and_skips_finished_runs(ray_cluster, synthetic, tmp_path, monkeypatch):
    records, vocabulary = synthetic
    train = CamTrainConfig(epochs=4, batch_size=8, lr=0.05, backbone_lr_scale=1.0, crop_size=64, rescale_long_side=(56, 64))
    run = RunOptions("resume", str(tmp_path), max_failures=0)
    kwargs = dict(backbone=BACKBONE, train=train, scaling=ONE, run=run)
    faults.ship_by_value()
    with monkeypatch.context() as patched, pytest.raises(TrainingJobError, match="resume"):
        # The loop raises after its second epoch's checkpoint (max_failures=0: the run ends).
        patched.setattr(ray_train, "train_loop_per_worker",
                        faults.train_loop_failing_after(2, str(tmp_path / "stopped"), kill=False))  # fmt: skip
        train_cam_job(records, vocabulary, **kwargs)
    assert not os.path.exists(os.path.join(run.model_uri, "model.json"))

    summary = train_cam_job(records, vocabulary, **kwargs)
    assert summary["resumed_from_epoch"] == 2
    assert summary["epochs_run"] == [2, 3]
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3]
    assert len({h["run_id"] for h in summary["history"]}) == 2  # two driver runs made the history
    first = open(os.path.join(run.model_uri, "model.pt"), "rb").read()
    kept = [d for d in os.listdir(run.run_uri) if os.path.isfile(os.path.join(run.run_uri, d, "state.pt"))]
    assert len(kept) == run.keep_checkpoints == 2  # older checkpoints were deleted

    started = time.perf_counter()
    again = train_cam_job(records, vocabulary, **kwargs)
    assert time.perf_counter() - started < 10
    assert again["already_complete"] and again["epochs_run"] == [] and again["resumed_from_epoch"] == 4
    assert open(os.path.join(run.model_uri, "model.pt"), "rb").read() == first

    # The driver died after the last checkpoint but before writing the model: rebuilt, no training.
    shutil.rmtree(run.model_uri)
    rebuilt = train_cam_job(records, vocabulary, **kwargs)
    assert rebuilt["epochs_run"] == [] and rebuilt["resumed_from_epoch"] == 4
    assert time.perf_counter() - started < 20
    assert [h["epoch"] for h in rebuilt["history"]] == [0, 1, 2, 3]
    state, _ = model_files.load_model(run.model_uri)
    reference = model_files.state_dict_from_bytes(first)
    assert all(torch.equal(state[k], reference[k]) for k in reference)

    changed = dict(kwargs, train=dataclasses.replace(train, lr=0.01))
    with pytest.raises(ValueError, match="other settings.*lr"):
        train_cam_job(records, vocabulary, **changed)


@pytest.mark.timeout(120)
def test_training_sets_are_materialized_in_input_order(ray_cluster):
    """Decode tasks finish in any order; the training set keeps the input order, so the seeded
    shuffle makes a single-worker run repeatable."""
    import time

    import ray

    from irnet_ray.train.ray_train import _materialize

    def first_rows_finish_last(batch):
        time.sleep(0.5 * (8 - int(batch["image_id"][0])) / 8)
        return batch

    ds = ray.data.from_items([{"image_id": str(i), "error": ""} for i in range(8)], override_num_blocks=8)
    ds = ds.map_batches(first_rows_finish_last, batch_size=1, num_cpus=0.25)
    materialized, rows, errors = _materialize(ds, "test set")
    assert [r["image_id"] for r in materialized.take_all()] == [str(i) for i in range(8)]
    assert rows == 8 and errors == []


@pytest.mark.timeout(180)
def test_worker_death_restarts_from_the_last_checkpoint(ray_cluster, synthetic, tmp_path, monkeypatch):
    """The worker process dies after reporting epoch 0: Ray Train starts a new worker group,
    which resumes from the epoch-0 checkpoint (FailureConfig(max_failures=1))."""
    records, vocabulary = synthetic
    train = CamTrainConfig(epochs=2, batch_size=8, lr=0.05, backbone_lr_scale=1.0, crop_size=64, rescale_long_side=(56, 64))
    run = RunOptions("killed", str(tmp_path / "runs"), max_failures=1)
    faults.ship_by_value()
    # The delay lets the controller poll the epoch-0 report (every 0.5 s here) before the death.
    monkeypatch.setattr(ray_train, "train_loop_per_worker",
                        faults.train_loop_failing_after(1, str(tmp_path / "killed"), kill=True, delay_s=2.0))
    summary = train_cam_job(records, vocabulary, backbone=BACKBONE, train=train, scaling=ONE, run=run)
    assert os.path.exists(str(tmp_path / "killed") + ".rank0")  # the worker really died once
    assert [h["epoch"] for h in summary["history"]] == [0, 1]  # every epoch exactly once
    starts = [h["session_start"] for h in summary["history"]]
    assert starts == [0, 1], starts  # the new worker group started from the epoch-0 checkpoint
    assert summary["worker_restarts"] == [1] and summary["resumed_from_epoch"] is None


# --------------------------------------------------------------------------------------
# 4: images, checkpoints and the model on S3 (moto over HTTP); 5: one corrupt image


@pytest.mark.timeout(180)
def test_s3_images_checkpoints_and_model(ray_cluster, synthetic, s3_server, s3_bucket, s3_client):
    records, vocabulary = synthetic
    options = StorageOptions(endpoint_url=s3_server)
    s3_records = []
    for r in records[:12]:
        key = f"images/{r.image_id}.png"
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=_png(load_synthetic(r.uri).image))
        s3_records.append(ImageRecord(r.image_id, f"s3://{s3_bucket}/{key}", r.classes))
    # One corrupt image among the good ones: training goes on and the summary names it.
    png = _png(load_synthetic(records[12].uri).image)
    s3_client.put_object(Bucket=s3_bucket, Key="images/corrupt.png", Body=png[:200])  # truncated
    s3_records.append(ImageRecord("corrupt", f"s3://{s3_bucket}/images/corrupt.png", (1,)))
    train = CamTrainConfig(epochs=1, batch_size=6, lr=0.05, backbone_lr_scale=1.0, crop_size=64, rescale_long_side=(56, 64))
    run = RunOptions("cam-s3", f"s3://{s3_bucket}/runs", storage_options=options, keep_checkpoints=1)
    summary = train_cam_job(s3_records, vocabulary, backbone=BACKBONE, train=train, scaling=ONE, run=run,
                            storage_options=options)  # fmt: skip
    assert summary["model_uri"] == f"s3://{s3_bucket}/runs/cam-s3/model"
    assert summary["images"] == 12
    assert [e["image_id"] for e in summary["errors"]] == ["corrupt"]
    assert summary["errors"][0]["error"].split(":")[0] in ("truncated", "not_an_image")
    assert summary["history"][0]["errors"] == 1 and summary["history"][0]["images"] == 12

    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/cam-s3/")["Contents"]]
    assert "runs/cam-s3/model/model.pt" in keys and "runs/cam-s3/model/model.json" in keys
    assert "runs/cam-s3/irnet_run.json" in keys
    assert "runs/cam-s3/checkpoint_manager_snapshot.json" in keys
    checkpoints = {k.split("/")[2] for k in keys if k.endswith("/state.pt")}
    assert len(checkpoints) == 1
    assert not any(k.startswith("runs/cam-s3/model") and "state" in k for k in keys)

    state, meta = model_files.load_model(summary["model_uri"], options)
    assert meta["kind"] == "cam" and len(meta["metrics"]) == 1
    assert meta["extra"]["errors"] == summary["errors"]
    body = s3_client.get_object(Bucket=s3_bucket, Key="runs/cam-s3/model/model.json")["Body"].read().decode()
    assert FAKE_SECRET_KEY not in body and FAKE_ACCESS_KEY not in body
    model_files.build_cam_model(state, meta)


# --------------------------------------------------------------------------------------
# 5: bad input


@pytest.mark.timeout(60)
def test_empty_record_list_is_refused_before_training(tmp_path):
    records, vocabulary = synthetic_records(SyntheticConfig(num_images=1, image_size=(64, 64), num_classes=2))
    with pytest.raises(ValueError, match="empty"):
        train_cam_job([], vocabulary, backbone=BACKBONE, train=CAM, scaling=ONE, run=RunOptions("x", str(tmp_path)))
    assert not os.listdir(tmp_path)


@pytest.mark.timeout(60)
def test_unreachable_run_storage_is_refused_before_training(ray_cluster, synthetic, s3_env):
    records, vocabulary = synthetic
    options = StorageOptions(endpoint_url="http://127.0.0.1:9", connect_timeout=1, request_timeout=2, max_attempts=1)
    run = RunOptions("x", "s3://bucket/runs", storage_options=options)
    with pytest.raises(StorageUnreachable, match="127.0.0.1:9"):
        train_cam_job(records, vocabulary, backbone=BACKBONE, train=CAM, scaling=ONE, run=run)


@pytest.mark.timeout(90)
def test_every_image_undecodable_is_a_clear_error(ray_cluster, tmp_path, synthetic):
    _, vocabulary = synthetic
    records = []
    for i in range(4):
        path = tmp_path / f"broken{i}.jpg"
        path.write_bytes(b"this is not an image " * 10)
        records.append(ImageRecord(f"broken{i}", str(path), (1,)))
    records.append(ImageRecord("gone", str(tmp_path / "missing.png"), (2,)))
    run = RunOptions("bad", str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=r"every image .* failed") as info:
        train_cam_job(records, vocabulary, backbone=BACKBONE, train=CAM, scaling=ONE, run=run)
    assert "not_an_image" in str(info.value) and "missing" in str(info.value)
    assert not os.path.exists(os.path.join(run.run_uri, "checkpoint_manager_snapshot.json"))
