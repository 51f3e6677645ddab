#!/usr/bin/env python
"""Benchmark: CAM training on Ray Train vs. the same training in a plain single-process loop.

Both methods train the same model (:class:`irnet_ray.models.cam.CamNet`, ``--arch``) from the
same seed on the same synthetic images with the same settings (batch size, crop, rescale,
epochs), in one run of this script:

* ``plain`` -- :func:`irnet_ray.train.cam.train_cam` in this process, ``--threads`` torch
  threads. The images are decoded in-process beforehand with the Ray job's own decode function
  (:func:`irnet_ray.data.ray_datasets.decode_batch`, same ``max_side``), the order is shuffled
  every epoch (the Ray loop shuffles its shard), and every batch is built inside the timed
  epoch by the Ray loop's own per-batch code (``_prepare_cam``: augmentation, crop, multi-hot
  labels), so the two methods do the same work per step and differ only in what Ray adds.
  The images come in another order than on Ray (Ray's shuffle buffer is its own), so the
  losses are alike but not equal.
* ``ray`` -- :func:`irnet_ray.train.ray_train.train_cam_job` with
  ``ScalingOptions(num_workers=W, cpus_per_worker=threads / W)`` (``--workers 1,2`` gives one
  row per W) on a local Ray started by this script. Per-step time comes from the per-epoch
  ``seconds`` the workers report (the epoch loop: reading the shard from the object store,
  augmentation, steps); the job's wall time and the time spent outside the epochs (worker
  start-up, materialising the decoded dataset, per-epoch checkpoints, saving the model) are
  separate columns.

Per-step time = epoch seconds / optimiser steps per worker. The first ``--warmup-epochs``
epochs are reported separately and left out of the steady-state figures. With W > 1 workers
each step processes W x batch images (the batch size is per worker), so compare images/s there.

The plain loop runs before and again after the Ray runs (``--bracket``, default on); the ratios
use the mean of the two, and the spread between them shows how noisy the machine was.

Ray starts its worker processes at niceness 15; on a machine where other processes compete for
the CPUs that alone slows the Ray workers against the plain loop (niceness 0), which is not
what this benchmark measures. ``--ray-worker-niceness`` (default 0) sets Ray's
``RAY_worker_niceness`` before ``ray.init``; the report records the niceness both sides had.

Fixed costs reported once: ``ray.init`` (starting the local cluster), and decoding +
materialising the training set as a Ray Dataset, measured standalone after the jobs with the
same call the job makes (``train_cam_job`` does not expose its own split between
materialising and starting the workers).

Usage::

    python benchmarks/train_overhead.py                                   # defaults, CPU
    python benchmarks/train_overhead.py --images 8 --epochs 2 --image-size 64 --workers 1
    python benchmarks/train_overhead.py --device cuda --json runs/train_overhead.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Sequence

MIB = 2**20
RAY_TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_NICENESS_ENV = "RAY_worker_niceness"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def parse_pair(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.replace("-", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 112,144, got {text!r}") from None
    if low < 1 or high < low:
        raise argparse.ArgumentTypeError(f"expected 1 <= low <= high, got {text!r}")
    return low, high


def parse_workers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts like 1,2, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-step time of CAM training on Ray Train vs. a plain single-process loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet18", help="torchvision ResNet of the backbone (BackboneConfig.arch)")
    parser.add_argument("--images", type=int, default=96, help="synthetic training images")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square synthetic images (px)")
    parser.add_argument("--crop-size", type=int, default=None, help="training crop (px; default: --image-size)")
    parser.add_argument("--rescale-long-side", type=parse_pair, default=None,
                        help="random long side before cropping, LOW,HIGH (default: 0.875 and 1.125 x crop)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (per worker on Ray)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=1, help="left out of the steady-state figures")
    parser.add_argument("--workers", type=parse_workers, default=[1, 2], help="Ray Train worker counts, one row each")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the plain loop, and CPUs shared by the Ray workers (default: CPU count)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs (= torch threads) per Ray worker (default: --threads / workers)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: plain loop on the GPU, Ray workers with use_gpu and 1 GPU each")
    parser.add_argument("--ray-worker-niceness", type=int, default=0,
                        help="niceness of Ray's worker processes (Ray's default is 15); 0 gives them the "
                        "plain loop's priority, which matters when other processes compete for the CPUs")
    parser.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                        help="run the plain loop again after the Ray runs (noise check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    return parser


def check_args(args) -> None:
    """Refuse settings that cannot give a steady-state figure, with a message (no traceback)."""
    for name in ("images", "image_size", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_epochs < 0 or args.epochs <= args.warmup_epochs:
        raise SystemExit(f"--epochs ({args.epochs}) must exceed --warmup-epochs ({args.warmup_epochs})")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise SystemExit("--cpus-per-worker must be > 0")
    for workers in args.workers:
        if args.images // workers < 1:
            raise SystemExit(f"--images {args.images} cannot feed {workers} workers")


def settings(args):
    """(BackboneConfig, CamTrainConfig, SyntheticConfig, max_side) of this run."""
    from irnet_ray.config import BackboneConfig, CamTrainConfig
    from irnet_ray.data.synthetic import SyntheticConfig

    crop = args.crop_size or args.image_size
    rescale = args.rescale_long_side or (round(crop * 0.875), round(crop * 1.125))
    # The demo's from-scratch settings (no pretrained weights here): every stage trains with
    # batch-statistics BatchNorm, one learning rate for head and backbone.
    backbone = BackboneConfig(arch=args.arch, frozen_batchnorm=False, first_trainable_stage=0)
    train = CamTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.03, backbone_lr_scale=1.0,
                           crop_size=crop, rescale_long_side=rescale, seed=args.seed)  # fmt: skip
    data = SyntheticConfig(num_images=args.images, image_size=(args.image_size, args.image_size), seed=args.seed)
    return backbone, train, data, max(rescale)  # max_side: train_cam_job's default


def machine_info(args, threads: int) -> dict:
    import ray
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "threads": threads,
        "device": args.device,
        # Other processes on the machine distort every figure; recorded at start and end.
        "load_average_start": list(os.getloadavg()),
    }
    if args.device == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_devices"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------


def steady_figures(epochs: list[dict], warmup: int, images_per_step: int) -> dict:
    """First-epoch and steady-state per-step time and throughput of a run's epochs."""
    first, rest = epochs[0], epochs[warmup:]
    seconds = sum(e["seconds"] for e in rest)
    steps = sum(e["steps"] for e in rest)
    return {
        "first_step_s": first["seconds"] / max(first["steps"], 1),
        "step_s": seconds / max(steps, 1),
        "images_per_s": sum(e["images"] for e in rest) / max(seconds, 1e-12),
        "images_per_step": images_per_step,
        "steady_epochs": len(rest),
        "steady_steps": steps,
    }


