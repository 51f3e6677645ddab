"""Relation mining as a Ray Data job: decode -> CAM actor pool -> CRF tasks -> IR label Parquet.

The CAM model is a random-init ResNet-18 (the job's guarantees are under test, not CAM
quality); each job's output is compared with the pure functions it wraps.
"""

from __future__ import annotations

import io
import json

import faults
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from irnet_ray import model_files
from irnet_ray.config import BackboneConfig, CamInferenceConfig, RelationConfig, config_to_dict
from irnet_ray.data import ray_datasets as rd
from irnet_ray.data.decode import decode_png
from irnet_ray.data.sources import ClassVocabulary, ImageRecord, load_synthetic, synthetic_records
from irnet_ray.data.storage import StorageOptions
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.inference import infer_cams
from irnet_ray.mining import MANIFEST, MiningOptions, mine_relations_job
from irnet_ray.model_files import ModelFileError
from irnet_ray.models.cam import CamNet
from irnet_ray.pipeline.run import PipelineFailed
from irnet_ray.relations import ir_label_map

BACKBONE = BackboneConfig(arch="resnet18", frozen_batchnorm=False, first_trainable_stage=0)
CAM_INFERENCE = CamInferenceConfig(scales=(1.0, 0.5))
RELATIONS = RelationConfig(crf_iterations=3)
# Fractional actors and CRF tasks: the 4 logical CPUs of the test cluster never deadlock.
OPTIONS = MiningOptions(cpus_per_actor=0.5, crf_cpus=0.5, batch_size=3, rows_per_file=4)


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_records(SyntheticConfig(num_images=7, image_size=(64, 64), num_classes=2))


@pytest.fixture(scope="module")
def cam_model(tmp_path_factory, synthetic):
    _, vocabulary = synthetic
    torch.manual_seed(0)
    model = CamNet(BACKBONE, vocabulary.num_classes)
    folder = str(tmp_path_factory.mktemp("models") / "cam")
    model_files.save_model(folder, kind="cam", state_dict=model.state_dict(), config={"backbone": config_to_dict(BACKBONE)},
                    vocabulary=vocabulary, metrics=[])  # fmt: skip
    return folder


def _expected(cam_folder: str, image: np.ndarray, classes) -> np.ndarray:
    model, _ = model_files.load_cam_model(cam_folder)
    cams = infer_cams(model, image, classes, CAM_INFERENCE).highres
    # The job ships CAMs between stages as float16.
    cams = cams.to(torch.float16).float().numpy()
    return ir_label_map(image, cams, np.asarray(classes), RELATIONS)


def _rows(output: str) -> dict[str, dict]:
    manifest = json.loads(open(f"{output}/{MANIFEST}").read())
    tables = [pq.read_table(f"{output}/{f['path']}") for f in manifest["data_files"]]
    return {row["image_id"]: row for t in tables for row in t.to_pylist()}


@pytest.mark.timeout(300)
def test_mining_writes_committed_ir_labels_and_records_failures(ray_cluster, synthetic, cam_model, tmp_path):
    records, _ = synthetic
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    rows = list(records) + [ImageRecord("broken", str(broken), (1,)), ImageRecord("gone", str(tmp_path / "gone.png"), (2,)),
                            ImageRecord("alien", records[0].uri, (9,)),
                            ImageRecord("tiny", str(tmp_path / "tiny.png"), (1,))]  # fmt: skip
    output = str(tmp_path / "ir")
    summary = mine_relations_job(rows, cam_model, output, cam_inference=CAM_INFERENCE, relations=RELATIONS,
                                 options=OPTIONS)  # fmt: skip
    assert summary["mined"] == 7 and summary["images"] == 11 and not summary["already_complete"]
    reasons = {e["image_id"]: e["error"].split(":")[0] for e in summary["errors"]}
    assert reasons == {"broken": "not_an_image", "gone": "missing", "alien": "class_out_of_range", "tiny": "too_small"}
    manifest = json.loads(open(f"{output}/{MANIFEST}").read())
    assert manifest["rows"] == 7 and len(manifest["data_files"]) >= 2  # rows_per_file = 4
    mined = _rows(output)
    assert sorted(mined) == sorted(r.image_id for r in records)
    for record in records[:3]:
        image = load_synthetic(record.uri).image
        labels = decode_png(mined[record.image_id]["ir_labels_png"])
        np.testing.assert_array_equal(labels, _expected(cam_model, image, record.classes))
        assert set(np.unique(labels)) <= {0, 255, *record.classes}

    # A finished run is not mined again; other settings on the same folder are refused.
    again = mine_relations_job(rows, cam_model, output, cam_inference=CAM_INFERENCE, relations=RELATIONS,
                               options=OPTIONS)  # fmt: skip
    assert again["already_complete"] and again["mined"] == 7
    with pytest.raises(ValueError, match="mining settings differ"):
        mine_relations_job(rows, cam_model, output, cam_inference=CAM_INFERENCE,
                           relations=RelationConfig(crf_iterations=4), options=OPTIONS)  # fmt: skip

    # A pool that would take every CPU of the cluster is refused instead of hanging.
    with pytest.raises(ValueError, match="would hang"):
        mine_relations_job(rows, cam_model, str(tmp_path / "other"), cam_inference=CAM_INFERENCE,
                           relations=RELATIONS, options=MiningOptions(min_actors=4, max_actors=4))  # fmt: skip

    # IRNet training reads exactly the committed files.
    ds = rd.ir_label_dataset(output)
    assert sorted(ds.to_pandas()["image_id"]) == sorted(mined)


