#!/usr/bin/env python
"""Benchmark: labeling throughput per image vs batched, in one process, in one run.

Two ways to label the same images with the same models (same objects, same settings, same
torch thread count), on this machine's CPU (or ``--device cuda``):

* ``per-image``: :func:`irnet_ray.inference.label_image` called image by image, which is what
  the labeling actors did before batching; the baseline.
* ``batched``: :func:`irnet_ray.inference.label_batch` over chunks of ``--batch-size`` images.

Both run the full labeling work: one backbone pass feeding the CAM head and IRNet, CAMs at
``--scales`` with flips, the random walk (``--walk-steps``), the instance map and the semantic
and instance labels. Images are the built-in synthetic set at each of ``--sizes`` (square),
with their classes; models have seeded random weights unless ``--cam`` / ``--irn`` are given.

Method: per size, one warm-up of each mode (one image per-image, one batch batched; first-call
costs: allocator, oneDNN/cuDNN kernel choice), then ``--repeats`` rounds, each labeling all
``--images`` images per-image and then batched (A B A B ...: slow drifts of a shared machine hit
both modes alike). images/s of a round = images / the round's wall time; the table gives the
median over rounds and ``batched / per-image`` of the medians; the ``paired ratio`` is the
median over rounds of each round's batched rate over the per-image rate just before it (less
exposed to a shared machine's swings). The bar: batching must not be slower than per-image on
the CPU.

Stage shares: the fraction of a mode's wall time (summed over rounds) spent in ``inference``
(backbone, CAM head, IRNet), ``walk`` (random walk), ``instances`` (instance map) and ``other``
(everything else: image to tensor, upsampling, making the labels, Python). Where the labeling
function does not report walk and instances itself they are timed around the synthesis
module's functions (``benchmarks/labeling_common.py``). ``agreement``: the fraction of pixels
whose semantic label is the same in both modes (a batched implementation must not change the
labels beyond float rounding).

The Ray labeling job's throughput (1 actor vs several on the same cores) is measured by
``benchmarks/label_job_throughput.py``.

Usage::

    python benchmarks/label_throughput.py --json runs/label_throughput.json    # defaults, CPU
    python benchmarks/label_throughput.py --arch resnet18 --sizes 64 --images 2 --batch-size 2 \\
        --repeats 1 --walk-steps 8 --scales 1.0                                  # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from labeling_common import cam_scales, positive_ints  # noqa: E402 - after the path set-up

MODES = ("per-image", "batched")
DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--sizes", type=positive_ints, default=[256, 512], help="square image sides, one table row each")
    parser.add_argument("--images", type=int, default=8, help="images per round (each mode labels all of them)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per label_batch call")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of per-image + batched after the warm-up")
    parser.add_argument("--arch", default="resnet50", help="backbone of the seeded models")
    parser.add_argument("--cam", default=None, help="trained CAM model folder (instead of seeded weights)")
    parser.add_argument("--irn", default=None, help="trained IRNet model folder (with --cam)")
    parser.add_argument("--scales", type=cam_scales, default=DEFAULT_SCALES, help="CAM inference scales")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="CAMs of flipped images too")
    parser.add_argument("--walk-steps", type=int, default=256, help="random walk steps t")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both modes)")
    parser.add_argument("--channels-last", action="store_true",
                        help="convert the models to channels-last memory format (both modes)")
    parser.add_argument("--device", default="cpu", help="torch device of the models (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the synthetic set")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("images", "batch_size", "repeats", "walk_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if bool(args.cam) != bool(args.irn):
        parser.error("--cam and --irn go together")
    return args


def _label_per_image(cam, irn, images, classes, cam_config, synthesis_config) -> tuple[list, dict]:
    from irnet_ray.inference import label_image

    results, timings = [], {}
    for image, c in zip(images, classes, strict=True):
        own: dict[str, float] = {}
        results.append(label_image(cam, irn, image, c, cam_config, synthesis_config, own))
        for key, value in own.items():
            timings[key] = timings.get(key, 0.0) + value
    return results, timings


def _label_batched(cam, irn, images, classes, cam_config, synthesis_config, batch_size: int) -> tuple[list, dict]:
    from irnet_ray.inference import label_batch

    results, timings = [], {}
    for start in range(0, len(images), batch_size):
        own: dict[str, float] = {}
        results += label_batch(cam, irn, images[start : start + batch_size], classes[start : start + batch_size],
                               cam_config, synthesis_config, own)  # fmt: skip
        for key, value in own.items():
            timings[key] = timings.get(key, 0.0) + value
    return results, timings


def measure_mode(mode: str, run, device) -> dict:
    """One round of ``run`` (a mode over all images): wall seconds, reported and probed stages."""
    from labeling_common import StageProbe, synchronize

    synchronize(device)
    with StageProbe() as probe:
        started = time.perf_counter()
        results, reported = run()
        synchronize(device)
        wall = time.perf_counter() - started
    return {"mode": mode, "wall": wall, "reported": reported, "probed": dict(probe.seconds), "results": results}


def measure_size(side: int, cam, irn, args, cam_config, synthesis_config) -> dict:
    """Warm-up, then ``--repeats`` alternating rounds of both modes at one image size."""
    from labeling_common import semantic_agreement, stage_split, synthetic_images

    images, classes = synthetic_images(args.images, side, seed=args.seed)
    runs = {
        "per-image": lambda n=None: _label_per_image(cam, irn, images[:n], classes[:n], cam_config, synthesis_config),
        "batched": lambda n=None: _label_batched(cam, irn, images[:n], classes[:n], cam_config, synthesis_config,
                                                 args.batch_size),  # fmt: skip
    }
    warm_up = {"per-image": 1, "batched": min(args.batch_size, args.images)}
    for mode in MODES:
        measure_mode(mode, lambda: runs[mode](warm_up[mode]), args.device)
    rounds = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            if rounds[mode]:
                rounds[mode][-1].pop("results")  # only the last round's labels are compared
            rounds[mode].append(measure_mode(mode, runs[mode], args.device))
            print(f"  {side} px {mode}: {args.images / rounds[mode][-1]['wall']:.3f} images/s", flush=True)
    row = {"size": side, "images": args.images}
    for mode in MODES:
        wall = sum(r["wall"] for r in rounds[mode])
        reported, probed = {}, {}
        for r in rounds[mode]:
            for target, source in ((reported, r["reported"]), (probed, r["probed"])):
                for key, value in source.items():
                    target[key] = target.get(key, 0.0) + value
        rates = [args.images / r["wall"] for r in rounds[mode]]
        row[mode] = {"images_per_second": statistics.median(rates), "rounds_images_per_second": rates,
                     "wall_seconds": wall, **stage_split(wall, reported, probed)}  # fmt: skip
    row["ratio"] = row["batched"]["images_per_second"] / row["per-image"]["images_per_second"]
    # Each round's batched rate over the per-image rate just before it: adjacent in time, so
    # less exposed to a shared machine's swings than the ratio of the medians.
    row["paired_ratios"] = [b / p for p, b in zip(row["per-image"]["rounds_images_per_second"],
                                                  row["batched"]["rounds_images_per_second"], strict=True)]  # fmt: skip
    row["paired_ratio_median"] = statistics.median(row["paired_ratios"])
    semantic = {mode: [labels.semantic for labels, _ in rounds[mode][-1]["results"]] for mode in MODES}
    row["agreement"] = semantic_agreement(semantic["per-image"], semantic["batched"])
    return row


def run(args: argparse.Namespace) -> dict:
    import torch
    from labeling_common import seeded_models, trained_models

    from irnet_ray.config import CamInferenceConfig, SynthesisConfig

    torch.set_num_threads(args.threads)
    cam, irn = trained_models(args.cam, args.irn) if args.cam else seeded_models(args.arch, seed=args.seed)
    cam, irn = cam.to(args.device), irn.to(args.device)
    if args.channels_last:
        cam, irn = cam.to(memory_format=torch.channels_last), irn.to(memory_format=torch.channels_last)
    cam_config = CamInferenceConfig(scales=tuple(args.scales), flip=args.flip)
    synthesis_config = SynthesisConfig(steps=args.walk_steps)
    started = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for side in args.sizes:
        rows.append(measure_size(side, cam, irn, args, cam_config, synthesis_config))
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_start": load,
                    "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},  # fmt: skip
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }


def table(result: dict) -> str:
    from labeling_common import SHARES

    shares = " | ".join(f"{s} %" for s in SHARES)
    lines = [f"| size | mode | images/s (median) | rounds (min-max) | batched / per-image | paired ratio (median) | "
             f"{shares} | agreement % |", "|" + "---|" * (7 + len(SHARES))]  # fmt: skip
    for row in result["rows"]:
        for mode in MODES:
            m = row[mode]
            split = " | ".join(f"{100 * m['shares'][s]:.1f}" for s in SHARES)
            ratio = f"{row['ratio']:.2f}" if mode == "batched" else "-"
            paired = f"{row['paired_ratio_median']:.2f}" if mode == "batched" else "-"
            spread = f"{min(m['rounds_images_per_second']):.3f}-{max(m['rounds_images_per_second']):.3f}"
            agreement = f"{100 * row['agreement']:.2f}" if mode == "batched" else "-"
            lines.append(f"| {row['size']} | {mode} | {m['images_per_second']:.3f} | {spread} | {ratio} | {paired} | "
                         f"{split} | {agreement} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
