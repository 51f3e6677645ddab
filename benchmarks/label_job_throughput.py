#!/usr/bin/env python
"""Benchmark: throughput of the labeling job (``irnet_ray.label.label_images``) with 1 actor using
all the CPUs vs N actors sharing them, and the per-image cost of each stage.

The job runs end to end exactly as ``irnet-ray label`` runs it (Ray Data decode tasks ->
labeling actor pool -> Parquet writer -> driver commits -> manifest), on a local Ray started by
this script, over synthetic images of ``--image-size`` pixels with ResNet CAM + IRNet models
(seeded random weights by default: the cost of labeling does not depend on what the weights
learned, except through the number of instances; pass ``--cam`` / ``--irn`` for trained ones).
The labels are scored against the synthetic set's ground truth, as ``irnet-ray label`` does by
default (``--no-eval`` turns it off).

The pool always gets the same ``--cpus`` (default: every core): A actors get ``--cpus / A`` CPUs
each, and their torch threads follow (the job sets them from the CPU reservation). So the
baseline, 1 actor, runs with every core's threads; the question is whether splitting the same
cores into several actors pays, not whether more cores do.

Images/s, steady state: the driver commits each written file as it arrives and records the
time of every commit; with files of ``--batch-size`` rows the commits stream in while the job
runs, and the rate is (images committed after the first commit) / (last commit time - first
commit time). Actor start-up, model loading and Ray Data's start come before the first commit
and the manifest after the last, so they are left out. The end-to-end rate (``--images``
divided by the job's labeling wall time, fixed costs included) is reported too. ``speedup`` =
steady rate with A actors / steady rate with the first actor count, in the same run of this
script. One small warm-up job runs first (process and file caches).

The in-process comparison of per-image and batched labeling (no Ray) is
``benchmarks/label_throughput.py``.

Per-stage cost (ms per image, from the job's own timings in ``_manifest.json`` of each actor
count's run): ``decode`` (read + decode + downscale, CPU tasks), ``inference`` (one
backbone pass + CAM head + IRNet, plus the other CAM scales), ``synthesis`` (instance map,
random walk, semantic and instance labels; :func:`irnet_ray.synthesis.synthesize_labels` does
walk and instances in one call, so they are one stage), ``encode`` (back to the original size,
PNG, COCO RLE), ``score`` (mIoU and AP accumulators against the ground truth, with the paper's
baseline rows; 0 with ``--no-eval``), ``write`` (Parquet to storage, per image). Stage times are summed over images;
with several actors they overlap in wall time.

Usage::

    python benchmarks/label_job_throughput.py                                     # defaults, CPU
    python benchmarks/label_job_throughput.py --images 8 --batch-size 2 --actors 1 --image-size 64  # quick check
    python benchmarks/label_job_throughput.py --gpus-per-actor 1 --image-size 512 --arch resnet50 --json gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from labeling_common import cam_scales, positive_ints  # noqa: E402 - after the path set-up

STAGES = ("decode", "inference", "synthesis", "encode", "score", "write")
#: Logical CPUs left beside the pool for the decode and write tasks: a pool that reserves every
#: CPU starves them and the job never starts.
TASK_CPUS = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--images", type=int, default=24, help="images per job")
    parser.add_argument("--actors", type=positive_ints, default=[1, 2], help="actor counts to compare")
    parser.add_argument("--image-size", type=int, default=256, help="square synthetic image side")
    parser.add_argument("--classes", type=int, default=4, help="foreground classes of the synthetic set")
    parser.add_argument("--arch", default="resnet50", help="backbone of the seeded models")
    parser.add_argument("--cam", default=None, help="trained CAM model folder (instead of seeded weights)")
    parser.add_argument("--irn", default=None, help="trained IRNet model folder (with --cam)")
    parser.add_argument("--scales", type=cam_scales, default=(1.0, 0.5, 1.5, 2.0), help="CAM inference scales")
    parser.add_argument("--walk-steps", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2, help="images per actor call and per file")
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1),
                        help="CPUs the actor pool shares: A actors get --cpus / A each (and as many torch threads)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="0: CPU actors")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: the cores, at least --cpus + 0.5)")
    parser.add_argument("--no-eval", action="store_true", help="do not score the labels (irnet-ray label --no-eval)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.images < 4 * args.batch_size:
        parser.error(f"--images must be at least 4 x --batch-size ({4 * args.batch_size}) for a steady-state window")
    if bool(args.cam) != bool(args.irn):
        parser.error("--cam and --irn go together")
    return args


def _seeded_models(folder: Path, vocabulary, arch: str) -> tuple[str, str]:
    import torch

    from irnet_ray import model_files
    from irnet_ray.config import BackboneConfig, config_to_dict
    from irnet_ray.models.cam import CamNet
    from irnet_ray.models.irnet import IRNet

    torch.manual_seed(0)
    backbone = BackboneConfig(arch=arch)
    cam = CamNet(backbone, vocabulary.num_classes)
    irn = IRNet(cam.backbone.channels)
    cam_uri, irn_uri = str(folder / "cam"), str(folder / "irn")
    config = {"backbone": config_to_dict(backbone)}
    model_files.save_model(cam_uri, kind="cam", state_dict=cam.state_dict(), config=config, vocabulary=vocabulary, metrics=[])
    model_files.save_model(irn_uri, kind="irn", state_dict=irn.state_dict(), config={**config, "cam_model": cam_uri},
                    vocabulary=vocabulary, metrics=[])  # fmt: skip
    return cam_uri, irn_uri


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch

    from irnet_ray.config import CamInferenceConfig, SynthesisConfig
    from irnet_ray.data.sources import synthetic_records
    from irnet_ray.data.storage import StorageOptions
    from irnet_ray.data.synthetic import SyntheticConfig
    from irnet_ray.label import LabelJobConfig, label_images
    from irnet_ray.pipeline.commit_log import read_commits

    side = int(args.image_size)
    records, vocabulary = synthetic_records(
        SyntheticConfig(num_images=args.images, image_size=(side, side), num_classes=args.classes)
    )
    work = Path(tempfile.mkdtemp(prefix="label_bench_"))
    cam_uri, irn_uri = (args.cam, args.irn) if args.cam else _seeded_models(work / "models", vocabulary, args.arch)
    started = time.perf_counter()
    # Logical CPUs: every core, and at least the largest pool plus room for the decode and write
    # tasks (a pool that takes every CPU starves them and the job refuses to start).
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, math.ceil(args.cpus + TASK_CPUS))
    ray.init(num_cpus=num_cpus, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    ray_init_seconds = time.perf_counter() - started
    base = LabelJobConfig(
        cam_inference=CamInferenceConfig(scales=tuple(args.scales)),
        synthesis=SynthesisConfig(steps=args.walk_steps), max_side=args.max_side, batch_size=args.batch_size,
        decode_batch_size=args.batch_size, cpus_per_actor=args.cpus, gpus_per_actor=args.gpus_per_actor,
        rows_per_file=args.batch_size, evaluate=not args.no_eval,
    )  # fmt: skip
    rows = []
    try:
        label_images(records[:2], cam_uri, irn_uri, str(work / "warm-up"), base, overwrite=True)
        for actors in args.actors:
            config = dataclasses.replace(base, min_actors=actors, max_actors=actors, cpus_per_actor=args.cpus / actors)
            output = work / f"out-{actors}"
            summary = label_images(records, cam_uri, irn_uri, str(output), config, overwrite=True)
            if summary["labeled"] != args.images:
                raise RuntimeError(f"{actors} actor(s): labeled {summary['labeled']} of {args.images} ({summary})")
            commits = sorted((c for c in read_commits(str(output), StorageOptions()) if c["image_ids"]),
                             key=lambda c: c["time"])  # fmt: skip
            window = commits[-1]["time"] - commits[0]["time"]
            after_first = sum(len(c["image_ids"]) for c in commits[1:])
            rows.append({
                "actors": actors,
                "cpus_per_actor": args.cpus / actors,
                "threads_per_actor": max(1, round(args.cpus / actors)),
                "images_per_second": after_first / window if window > 0 else None,
                "end_to_end_images_per_second": args.images / summary["labeling_seconds"],
                "labeling_seconds": summary["labeling_seconds"],
                "commits": len(commits),
                "ms_per_image": {stage: summary["timings"]["ms_per_image"][stage] for stage in STAGES},
            })  # fmt: skip
    finally:
        ray.shutdown()
    for row in rows:
        first, mine = rows[0]["images_per_second"], row["images_per_second"]
        row["speedup"] = mine / first if first and mine else None
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},  # fmt: skip
        "ray_init_seconds": ray_init_seconds,
        "ray_cpus": num_cpus,
        "rows": rows,
    }


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(result: dict) -> str:
    lines = [
        "| actors | CPUs x threads per actor | images/s (steady) | speedup | images/s (end to end) | "
        + " | ".join(f"{s} ms/img" for s in STAGES) + " |",
        "|" + "---|" * (5 + len(STAGES)),
    ]
    for row in result["rows"]:
        stages = " | ".join(f"{row['ms_per_image'][s]:.1f}" for s in STAGES)
        lines.append(f"| {row['actors']} | {row['cpus_per_actor']:g} x {row['threads_per_actor']} | "
                     f"{_number(row['images_per_second'])} | {_number(row['speedup'])} | "
                     f"{row['end_to_end_images_per_second']:.2f} | {stages} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A plain `kill` should still run ray.shutdown() (the finally in run()), or the local
    # cluster's processes outlive this script.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