def run_plain(records, vocabulary, backbone, train, max_side: int, device: str, threads: int) -> dict:
    import numpy as np
    import torch

    from irnet_ray.data.ray_datasets import decode_batch
    from irnet_ray.models.cam import CamNet
    from irnet_ray.train.cam import train_cam

    # The Ray loop's own per-batch code, so both methods do identical work per step.
    from irnet_ray.train.ray_train import _batch_rows, _prepare_cam

    started = time.perf_counter()
    torch.set_num_threads(threads)
    decoded = decode_batch({"image_id": [r.image_id for r in records], "uri": [r.uri for r in records],
                            "classes": [list(r.classes) for r in records]}, max_side=max_side)  # fmt: skip
    rows = _batch_rows(decoded)
    failed = [r for r in rows if r["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} synthetic image(s) failed to decode: {failed[0]['error']}")
    decode_s = time.perf_counter() - started
    num_classes = vocabulary.num_classes
    size = train.batch_size

    def epoch_batches(epoch: int):
        rng = np.random.default_rng([train.seed, epoch, 0])
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), size):
            yield _prepare_cam([rows[i] for i in order[start : start + size]], rng, train, num_classes)

    steps_per_epoch = -(-len(rows) // size)
    torch.manual_seed(train.seed)
    model = CamNet(backbone, num_classes)
    history = train_cam(model, (epoch_batches(e) for e in range(train.epochs)), train,
                        steps_per_epoch * train.epochs, torch.device(device))  # fmt: skip
    wall_s = time.perf_counter() - started
    epochs = [{
        "epoch": int(h["epoch"]), "loss": float(h["loss"]), "images": len(rows), "steps": steps_per_epoch,
        # train_cam times each epoch itself (batch building included) and reports images/s.
        "seconds": len(rows) / h["images_per_second"],
    } for h in history]  # fmt: skip
    in_epochs = sum(e["seconds"] for e in epochs)
    return {"method": "plain", "status": "ok", "workers": 1, "threads_per_worker": threads, "epochs": epochs,
            "decode_s": decode_s, "wall_s": wall_s, "outside_epochs_s": wall_s - in_epochs}  # fmt: skip


def run_ray(records, vocabulary, backbone, train, max_side: int, device: str, workers: int,
            cpus_per_worker: float, storage: str) -> dict:  # fmt: skip
    from irnet_ray.train.ray_train import RunOptions, ScalingOptions, train_cam_job

    use_gpu = device == "cuda"
    scaling = ScalingOptions(num_workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
                             gpus_per_worker=1.0)  # fmt: skip
    # max_failures=0: a restarted worker group would be timed as if it were training.
    run = RunOptions(f"overhead-{workers}w", storage, max_failures=0)
    started = time.perf_counter()
    summary = train_cam_job(records, vocabulary, backbone=backbone, train=train, scaling=scaling, run=run,
                            max_side=max_side)  # fmt: skip
    wall_s = time.perf_counter() - started
    if summary["errors"] or summary["images"] != (len(records) // workers) * workers:
        raise RuntimeError(f"Ray run trained {summary['images']} images with errors {summary['errors'][:3]}")
    if summary["worker_restarts"] or summary.get("already_complete"):
        raise RuntimeError(f"Ray run was not one clean training: {summary['worker_restarts']}")
    epochs = []
    for h in summary["history"]:
        per_worker = int(h["images"]) // workers  # the shards are equal (streaming_split(equal=True))
        epochs.append({"epoch": int(h["epoch"]), "loss": float(h["loss"]), "images": int(h["images"]),
                       "steps": -(-per_worker // train.batch_size), "seconds": float(h["seconds"])})  # fmt: skip
    in_epochs = sum(e["seconds"] for e in epochs)
    return {"method": "ray", "status": "ok", "workers": workers, "threads_per_worker": scaling.torch_threads,
            "cpus_per_worker": cpus_per_worker, "epochs": epochs, "wall_s": wall_s, "job_seconds": summary["seconds"],
            "outside_epochs_s": wall_s - in_epochs}  # fmt: skip


def _niceness() -> int:
    return os.nice(0)


def materialize_standalone(records, max_side: int) -> float:
    """Decode + materialise the training set the way ``train_cam_job`` does (warm cluster)."""
    from irnet_ray.data import ray_datasets as rd

    started = time.perf_counter()
    dataset = rd.decode_records(records, max_side=max_side).materialize()
    rows = dataset.count()
    seconds = time.perf_counter() - started
    if rows != len(records):
        raise RuntimeError(f"materialised {rows} rows of {len(records)}")
    return seconds


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def benchmark(args, log=print) -> dict:
    import ray
    import torch

    from irnet_ray.data.sources import synthetic_records

    check_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    if ray.is_initialized():
        raise SystemExit("Ray is already initialised in this process; the benchmark times its own ray.init")
    threads = args.threads or os.cpu_count() or 1
    backbone, train, data, max_side = settings(args)
    records, vocabulary = synthetic_records(data)
    plans = []
    for workers in args.workers:
        cpus = args.cpus_per_worker or threads / workers
        plans.append((workers, cpus))
    config = {
        "arch": args.arch, "images": args.images, "image_size": args.image_size, "crop_size": train.crop_size,
        "rescale_long_side": list(train.rescale_long_side), "max_side": max_side, "batch_size": train.batch_size,
        "epochs": train.epochs, "warmup_epochs": args.warmup_epochs, "workers": list(args.workers),
        "threads": threads, "device": args.device, "seed": args.seed, "bracket": args.bracket,
        "ray_worker_niceness": args.ray_worker_niceness,
        "frozen_batchnorm": backbone.frozen_batchnorm, "first_trainable_stage": backbone.first_trainable_stage,
        RAY_TRAIN_POLL_ENV: os.environ.get(RAY_TRAIN_POLL_ENV, "default (2 s)"),
    }  # fmt: skip
    machine = machine_info(args, threads)
    started = time.perf_counter()
    results, fixed = [], {}

    log(f"plain loop: {args.images} images, batch {train.batch_size}, {train.epochs} epochs ...", file=sys.stderr)
    results.append(run_plain(records, vocabulary, backbone, train, max_side, args.device, threads))

    # Enough logical CPUs for the workers plus the decode tasks (0.25 CPU each): on a 2-core
    # machine a worker group holding every CPU starves Ray Data (docs: ray.md).
    ray_cpus = math.ceil(max(w * c for w, c in plans)) + 1
    os.environ[RAY_NICENESS_ENV] = str(args.ray_worker_niceness)  # read by the raylet ray.init starts
    t = time.perf_counter()
    ray.init(num_cpus=ray_cpus, object_store_memory=256 * MIB, include_dashboard=False, log_to_driver=False)
    fixed["ray_init_s"] = time.perf_counter() - t
    fixed["ray_cpus"] = ray_cpus
    fixed["ray_worker_niceness"] = ray.get(ray.remote(num_cpus=0)(_niceness).remote())
    fixed["plain_niceness"] = _niceness()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    try:
        with tempfile.TemporaryDirectory(prefix="train-overhead-") as storage:
            for workers, cpus in plans:
                if args.device == "cuda" and workers > gpus:
                    results.append({"method": "ray", "workers": workers, "status": f"skipped: needs {workers} GPUs"})
                    continue
                log(f"ray train: {workers} worker(s) x {cpus:g} CPU ...", file=sys.stderr)
                results.append(run_ray(records, vocabulary, backbone, train, max_side, args.device, workers,
                                       cpus, storage))  # fmt: skip
            fixed["materialize_s"] = materialize_standalone(records, max_side)
    finally:
        ray.shutdown()
    if args.bracket:
        log("plain loop again ...", file=sys.stderr)
        results.append(run_plain(records, vocabulary, backbone, train, max_side, args.device, threads))

    for row in results:
        if row["status"] == "ok":
            row.update(steady_figures(row["epochs"], args.warmup_epochs, row["workers"] * train.batch_size))
    plain_rows = [r for r in results if r["method"] == "plain"]
    plain_step = statistics.mean(r["step_s"] for r in plain_rows)
    plain_rate = statistics.mean(r["images_per_s"] for r in plain_rows)
    for row in results:
        if row["status"] != "ok":
            continue
        row["step_ratio"] = _ratio(row["step_s"], plain_step)
        row["throughput_ratio"] = _ratio(row["images_per_s"], plain_rate)
        # What a fresh process pays to get a trained model: for Ray, starting Ray included.
        row["end_to_end_s"] = row["wall_s"] + (fixed["ray_init_s"] if row["method"] == "ray" else 0.0)
    summary = {
        "plain_step_s": plain_step,
        "plain_images_per_s": plain_rate,
        "plain_step_spread": (max(r["step_s"] for r in plain_rows) / min(r["step_s"] for r in plain_rows)) - 1.0,
    }
    machine["load_average_end"] = list(os.getloadavg())
    return {"machine": machine, "config": config, "fixed": fixed, "summary": summary, "results": results,
            "total_wall_s": time.perf_counter() - started}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _label(row: dict, index: int, results: list[dict]) -> str:
    if row["method"] == "plain":
        return "plain (after)" if index == len(results) - 1 and index > 0 else "plain"
    return f"ray train, {row['workers']} worker{'s' if row['workers'] > 1 else ''}"


def markdown_table(report: dict) -> str:
    header = ("| run | workers x threads | steps/epoch | images/step | 1st epoch s/step | steady s/step "
              "| steady images/s | s/step ray/plain | images/s ray/plain | wall (s) | outside epochs (s) "
              "| end to end (s) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    results = report["results"]
    for index, row in enumerate(results):
        label = _label(row, index, results)
        if row["status"] != "ok":
            lines.append(f"| {label} | {row['workers']} | {row['status']} |" + " - |" * 9)
            continue
        is_ray = row["method"] == "ray"
        lines.append(
            f"| {label} | {row['workers']} x {row['threads_per_worker']} | {row['epochs'][0]['steps']} "
            f"| {row['images_per_step']} | {row['first_step_s']:.3f} | {row['step_s']:.3f} "
            f"| {row['images_per_s']:.1f} | {_fmt(row['step_ratio'] if is_ray else None, '.2f')} "
            f"| {_fmt(row['throughput_ratio'] if is_ray else None, '.2f')} | {row['wall_s']:.1f} "
            f"| {row['outside_epochs_s']:.1f} | {row['end_to_end_s']:.1f} |"
        )
    return "\n".join(lines)


def describe(report: dict) -> str:
    m, c, f, s = report["machine"], report["config"], report["fixed"], report["summary"]
    device = m["device"] + (f" ({m['cuda_device']}, CUDA {m['cuda']})" if "cuda_device" in m else "")
    plain = [r for r in report["results"] if r["method"] == "plain"]
    losses = "; ".join(f"{_label(r, i, report['results'])} {r['epochs'][0]['loss']:.3f} -> {r['epochs'][-1]['loss']:.3f}"
                       for i, r in enumerate(report["results"]) if r["status"] == "ok")
    return (
        f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, Ray {m['ray']}, device {device}, "
        f"Python {m['python']}, {m['platform']}; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in m['load_average_start'])} at start, "
        f"{'/'.join(f'{v:.1f}' for v in m['load_average_end'])} at end\n"
        f"Config: CamNet {c['arch']} (from scratch, BN trained), {c['images']} synthetic "
        f"{c['image_size']} px images, crop {c['crop_size']}, long side {c['rescale_long_side']}, batch "
        f"{c['batch_size']} per worker, {c['epochs']} epochs ({c['warmup_epochs']} warm-up), "
        f"{c['threads']} threads shared by the workers; {RAY_TRAIN_POLL_ENV}={c[RAY_TRAIN_POLL_ENV]}\n"
        f"Niceness: plain loop {f['plain_niceness']}, Ray workers {f['ray_worker_niceness']}\n"
        f"Fixed costs: ray.init {f['ray_init_s']:.1f} s ({f['ray_cpus']} logical CPUs); decode + "
        f"materialise the set as a Ray Dataset {f['materialize_s']:.1f} s (standalone, warm cluster); "
        f"in-process decode of the plain loop {plain[0]['decode_s']:.2f} s\n"
        f"Plain loop: {s['plain_step_s']:.3f} s/step, {s['plain_images_per_s']:.1f} images/s (mean of "
        f"{len(plain)} run(s); spread {100 * s['plain_step_spread']:.0f}%)\n"
        f"Mean loss, first -> last epoch: {losses}\n"
        f"wall: the training call (plain: decode + train_cam; ray: train_cam_job); outside epochs: wall "
        f"minus the epochs' own seconds; end to end: wall + ray.init for Ray rows.\n"
        f"Total wall time: {report['total_wall_s']:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    report = benchmark(args, log=print)
    print(markdown_table(report))
    print()
    print(describe(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
