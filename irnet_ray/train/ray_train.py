"""Distributed CAM and IRNet training on Ray Train (V2), inputs through Ray Data.

The math is the plain training code of :mod:`irnet_ray.train.cam` / :mod:`irnet_ray.train.irn`
(optimisers, losses, mean displacement); this module only adds the Ray wiring:

* Inputs: the driver builds a Ray Dataset of decoded, downscaled images
  (:mod:`irnet_ray.data.ray_datasets`; decode tasks reserve ``decode_cpus`` = 0.25 CPU each so
  they never starve the training workers on a small machine). By default it is materialised
  once (``cache_decoded=True``): decoding runs once for all epochs and restarts, the driver
  knows the exact number of usable images (the poly schedule needs the total step count up
  front) and the list of failed images, and an unusable set (no records, every image failing)
  is refused before any worker starts. ``cache_decoded=False`` streams instead (decoding
  again every epoch; for sets larger than the object store); the workers then report the
  failed images.
* Workers: ``TorchTrainer`` runs :func:`train_loop_per_worker` on every worker (DDP over gloo
  on CPU, nccl on GPU, via ``ray.train.torch.prepare_model``). Each worker augments its shard
  on CPU with :func:`irnet_ray.data.transforms.augment`. Rows whose image failed are skipped
  and counted; workers agree on every step (one tiny all-reduce), so a batch that is empty on
  one worker can never leave DDP waiting.
* Checkpoints: at the end of every epoch every worker calls ``ray.train.report`` (a barrier);
  rank 0 attaches a checkpoint folder with ``state.pt`` (model, optimiser and scheduler state
  dicts, ``torch.save``; loaded with ``weights_only=True``) and ``state.json`` (completed
  epochs and the metrics history). Ray keeps ``RunOptions.keep_checkpoints`` of them under
  ``{storage}/{name}/``.
* Resume: Ray Train V2 has no ``Trainer.restore``. Its controller writes
  ``{storage}/{name}/checkpoint_manager_snapshot.json`` after every checkpoint and, when a
  trainer starts with the same ``storage_path`` + ``name``, loads it, so
  ``ray.train.get_checkpoint()`` in the workers returns the latest checkpoint - after a worker
  failure (``FailureConfig(max_failures)``: the worker group is restarted in the same ``fit``)
  and after a driver restart alike. The loop restores model, optimiser, scheduler, epoch and
  history from it. The driver reads the same state beforehand (``ray.train.Result.from_path``)
  to report ``resumed_from_epoch`` and, when every epoch is already done, skips training.
  ``{storage}/{name}/irnet_run.json`` records the settings of the run: a rerun under the same
  name with different settings is refused instead of silently mixing two trainings.
* Output: the driver writes the final model with :func:`irnet_ray.model_files.save_model`
  to ``{storage}/{name}/model/`` (IRNet: after computing the mean displacement over the
  training images, all-reduced over workers) and returns a summary dict.

Storage: ``RunOptions.storage`` is a local path or ``s3://bucket/prefix``; for S3 the pyarrow
filesystem of :func:`irnet_ray.data.storage.resolve` (custom endpoint included) is passed to
Ray as ``storage_filesystem`` with a scheme-less path. Credentials come from the AWS chain of
each node's processes (never from configs).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch

from irnet_ray import model_files
from irnet_ray.config import (
    BackboneConfig,
    CamTrainConfig,
    DeepLabTrainConfig,
    IrnTrainConfig,
    MaskRcnnTrainConfig,
    RelationConfig,
    config_from_dict,
    config_to_dict,
)
from irnet_ray.data import ray_datasets as rd
from irnet_ray.data.images import records_fingerprint, row_image, row_labels, summarize_errors
from irnet_ray.data.sources import ClassVocabulary, ImageRecord
from irnet_ray.data.storage import (
    StorageOptions,
    StorageUnreachable,
    exists,
    join,
    normalize,
    read_bytes,
    resolve,
    write_bytes,
)
from irnet_ray.train import downstream

__all__ = [
    "ScalingOptions",
    "RunOptions",
    "TrainingJobError",
    "ensure_ray",
    "train_cam_job",
    "train_irn_job",
    "train_deeplab_job",
    "train_maskrcnn_job",
    "train_loop_per_worker",
]

RUN_RECORD = "irnet_run.json"
MODEL_FOLDER = "model"
STATE_WEIGHTS = "state.pt"
STATE_META = "state.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_REPORTED_ERRORS = 1000
_SHUFFLE_BUFFER_ROWS = 256


class TrainingJobError(RuntimeError):
    """Training failed in the workers (the message says how to resume)."""


# --------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class ScalingOptions:
    """Workers of a training run. ``cpus_per_worker`` may be fractional (0.5 lets two workers
    and the decode tasks share a 2-core machine); ``gpus_per_worker`` counts only with
    ``use_gpu``."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if int(self.num_workers) < 1:
            raise ValueError(f"ScalingOptions.num_workers must be >= 1, got {self.num_workers}")
        if float(self.cpus_per_worker) <= 0:
            raise ValueError(f"ScalingOptions.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and float(self.gpus_per_worker) <= 0:
            raise ValueError(f"ScalingOptions.gpus_per_worker must be > 0, got {self.gpus_per_worker}")

    def to_ray(self) -> ray.train.ScalingConfig:
        resources: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            resources["GPU"] = float(self.gpus_per_worker)
        return ray.train.ScalingConfig(
            num_workers=int(self.num_workers), use_gpu=bool(self.use_gpu), resources_per_worker=resources
        )

    @property
    def torch_threads(self) -> int:
        return max(1, int(round(float(self.cpus_per_worker))))


@dataclass(frozen=True)
class RunOptions:
    """Where a run lives: ``{storage}/{name}/`` holds Ray's checkpoints and run state, the run
    record and ``model/``. Rerunning with the same ``name`` and ``storage`` resumes."""

    name: str
    storage: str
    storage_options: StorageOptions = StorageOptions()
    max_failures: int = 2
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"RunOptions.name must be letters, digits, '.', '_' or '-' (no '/'), got {self.name!r}"
            )
        if not isinstance(self.storage, str) or not self.storage:
            raise ValueError("RunOptions.storage must be a local path or an s3:// URI")
        resolve(self.storage, self.storage_options)  # validates the scheme
        if int(self.max_failures) < -1:
            raise ValueError(f"RunOptions.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if int(self.keep_checkpoints) < 1:
            raise ValueError(f"RunOptions.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    @property
    def run_uri(self) -> str:
        return join(normalize(self.storage), self.name)

    @property
    def model_uri(self) -> str:
        return join(self.run_uri, MODEL_FOLDER)

    def filesystem(self):
        """(pyarrow filesystem or None, storage path for Ray)."""
        fs, path = resolve(self.storage, self.storage_options)
        if isinstance(fs, pafs.LocalFileSystem):
            return None, path
        return fs, path

    def to_ray(self) -> ray.train.RunConfig:
        fs, path = self.filesystem()
        return ray.train.RunConfig(
            name=self.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=int(self.max_failures)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(self.keep_checkpoints)),
        )


def ensure_ray(
    num_cpus: int | None = None,
    address: str | None = None,
    *,
    object_store_memory: int | None = 256 * 1024**2,
    include_dashboard: bool = True,
) -> None:
    """Connect to ``address`` (a running cluster), or start a local Ray with a small object store.

    Does nothing when Ray is already initialised. ``address`` defaults to ``RAY_ADDRESS``;
    ``"local"`` always starts a private Ray. Without either, a cluster that ``ray start`` left
    running on this machine is used as it is (its own CPUs, not ``num_cpus``), and one that died
    without ``ray stop`` is ignored; a line on stderr says which. The
    dashboard is on by default: Ray Train's placement-group cleaner asks its state API about the
    controller and, without it, warns every few seconds for the whole run. Token authentication stays as Ray sets it:
    only job-submission clients need tokens, ``ray.init`` of a local cluster does not.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set for drivers of `ray job submit`
    if address and address != "local":
        ray.init(address=address)
        return
    if address is None:
        # ray.init() alone would join the cluster of the last `ray start` on this machine, and
        # fail when that one died without `ray stop` (or refuse our num_cpus): decide here, and say so.
        from ray._private.utils import read_ray_address

        started = read_ray_address()
        if started and _reachable(started):
            print(f"irnet-ray: using the Ray cluster already running on this machine at {started} (started by "
                  "`ray start`), as it is; --ray-address local starts a private one instead", file=sys.stderr)  # fmt: skip
            ray.init(address="auto")  # "auto" (not the address itself): Ray then also takes the cluster's auth token
            return
        if started:
            print(f"irnet-ray: the Ray cluster of the last `ray start` ({started}) is no longer running; starting a "
                  "private local Ray", file=sys.stderr)  # fmt: skip
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=include_dashboard)  # fmt: skip


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts connections at ``host:port`` (a live GCS)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------
# the per-worker training loop


def _dist_ready(world: int) -> bool:
    return world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(values: list[float], world: int, op: str = "sum") -> list[float]:
    if not _dist_ready(world):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor.tolist()


def _all_gather(value: Any, world: int) -> list:
    if not _dist_ready(world):
        return [value]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def _batch_rows(batch: dict) -> list[dict]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def _multi_hot(classes: Any, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes)
    ids = [int(c) for c in np.asarray(classes if classes is not None else [], dtype=np.int64).reshape(-1)]
    if ids:
        target[torch.as_tensor(ids) - 1] = 1.0
    return target


def _prepare_cam(rows: list[dict], rng: np.random.Generator, cfg: CamTrainConfig, num_classes: int):
    from irnet_ray.data.transforms import augment, to_chw_tensor
    from irnet_ray.models.cam import crop_fill

    crops, targets = [], []
    for row in rows:
        image = to_chw_tensor(row_image(row))
        crop = augment(image, None, rng, crop_size=cfg.crop_size, long_side_range=tuple(cfg.rescale_long_side),
                       hflip=cfg.hflip, fill=crop_fill(cfg.crop_padding), antialias=cfg.antialias)[0]  # fmt: skip
        crops.append(crop)
        targets.append(_multi_hot(row["classes"], num_classes))
    return {"image": torch.stack(crops), "labels": torch.stack(targets)}


def _prepare_irn(rows: list[dict], rng: np.random.Generator, cfg: IrnTrainConfig):
    from irnet_ray.data.transforms import augment, to_chw_tensor
    from irnet_ray.models.cam import crop_fill
    from irnet_ray.relations import downsample_labels

    crops, labels = [], []
    for row in rows:
        image = to_chw_tensor(row_image(row))
        label_map = torch.from_numpy(row_labels(row))
        crop, crop_labels, _ = augment(image, label_map, rng, crop_size=cfg.crop_size, scale_range=tuple(cfg.rescale),
                                       hflip=cfg.hflip, fill=crop_fill(cfg.crop_padding),
                                       antialias=cfg.antialias)  # fmt: skip
        crops.append(crop)
        labels.append(torch.from_numpy(np.ascontiguousarray(downsample_labels(crop_labels.numpy()))))
    return {"image": torch.stack(crops), "labels": torch.stack(labels)}


def _lockstep(batches, world: int):
    """Yield ``(good_rows, failed_rows, step)`` per batch; ``step`` is True only when every
    worker has usable rows, so all workers take the same optimiser steps (DDP collectives)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        rows = _batch_rows(batch) if batch is not None else []
        good = [r for r in rows if not r["error"]]
        failed = [r for r in rows if r["error"]]
        have, bad = (batch is not None), not good
        if _dist_ready(world):
            flags = torch.tensor([int(have), int(bad)], dtype=torch.int64)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            any_have, any_bad = bool(flags[0]), bool(flags[1])
        else:
            any_have, any_bad = have, bad
        if not any_have:
            return
        yield good, failed, not any_bad


class _CamTask:
    """CAM: multi-label soft margin on image-level labels (:mod:`irnet_ray.train.cam`)."""

    def __init__(self, config: dict, device) -> None:
        from irnet_ray.models.cam import CamNet

        self.cfg = config_from_dict(CamTrainConfig, config["train"])
        self.num_classes = int(config["num_classes"])
        torch.manual_seed(self.cfg.seed)
        self.net: torch.nn.Module = CamNet(config_from_dict(BackboneConfig, config["backbone"]), self.num_classes)

    def optimizer(self, inner, total_steps: int):
        from irnet_ray.train.cam import cam_optimizer

        return cam_optimizer(inner, self.cfg, total_steps)

    def start_epoch(self, epoch: int, rank: int) -> None:
        pass

    def step(self, model, rows: list[dict], rng: np.random.Generator, device):
        from irnet_ray.train.cam import cam_loss

        batch = _prepare_cam(rows, rng, self.cfg, self.num_classes)
        return cam_loss(model, batch["image"].to(device), batch["labels"].to(device).float()), {}

    def lr(self, optimizer) -> float:  # the head's rate (the backbone runs at lr * backbone_lr_scale)
        return optimizer.param_groups[-1]["lr"]

    def end_of_training(self, shard, inner, world: int, device, metrics: dict) -> None:
        pass


class _IrnTask:
    """IRNet on the frozen backbone of a CAM model (:mod:`irnet_ray.train.irn`)."""

    def __init__(self, config: dict, device) -> None:
        from irnet_ray.models.irnet import IRNet

        self.cfg = config_from_dict(IrnTrainConfig, config["train"])
        self.relations = config_from_dict(RelationConfig, config["relations"])
        options = StorageOptions(**config["storage_options"])
        cam, _ = model_files.load_cam_model(config["cam_model"], options)
        self.backbone = cam.backbone.to(device).eval().requires_grad_(False)
        torch.manual_seed(self.cfg.seed)
        self.net: torch.nn.Module = IRNet(self.backbone.channels)

    def optimizer(self, inner, total_steps: int):
        from irnet_ray.train.irn import irn_optimizer

        return irn_optimizer(inner, self.cfg, total_steps)

    def start_epoch(self, epoch: int, rank: int) -> None:
        pass

    def step(self, model, rows: list[dict], rng: np.random.Generator, device):
        from irnet_ray.train.irn import irn_step_losses

        batch = _prepare_irn(rows, rng, self.cfg)
        losses = irn_step_losses(self.backbone, model, batch["image"].to(device), batch["labels"].to(device),
                                 self.relations.radius)  # fmt: skip
        return losses.total, {k: v for k, v in losses.as_floats().items() if k != "total"}

    def lr(self, optimizer) -> float:
        return optimizer.param_groups[0]["lr"]

    def end_of_training(self, shard, inner, world: int, device, metrics: dict) -> None:
        """Mean displacement over the (un-augmented) training images of all workers."""
        from irnet_ray.data.transforms import to_chw_tensor
        from irnet_ray.models.irnet import pad_to_multiple
        from irnet_ray.train.irn import mean_displacement

        total, count = torch.zeros(2, dtype=torch.float64), 0
        for batch in shard.iter_batches(batch_size=self.cfg.batch_size, batch_format="numpy"):
            for row in _batch_rows(batch):
                if row["error"]:
                    continue
                image = pad_to_multiple(to_chw_tensor(row_image(row))[None])
                total += mean_displacement(self.backbone, inner, [image], device).double().cpu()
                count += 1
        reduced_md = _all_reduce([float(total[0]), float(total[1]), float(count)], world)
        mean = torch.tensor(reduced_md[:2], dtype=torch.float32) / max(reduced_md[2], 1.0)
        inner.mean_displacement.copy_(mean.to(inner.mean_displacement.device))
        metrics["mean_displacement"] = [float(v) for v in mean]


class _DownstreamTask:
    """A torchvision model trained on the pseudo masks (:mod:`irnet_ray.train.downstream`).

    The torch generator is reseeded from (seed, epoch, rank) at every epoch, as the numpy one
    is: the models draw from it (dropout, Mask R-CNN's box sampling), and a run resumed from a
    checkpoint then draws what an uninterrupted one would.
    """

    config_class: type = DeepLabTrainConfig

    def __init__(self, config: dict, device) -> None:
        self.cfg = config_from_dict(self.config_class, config["train"])
        self.num_classes = int(config["num_classes"])
        state = None
        if self.cfg.backbone_weights:
            options = StorageOptions(**config["storage_options"])
            state = downstream.load_backbone_state(self.cfg.backbone_weights, options)
        torch.manual_seed(self.cfg.seed)
        self.net: torch.nn.Module = self.build_model(self.num_classes, self.cfg, state)

    @staticmethod
    def build_model(num_classes: int, cfg, backbone_state):
        raise NotImplementedError

    def optimizer(self, inner, total_steps: int):
        return downstream.downstream_optimizer(inner, self.cfg, total_steps)

    def start_epoch(self, epoch: int, rank: int) -> None:
        torch.manual_seed((self.cfg.seed * 100_003 + epoch * 1_009 + rank) % 2**63)

    def lr(self, optimizer) -> float:
        return optimizer.param_groups[0]["lr"]

    def end_of_training(self, shard, inner, world: int, device, metrics: dict) -> None:
        pass


class _DeepLabTask(_DownstreamTask):
    config_class = DeepLabTrainConfig
    build_model = staticmethod(downstream.build_deeplab)

    def step(self, model, rows: list[dict], rng: np.random.Generator, device):
        # BatchNorm of the pooling branch needs two samples: one image is cropped twice.
        batch = downstream.prepare_semantic(rows if len(rows) > 1 else rows * 2, rng, self.cfg)
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        return downstream.deeplab_loss(model, images, labels, self.cfg.aux_weight)


class _MaskRcnnTask(_DownstreamTask):
    config_class = MaskRcnnTrainConfig
    build_model = staticmethod(downstream.build_maskrcnn)

    def step(self, model, rows: list[dict], rng: np.random.Generator, device):
        images, targets = downstream.prepare_instance(rows, rng, self.cfg)
        return downstream.maskrcnn_loss(model, images, targets, device)


#: kind -> (task class, the training set's name in messages, DDP options of prepare_model)
_TASKS: dict[str, tuple[type, str, dict | None]] = {
    "cam": (_CamTask, "CAM training set", None),
    "irn": (_IrnTask, "IRNet training set", None),
    "deeplab": (_DeepLabTask, "DeepLab training set", None),
    # Images without a kept instance leave parts of the heads out of the graph.
    "maskrcnn": (_MaskRcnnTask, "Mask R-CNN training set", {"find_unused_parameters": True}),
}


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train loop of every stage (``config["kind"]``: ``"cam"``, ``"irn"``, ``"deeplab"``
    or ``"maskrcnn"``; what differs between them is its task in :data:`_TASKS`).

    ``config`` is plain data built by the driver: stage settings as dicts, ``total_steps`` of
    the poly schedule, the number of classes, for IRNet the CAM model URI and storage options.
    """
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    kind = config["kind"]
    device = ray.train.torch.get_device()
    session = uuid.uuid4().hex[:8]

    task_class, _, ddp_kwargs = _TASKS[kind]
    task = task_class(config, device)
    cfg, net = task.cfg, task.net

    start_epoch, history, state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, meta = _read_checkpoint(checkpoint)
        net.load_state_dict(state["model"])
        start_epoch, history = int(meta["epochs_done"]), list(meta["history"])
    resumed_from = start_epoch if checkpoint is not None else None

    if ddp_kwargs:
        model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs=ddp_kwargs)
    else:
        model = ray.train.torch.prepare_model(net)
    inner = getattr(model, "module", model)
    total_steps = int(config["total_steps"])
    optimizer, scheduler = task.optimizer(inner, total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        task.start_epoch(epoch, rank)
        model.train()
        started = time.perf_counter()
        sums: dict[str, float] = collections.defaultdict(float)
        images = errors = steps = skipped = 0
        failed_entries: list[dict] = []
        # A different order every epoch (rows are whole decoded images; the buffer bounds memory).
        batches = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                     local_shuffle_buffer_size=_SHUFFLE_BUFFER_ROWS,
                                     local_shuffle_seed=cfg.seed * 100_003 + epoch * 1_009 + rank)  # fmt: skip
        for good, failed, step in _lockstep(batches, world):
            errors += len(failed)
            if config.get("collect_errors"):
                failed_entries.extend({"image_id": str(r["image_id"]), "error": str(r["error"])} for r in failed)
            if not step:
                skipped += 1
                continue
            loss, parts = task.step(model, good, rng, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums["loss"] += float(loss.detach())
            for name, value in parts.items():
                sums[name] += value
            steps += 1
            images += len(good)
        elapsed = time.perf_counter() - started
        names = sorted(sums)
        totals = _all_reduce([sums[n] for n in names] + [steps, images, errors, skipped], world)
        (elapsed,) = _all_reduce([elapsed], world, op="max")
        reduced = dict(zip(names, totals[: len(names)]))
        all_steps, all_images, all_errors, all_skipped = (int(v) for v in totals[len(names):])
        if all_images == 0:
            raise ValueError(
                f"epoch {epoch}: no usable image in the training set ({all_errors} rows failed to decode)"
            )
        metrics = {
            "epoch": epoch,
            "loss": reduced.get("loss", 0.0) / max(all_steps, 1),
            **{n: reduced[n] / max(all_steps, 1) for n in names if n != "loss"},
            "lr": task.lr(optimizer),
            "images_per_second": all_images / max(elapsed, 1e-9),
            "images": all_images,
            "errors": all_errors,
            "steps": all_steps // max(world, 1),  # optimiser steps (each worker takes the same)
            "skipped_steps": all_skipped,
            "seconds": elapsed,
        }
        if config.get("collect_errors"):
            gathered = [e for part in _all_gather(failed_entries, world) for e in part]
            metrics["failed_images"] = failed_out = gathered[:_MAX_REPORTED_ERRORS]
        else:
            failed_out = list(config.get("known_errors") or [])

        if epoch == cfg.epochs - 1:
            task.end_of_training(shard, inner, world, device, metrics)

        entry = {k: v for k, v in metrics.items() if k != "failed_images"}
        entry.update(run_id=config["run_id"], session=session, session_start=start_epoch)
        history.append(entry)
        metrics["resumed_from_epoch"] = -1 if resumed_from is None else resumed_from
        with tempfile.TemporaryDirectory(prefix="irnet-ckpt-") as folder:
            checkpoint_out = None
            if rank == 0:
                state_out = {"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict()}  # fmt: skip
                with open(os.path.join(folder, STATE_WEIGHTS), "wb") as f:
                    f.write(model_files.state_dict_to_bytes(state_out))
                with open(os.path.join(folder, STATE_META), "w") as f:
                    json.dump({"kind": kind, "epochs_done": epoch + 1, "history": history, "errors": failed_out}, f)
                checkpoint_out = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint_out)


# --------------------------------------------------------------------------------------
# driver side


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _check_run_record(run: RunOptions, settings: dict) -> None:
    """Write the run record, or refuse a rerun whose settings differ. Probes the storage."""
    uri = join(run.run_uri, RUN_RECORD)
    options = run.storage_options
    if exists(uri, options):
        recorded = json.loads(read_bytes(uri, options))
        differences = _diff(recorded.get("settings"), settings)
        if differences:
            raise ValueError(
                f"run {run.name!r} at {run.run_uri} was started with other settings "
                f"({'; '.join(differences[:8])}); use a new run name to train with these settings, "
                f"or the old ones to resume it"
            )
        return
    model_files.assert_no_secrets(settings, "run settings")
    record = {"name": run.name, "settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes(uri, json.dumps(record, indent=2, sort_keys=True).encode(), options)


def _latest_state(run: RunOptions) -> tuple[Any, dict] | None:
    """The latest checkpoint Ray Train holds for this run and its ``state.json`` (or None)."""
    fs, path = run.filesystem()
    run_path = f"{path.rstrip('/')}/{run.name}"
    if not exists(run.run_uri, run.storage_options):
        return None
    try:
        result = ray.train.Result.from_path(run_path, storage_filesystem=fs)
    except RuntimeError:  # no run state (yet): a fresh run
        return None
    checkpoint = result.checkpoint
    if checkpoint is None:
        return None
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_META}") as f:
        return checkpoint, json.loads(f.read().decode())


def _model_if_complete(run: RunOptions, kind: str, settings: dict, epochs: int) -> dict | None:
    """The metadata of a finished model of this run, or None."""
    uri = join(run.model_uri, model_files.MODEL_META)
    if not exists(uri, run.storage_options):
        return None
    meta = json.loads(read_bytes(uri, run.storage_options))
    if meta.get("kind") != kind or meta.get("config") != settings:
        return None
    return meta if len(meta.get("metrics", [])) >= epochs else None


def _materialize(ds, what: str) -> tuple[Any, int, list[dict]]:
    # In input order, not in the order parallel decode tasks finish: with the seeded shuffle
    # buffer, a single-worker run then sees the same image order every time it is repeated.
    # (A dataset carries its own copy of the DataContext, taken when it was built.)
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    rows = ds.select_columns(["image_id", "error"]).take_all()
    errors = [{"image_id": str(r["image_id"]), "error": str(r["error"])} for r in rows if r["error"]]
    if rows and len(errors) == len(rows):
        message = f"every image of the {what} failed to load ({len(rows)} of {len(rows)}): {summarize_errors(errors)}"
        if all(e["error"].startswith("unreachable:") for e in errors):
            raise StorageUnreachable(message)
        raise ValueError(message)
    return ds, len(rows), errors


def _steps_per_epoch(rows: int, batch_size: int, world: int) -> int:
    per_worker = rows // world  # streaming_split(equal=True) gives every worker the same rows
    if per_worker < 1:
        raise ValueError(f"{rows} training image(s) cannot feed {world} workers; use fewer workers")
    return -(-per_worker // batch_size)


def _summary(kind: str, run: RunOptions, run_id: str, history: list[dict], resumed_from: int | None,
             epochs: int, errors: list[dict], images: int, started: float, extra: dict) -> dict:  # fmt: skip
    mine = [h for h in history if h.get("run_id") == run_id]
    sessions: dict[str, int] = {}  # worker-group session -> epoch it started from, in order
    for h in mine:
        sessions.setdefault(h.get("session"), int(h.get("session_start", 0)))
    restarts = list(sessions.values())[1:]  # later worker groups of this call: restarts after failures
    return {
        "kind": kind,
        "name": run.name,
        "run_uri": run.run_uri,
        "model_uri": run.model_uri,
        "epochs": epochs,
        "epochs_run": [int(h["epoch"]) for h in mine],
        "resumed_from_epoch": resumed_from,
        "worker_restarts": restarts,
        "history": history,
        "final_metrics": history[-1] if history else {},
        "images": images,
        "errors": errors,
        "seconds": time.perf_counter() - started,
        **extra,
    }


def _fit(kind: str, dataset, loop_config: dict, scaling: ScalingOptions, run: RunOptions):
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling.to_ray(),
        run_config=run.to_ray(),
        datasets={"train": dataset},
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        raise TrainingJobError(
            f"{kind} training of run {run.name!r} failed: {exc}\n"
            f"Checkpoints are kept under {run.run_uri}; rerun with the same name and storage to resume."
        ) from exc
    if result.checkpoint is None:
        raise TrainingJobError(f"{kind} training of run {run.name!r} finished without a checkpoint")
    return result


def _read_checkpoint(checkpoint) -> tuple[dict, dict]:
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_WEIGHTS), "rb") as f:
            state = model_files.state_dict_from_bytes(f.read())
        with open(os.path.join(folder, STATE_META)) as f:
            meta = json.load(f)
    return state, meta


def _start(run: RunOptions, settings: dict) -> None:
    _check_run_record(run, settings)  # probes the storage first: a wrong endpoint fails in seconds
    ensure_ray()


def train_cam_job(
    records: Sequence[ImageRecord],
    vocabulary: ClassVocabulary,
    *,
    backbone: BackboneConfig = BackboneConfig(),
    train: CamTrainConfig = CamTrainConfig(),
    scaling: ScalingOptions = ScalingOptions(),
    run: RunOptions,
    storage_options: StorageOptions = StorageOptions(),
    max_side: int | None = None,
    cache_decoded: bool = True,
    decode_cpus: float = rd.DEFAULT_DECODE_CPUS,
) -> dict:
    """Train the CAM network on image-level labels with Ray Train; returns a summary dict.

    ``storage_options`` reach the images; ``run.storage_options`` the run's storage.
    ``max_side`` (default: the largest training long side, ``train.rescale_long_side[1]``)
    bounds the decoded images. The final model goes to ``{storage}/{name}/model/``.
    """
    started = time.perf_counter()
    backbone.check_trainable()
    records = list(records)
    if not records:
        raise ValueError("no image records: the CAM training set is empty")
    if not isinstance(vocabulary, ClassVocabulary):
        raise TypeError(f"vocabulary must be a ClassVocabulary, got {type(vocabulary).__name__}")
    for r in records:
        if r.classes and max(r.classes) > vocabulary.num_classes:
            raise ValueError(
                f"image {r.image_id}: class id {max(r.classes)} is outside the vocabulary (1..{vocabulary.num_classes})"
            )
    max_side = int(max_side) if max_side else int(max(train.rescale_long_side))
    settings = {
        "kind": "cam",
        "backbone": config_to_dict(backbone),
        "train": config_to_dict(train),
        "vocabulary": list(vocabulary.names),
        "max_side": max_side,
        "data": {"images": len(records), "fingerprint": records_fingerprint(records)},
    }  # fmt: skip
    def prepare() -> tuple[Any, int, dict]:
        dataset = rd.decode_records(records, storage_options, max_side=max_side, num_cpus=decode_cpus)
        loop_config = {
            "backbone": config_to_dict(backbone),
            "train": config_to_dict(train),
            "num_classes": vocabulary.num_classes,
        }
        return dataset, len(records), loop_config

    return _run_job("cam", run, settings, train.epochs, train.batch_size, vocabulary, scaling, cache_decoded,
                    prepare, started)  # fmt: skip


def train_irn_job(
    ir_label_uri: str,
    cam_model_uri: str,
    *,
    irn: IrnTrainConfig = IrnTrainConfig(),
    relations: RelationConfig = RelationConfig(),
    scaling: ScalingOptions = ScalingOptions(),
    run: RunOptions,
    storage_options: StorageOptions = StorageOptions(),
    max_side: int | None = None,
    cache_decoded: bool = True,
    decode_cpus: float = rd.DEFAULT_DECODE_CPUS,
) -> dict:
    """Train IRNet on the IR label Parquet at ``ir_label_uri`` (columns
    :data:`irnet_ray.data.ray_datasets.IR_LABEL_COLUMNS`) on the frozen backbone of the CAM
    model at ``cam_model_uri``; returns a summary dict with the mean displacement.

    ``storage_options`` reach the IR labels, the images and the CAM model. ``max_side``:
    ``None`` (default) trains at the images' own scale (times ``irn.rescale``), as the labeling
    job infers at full resolution.
    """
    started = time.perf_counter()
    # User mistakes first, before any worker starts.
    cam_state, cam_meta = model_files.load_model(cam_model_uri, storage_options)
    if cam_meta["kind"] != "cam":
        raise ValueError(f"{cam_model_uri} holds a {cam_meta['kind']!r} model, expected a CAM model")
    vocabulary = ClassVocabulary(tuple(cam_meta["vocabulary"]))
    del cam_state
    ensure_ray()
    labels_ds = rd.ir_label_dataset(ir_label_uri, storage_options)
    settings = {
        "kind": "irn",
        "backbone": cam_meta["config"]["backbone"],
        "cam_model": cam_model_uri,
        "ir_labels": ir_label_uri,
        "irn": config_to_dict(irn),
        "relations": config_to_dict(relations),
        "vocabulary": list(vocabulary.names),
        "max_side": max_side,
    }
    def prepare() -> tuple[Any, int, dict]:
        count = labels_ds.count()
        if count == 0:
            raise ValueError(f"the IR label Parquet at {ir_label_uri} has no rows")
        dataset = rd.decode_ir_labels(labels_ds, storage_options, max_side=max_side, num_cpus=decode_cpus)
        loop_config = {
            "train": config_to_dict(irn),
            "relations": config_to_dict(relations),
            "cam_model": cam_model_uri,
            "storage_options": dataclasses.asdict(storage_options),
        }
        return dataset, count, loop_config

    return _run_job("irn", run, settings, irn.epochs, irn.batch_size, vocabulary, scaling, cache_decoded,
                    prepare, started)  # fmt: skip


def train_deeplab_job(
    labels_uri: str,
    *,
    train: DeepLabTrainConfig = DeepLabTrainConfig(),
    scaling: ScalingOptions = ScalingOptions(),
    run: RunOptions,
    storage_options: StorageOptions = StorageOptions(),
    max_side: int | None = None,
    cache_decoded: bool = True,
    decode_cpus: float = rd.DEFAULT_DECODE_CPUS,
) -> dict:
    """Train torchvision's ``deeplabv3_resnet50`` on the semantic pseudo masks of the finished
    labeling output at ``labels_uri`` (only the files its ``_manifest.json`` lists); returns a
    summary dict. Checkpoints, resume and the final model (kind ``"deeplab"``) as for CAM.

    ``storage_options`` reach the labels, the images and ``train.backbone_weights``. ``max_side``
    bounds the decoded images (and their maps); ``None``: the labeled size.
    """
    return _train_downstream_job("deeplab", labels_uri, train, scaling, run, storage_options, max_side,
                                 cache_decoded, decode_cpus)  # fmt: skip


def train_maskrcnn_job(
    labels_uri: str,
    *,
    train: MaskRcnnTrainConfig = MaskRcnnTrainConfig(),
    scaling: ScalingOptions = ScalingOptions(),
    run: RunOptions,
    storage_options: StorageOptions = StorageOptions(),
    max_side: int | None = None,
    cache_decoded: bool = True,
    decode_cpus: float = rd.DEFAULT_DECODE_CPUS,
) -> dict:
    """Train torchvision's ``maskrcnn_resnet50_fpn`` on the instance pseudo masks of the finished
    labeling output at ``labels_uri`` (instances kept by ``train.score_threshold`` and
    ``train.min_area``); otherwise as :func:`train_deeplab_job` (model kind ``"maskrcnn"``)."""
    return _train_downstream_job("maskrcnn", labels_uri, train, scaling, run, storage_options, max_side,
                                 cache_decoded, decode_cpus)  # fmt: skip


def _train_downstream_job(kind: str, labels_uri: str, train, scaling: ScalingOptions, run: RunOptions,
                          storage_options: StorageOptions, max_side: int | None, cache_decoded: bool,
                          decode_cpus: float) -> dict:  # fmt: skip
    import hashlib

    from irnet_ray.downstream.readers import label_dataset_ray
    from irnet_ray.downstream.runs import open_labels
    started = time.perf_counter()
    task_class = _TASKS[kind][0]
    if not isinstance(train, task_class.config_class):
        raise TypeError(f"train must be a {task_class.config_class.__name__}, got {type(train).__name__}")
    # User mistakes first, before anything is written: an unfinished or empty labeling run, and
    # backbone weights that do not fit.
    labels = open_labels(labels_uri, storage_options)
    vocabulary = ClassVocabulary(labels.vocabulary)
    weights_id = None
    if train.backbone_weights:
        data = read_bytes(train.backbone_weights, storage_options)
        weights_id = "sha256:" + hashlib.sha256(data).hexdigest()
        # Raises when the weights do not fit the model's backbone.
        state = downstream.state_dict_of_file(data, train.backbone_weights)
        task_class.build_model(vocabulary.num_classes, train, state)
        del data, state
    task = "semantic" if kind == "deeplab" else "instance"
    filters = ({"ignore_below": train.ignore_below} if kind == "deeplab"
               else {"score_threshold": train.score_threshold, "min_area": train.min_area})  # fmt: skip
    settings = {
        "kind": kind,
        "train": config_to_dict(train),
        "labels": labels.output_uri,
        "labels_run": {k: labels.manifest.get(k) for k in ("run_id", "settings_id", "written", "rows")},
        "backbone_weights_id": weights_id,
        "vocabulary": list(vocabulary.names),
        "max_side": max_side,
    }

    def prepare() -> tuple[Any, int, dict]:
        dataset = label_dataset_ray(labels, columns=downstream.LABEL_COLUMNS).map_batches(
            downstream.decode_label_batch, batch_size=rd.DEFAULT_DECODE_BATCH, batch_format="pyarrow",
            num_cpus=decode_cpus,
            fn_kwargs={"run": labels, "task": task, "options": storage_options, "max_side": max_side, **filters},
        )  # fmt: skip
        loop_config = {
            "train": config_to_dict(train),
            "num_classes": vocabulary.num_classes,
            "storage_options": dataclasses.asdict(storage_options),
        }
        return dataset, labels.num_images, loop_config

    return _run_job(kind, run, settings, train.epochs, train.batch_size, vocabulary, scaling, cache_decoded,
                    prepare, started)  # fmt: skip


def _run_job(kind: str, run: RunOptions, settings: dict, epochs: int, batch_size: int, vocabulary: ClassVocabulary,
             scaling: ScalingOptions, cache_decoded: bool, prepare, started: float) -> dict:
    """The driver flow both stages share: return a finished run's model, or resume/train it
    (``prepare()`` builds the lazy dataset, its row count and the stage's own loop settings, only
    when training is needed), then write the final model next to the run state."""
    _start(run, settings)
    done = _model_if_complete(run, kind, settings, epochs)
    if done is not None:
        return _done_summary(kind, run, done, started)

    latest = _latest_state(run)
    resumed_from = int(latest[1]["epochs_done"]) if latest else None
    run_id = uuid.uuid4().hex[:12]
    timings: dict[str, float] = {}
    if latest and resumed_from >= epochs:
        state, meta = _read_checkpoint(latest[0])
        errors = list(meta.get("errors", []))
        images = int(meta["history"][-1].get("images", 0)) if meta["history"] else 0
    else:
        t = time.perf_counter()
        dataset, rows, loop_config = prepare()
        errors: list[dict] = []
        if cache_decoded:
            dataset, rows, errors = _materialize(dataset, _TASKS[kind][1])
        timings["materialize_seconds"] = time.perf_counter() - t
        steps = _steps_per_epoch(rows, batch_size, scaling.num_workers)
        loop_config.update({
            "kind": kind,
            "run_id": run_id,
            "total_steps": steps * epochs,
            "torch_threads": scaling.torch_threads,
            "collect_errors": not cache_decoded,
            "known_errors": errors[:_MAX_REPORTED_ERRORS],
        })  # fmt: skip
        t = time.perf_counter()
        result = _fit(kind, dataset, loop_config, scaling, run)
        timings["fit_seconds"] = time.perf_counter() - t
        state, meta = _read_checkpoint(result.checkpoint)
        if not cache_decoded:
            errors = list(meta.get("errors", []))
        images = rows - len(errors)
    history = meta["history"]
    extra = {"errors": errors, "images": images}
    model_files.save_model(run.model_uri, kind=kind, state_dict=state["model"], config=settings, vocabulary=vocabulary,
                    metrics=history, extra=extra, options=run.storage_options)  # fmt: skip
    summary_extra: dict[str, Any] = dict(timings)
    if kind == "irn":
        summary_extra["mean_displacement"] = [float(v) for v in state["model"]["mean_displacement"]]
    return _summary(kind, run, run_id, history, resumed_from, epochs, errors, images, started, summary_extra)


def _done_summary(kind: str, run: RunOptions, meta: dict, started: float) -> dict:
    """Summary of a run whose final model already exists (nothing is trained)."""
    history = meta.get("metrics", [])
    extra = meta.get("extra", {})
    out = _summary(kind, run, "", history, len(history), len(history), extra.get("errors", []),
                   int(extra.get("images", 0)), started, {})  # fmt: skip
    out["already_complete"] = True
    if kind == "irn":
        out["mean_displacement"] = extra.get("mean_displacement")
    return out
