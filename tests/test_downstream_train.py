"""Mask R-CNN and DeepLab trained on a labeling run's pseudo masks (train-maskrcnn / train-deeplab).

The labeling output is the hand-made one of ``test_downstream`` (64 x 64 images, known
instances, a score-0 fragment), with a fourth image so that two workers get two images each.
Training runs on real Ray Train (the module's local cluster) from Parquet and images on a moto
S3 server over HTTP; models are tiny steps from scratch (one or two steps per run).
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import torch
from test_downstream import INSTANCES, SIZE, _row, write_output

from irnet_ray import model_files
from irnet_ray.cli import main
from irnet_ray.config import DeepLabTrainConfig, MaskRcnnTrainConfig, config_to_dict
from irnet_ray.data.storage import StorageOptions, join
from irnet_ray.downstream.readers import instance_targets, masks_to_boxes, open_labels, semantic_target
from irnet_ray.downstream.runs import LabelRunError
from irnet_ray.train import downstream as ds_train
from irnet_ray.train.ray_train import RunOptions, ScalingOptions, train_deeplab_job, train_maskrcnn_job

FILES = [["a", "cls/b"], ["c", "d"]]  # "d" has the instances of "a"
ONE = ScalingOptions(num_workers=1, cpus_per_worker=0.5)
TWO = ScalingOptions(num_workers=2, cpus_per_worker=0.5)
DEEPLAB = DeepLabTrainConfig(epochs=1, batch_size=2, lr=0.01, crop_size=64, rescale=(0.9, 1.1))
MASKRCNN = MaskRcnnTrainConfig(epochs=1, batch_size=4, lr=0.002, min_size=64, max_size=64)


def _rows_of(image_id: str, uri: str) -> dict:
    return _row(image_id, uri, instances=INSTANCES["a"] if image_id == "d" else None)


def _write(root: str, images: str, options: StorageOptions = StorageOptions(), **kwargs) -> str:
    return write_output(root, images, options, files=kwargs.pop("files", FILES), rows_of=_rows_of, **kwargs)


@pytest.fixture
def s3_labels(s3_server, s3_bucket, s3_client):
    """(labels URI, storage options, bucket): the labeling output and its images on moto S3."""
    options = StorageOptions(endpoint_url=s3_server)
    return _write(f"s3://{s3_bucket}/labels", f"s3://{s3_bucket}/images", options), options, s3_bucket


# --------------------------------------------------------------------------------------
# the pieces the workers use, without a cluster


@pytest.mark.timeout(60)
def test_decoded_rows_and_batches_carry_the_readers_targets(tmp_path):
    """The decode tasks' rows hold exactly the readers' targets (kept masks and classes; the
    semantic map), and the batches the workers build from them have the right boxes, labels and
    masks (flipped together with the image) and the crop's padding ignored."""
    run = open_labels(_write(str(tmp_path / "labels"), str(tmp_path / "images")))
    table = run.read_file(0, list(ds_train.LABEL_COLUMNS))
    instance = ds_train.decode_label_batch(table, run, "instance")
    semantic = ds_train.decode_label_batch(table, run, "semantic")
    rows = [{k: v[n] for k, v in instance.items()} for n in range(2)]
    for n, row in enumerate(table.to_pylist()):
        assert instance["error"][n] == "" and instance["image_id"][n] == row["image_id"]
        masks, classes = ds_train.row_instances(rows[n])
        expected = instance_targets(row, run)
        assert np.array_equal(masks, expected["masks"].numpy().astype(bool))
        assert classes.tolist() == expected["labels"].tolist()
        decoded = {k: v[n] for k, v in semantic.items()}
        assert np.array_equal(ds_train.row_semantic(decoded), semantic_target(row, run).numpy())
    assert [len(ds_train.row_instances(r)[1]) for r in rows] == [2, 1]  # the score-0 / 10 px pieces dropped

    images, targets = ds_train.prepare_instance(rows, np.random.default_rng(0), MaskRcnnTrainConfig(hflip=False))
    assert images[0].shape == (3, SIZE, SIZE) and images[0].dtype == torch.float32 and float(images[0].max()) <= 1
    masks, _ = ds_train.row_instances(rows[0])
    assert torch.equal(targets[0]["boxes"], torch.from_numpy(masks_to_boxes(masks)))
    assert targets[0]["boxes"].tolist() == [[10, 8, 30, 24], [35, 30, 60, 50]]
    assert targets[0]["labels"].tolist() == [1, 2] and targets[0]["masks"].dtype == torch.uint8
    assert np.random.default_rng(2).random() < 0.5  # the draw that flips the first image
    flipped = ds_train.prepare_instance(rows[:1], np.random.default_rng(2), MaskRcnnTrainConfig(hflip=True))
    assert torch.equal(flipped[0][0], images[0].flip(-1))
    assert torch.equal(flipped[1][0]["masks"], targets[0]["masks"].flip(-1))
    assert flipped[1][0]["boxes"].tolist() == [[SIZE - 30, 8, SIZE - 10, 24], [SIZE - 60, 30, SIZE - 35, 50]]

    batch = ds_train.prepare_semantic([{k: v[0] for k, v in semantic.items()}], np.random.default_rng(0),
                                      DeepLabTrainConfig(crop_size=80, rescale=(1.0, 1.0), hflip=False))  # fmt: skip
    labels = batch["labels"][0]
    assert batch["image"].shape == (1, 3, 80, 80) and labels.dtype == torch.int64
    assert int((labels != 255).sum()) == SIZE * SIZE  # the padding is ignored
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 255]