@pytest.mark.timeout(300)
def test_downscaled_mining_keeps_the_original_size_and_partial_runs_are_redone(ray_cluster, cam_model, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    big = np.asarray(Image.fromarray(load_synthetic(synthetic_records(
        SyntheticConfig(num_images=1, image_size=(64, 64), num_classes=2))[0][0].uri).image).resize((150, 120)))
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    records = [ImageRecord("big", str(path), (1, 2))]
    output = str(tmp_path / "ir")
    options = MiningOptions(max_side=64, cpus_per_actor=0.5, crf_cpus=0.5, rows_per_file=1)
    # An unfinished earlier run: stopped after its first commit, a stray uncommitted file beside.
    with monkeypatch.context() as patched, pytest.raises(PipelineFailed, match="injected fault"):
        faults.stop_after_commits(patched, 1)
        mine_relations_job(records + [ImageRecord("gone", str(tmp_path / "gone.png"), (1,))], cam_model, output,
                           cam_inference=CAM_INFERENCE, relations=RELATIONS, options=options)  # fmt: skip
    (tmp_path / "ir" / "data" / "part-stale.parquet").write_bytes(b"half a file")
    with pytest.raises(ValueError, match="did not finish"):
        rd.ir_label_dataset(output)
    summary = mine_relations_job(records, cam_model, output, cam_inference=CAM_INFERENCE, relations=RELATIONS,
                                 options=options)  # fmt: skip
    assert summary["mined"] == 1
    assert not (tmp_path / "ir" / "data" / "part-stale.parquet").exists()
    labels = decode_png(_rows(output)["big"]["ir_labels_png"])
    assert labels.shape == (120, 150)


@pytest.mark.timeout(300)
def test_mining_to_s3_over_http(ray_cluster, synthetic, cam_model, s3_server, s3_bucket, s3_client):
    records, _ = synthetic
    options = StorageOptions(endpoint_url=s3_server)
    s3_records = []
    for r in records[:3]:
        buffer = io.BytesIO()
        Image.fromarray(load_synthetic(r.uri).image).save(buffer, format="PNG")
        s3_client.put_object(Bucket=s3_bucket, Key=f"images/{r.image_id}.png", Body=buffer.getvalue())
        s3_records.append(ImageRecord(r.image_id, f"s3://{s3_bucket}/images/{r.image_id}.png", r.classes))
    output = f"s3://{s3_bucket}/runs/ir"
    summary = mine_relations_job(s3_records, cam_model, output, cam_inference=CAM_INFERENCE, relations=RELATIONS,
                                 options=OPTIONS, storage_options=options)  # fmt: skip
    assert summary["mined"] == 3 and not summary["errors"]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/ir/")["Contents"]}
    assert "runs/ir/_manifest.json" in keys
    table = rd.ir_label_dataset(output, options).to_pandas()
    assert sorted(table["image_id"]) == sorted(r.image_id for r in records[:3])
    for png, record in zip(table["ir_labels_png"], table["image_id"]):
        assert decode_png(png).shape == (64, 64)


def test_bad_arguments_fail_before_any_work(cam_model, tmp_path):
    record = [ImageRecord("a", str(tmp_path / "a.png"), (1,))]
    with pytest.raises(ValueError, match="empty"):
        mine_relations_job([], cam_model, str(tmp_path / "out"))
    with pytest.raises(ModelFileError, match="no model there"):
        mine_relations_job(record, str(tmp_path / "no-model"), str(tmp_path / "out"))
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds no irnet-ray-ir-labels output"):
        mine_relations_job(record, cam_model, str(tmp_path / "occupied"))
    assert (tmp_path / "occupied" / "holiday.jpg").exists()
    with pytest.raises(ValueError, match="max_actors"):
        MiningOptions(min_actors=3, max_actors=2)
    assert ClassVocabulary(("a", "b")).num_classes == 2