@pytest.mark.timeout(60)
def test_backbone_weights_file_is_loaded_and_a_wrong_one_refused(tmp_path):
    """--backbone-weights: a torchvision ResNet-50 state dict starts both models' backbones
    (Mask R-CNN then has frozen BatchNorm, as torchvision builds a pretrained backbone); a file
    of another network is refused naming what does not fit."""
    from torchvision.models import resnet18, resnet50

    torch.manual_seed(1)
    state = resnet50().state_dict()
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": state}, path)
    loaded = ds_train.load_backbone_state(str(path))
    assert "fc.weight" not in loaded
    deeplab = ds_train.build_deeplab(2, DeepLabTrainConfig(backbone_weights=str(path)), loaded)
    assert torch.equal(deeplab.backbone.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    maskrcnn = ds_train.build_maskrcnn(2, MaskRcnnTrainConfig(backbone_weights=str(path)), loaded)
    body = maskrcnn.backbone.body
    assert torch.equal(body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad  # 3 trainable stages
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"

    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="do not fit torchvision's ResNet-50"):
        ds_train.build_deeplab(2, DEEPLAB, ds_train.load_backbone_state(str(tmp_path / "r18.pth")))


# --------------------------------------------------------------------------------------
# training on Ray Train, labels and run storage on S3 over HTTP


@pytest.mark.timeout(120)
def test_maskrcnn_trains_on_s3_labels(ray_cluster, s3_labels, tmp_path):
    """One Mask R-CNN step (one worker) on the four labeled images read from S3: the targets
    reach the model's mask head, and the model is written with its config. (The run storage is
    local: the ~170 MB checkpoints take minutes through moto; S3 run storage is test_ray_train's.)"""
    labels, options, bucket = s3_labels
    run = RunOptions("mrcnn", str(tmp_path / "runs"), keep_checkpoints=1)
    summary = train_maskrcnn_job(labels, train=MASKRCNN, scaling=ONE, run=run, storage_options=options)
    assert summary["kind"] == "maskrcnn" and summary["images"] == 4 and summary["errors"] == []
    epoch = summary["history"][0]
    assert epoch["steps"] == 1 and epoch["images"] == 4
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(epoch)
    assert epoch["loss_mask"] > 0 and np.isfinite(epoch["loss"])
    assert os.path.exists(join(run.run_uri, "irnet_run.json"))
    state, meta = model_files.load_model(summary["model_uri"])
    assert meta["kind"] == "maskrcnn" and meta["vocabulary"] == ["cat", "dog"]
    assert meta["config"]["train"] == config_to_dict(MASKRCNN) and meta["config"]["labels"] == labels
    model = ds_train.build_maskrcnn(2, MASKRCNN)
    model.load_state_dict(state)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # background + 2 classes


@pytest.mark.timeout(150)
def test_deeplab_trains_on_two_workers_and_a_rerun_returns_at_once(ray_cluster, s3_labels, tmp_path):
    """One DeepLab step on two workers (two images each) from S3 labels; the same call again
    returns the finished model without training, and rebuilds it from the last checkpoint when
    the model folder is gone (run storage local, as above)."""
    labels, options, bucket = s3_labels
    run = RunOptions("deeplab", str(tmp_path / "runs"), keep_checkpoints=1)
    summary = train_deeplab_job(labels, train=DEEPLAB, scaling=TWO, run=run, storage_options=options)
    assert summary["kind"] == "deeplab" and summary["images"] == 4
    epoch = summary["history"][0]
    assert epoch["steps"] == 1 and epoch["images"] == 4
    assert epoch["loss_out"] > 0 and epoch["loss_aux"] > 0 and np.isfinite(epoch["loss"])
    state, meta = model_files.load_model(summary["model_uri"])
    assert meta["kind"] == "deeplab" and meta["config"]["train"] == config_to_dict(DEEPLAB)
    assert state["classifier.4.weight"].shape[0] == 3
    weights = open(join(run.model_uri, "model.pt"), "rb").read()

    started = time.perf_counter()
    again = train_deeplab_job(labels, train=DEEPLAB, scaling=TWO, run=run, storage_options=options)
    assert time.perf_counter() - started < 10
    assert again["already_complete"] and again["epochs_run"] == []
    assert open(join(run.model_uri, "model.pt"), "rb").read() == weights

    # The driver stopped after the last checkpoint, before writing the model: rebuilt from it.
    shutil.rmtree(run.model_uri)
    rebuilt = train_deeplab_job(labels, train=DEEPLAB, scaling=TWO, run=run, storage_options=options)
    assert rebuilt["resumed_from_epoch"] == 1 and rebuilt["epochs_run"] == []
    assert open(join(run.model_uri, "model.pt"), "rb").read() == weights


# --------------------------------------------------------------------------------------
# bad input: a clear error, nothing written


@pytest.mark.timeout(60)
def test_unfinished_or_empty_labeling_runs_are_refused_and_nothing_is_written(tmp_path, capsys):
    unfinished = _write(str(tmp_path / "unfinished"), str(tmp_path / "images"), manifest=False)
    empty = _write(str(tmp_path / "empty"), str(tmp_path / "images"), files=[[]])
    storage = tmp_path / "runs"
    for job, train in ((train_deeplab_job, DEEPLAB), (train_maskrcnn_job, MASKRCNN)):
        run = RunOptions("x", str(storage))
        with pytest.raises(LabelRunError, match="did not finish.*rerun the same `irnet-ray label`"):
            job(unfinished, train=train, run=run)
        with pytest.raises(LabelRunError, match="labeled 0 images"):
            job(empty, train=train, run=run)
        with pytest.raises(LabelRunError, match="no labeling output"):
            job(str(tmp_path / "nowhere"), train=train, run=run)
    assert not storage.exists()

    for command in ("train-deeplab", "train-maskrcnn"):
        status = main([command, "--labels", unfinished, "--storage", str(storage), "--run-name", "x",
                       "--gpus-per-worker", "0"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith(f"irnet-ray {command}: the labeling run"), err
    assert not storage.exists()

    labels = _write(str(tmp_path / "labels"), str(tmp_path / "images"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    bad = MaskRcnnTrainConfig(backbone_weights=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="do not fit"):
        train_maskrcnn_job(labels, train=bad, run=RunOptions("x", str(storage)))
    with pytest.raises(TypeError, match="DeepLabTrainConfig"):
        train_deeplab_job(labels, train=MASKRCNN, run=RunOptions("x", str(storage)))
    assert not storage.exists()
