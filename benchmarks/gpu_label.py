#!/usr/bin/env python
"""GPU benchmark of labeling: images/s per GPU of ``label_batch`` at 512 px, with its costs.

Written for the first GPU the project gets (one NVIDIA H200, Python 3.12, torch 2.11; no network
and no Ray there), run by ``benchmarks/gpu_label.sh``. It imports only what labeling inference
needs (:mod:`irnet_ray.inference`, the synthetic set, torch/torchvision/NumPy/SciPy) and checks
at the end that Ray, boto3, pycocotools and pydensecrf were not imported.

In one run, in this order (each step is printed as it finishes, and the JSON is rewritten after
each, so a run stopped early keeps what it measured):

1. versions (torch, CUDA, cuDNN, GPU name) and the TF32 switches in force;
2. ``peak``: the measured bf16 dense matmul rate (``--peak-size`` cubed, mean of
   ``PEAK_TIMED`` products after ``PEAK_WARMUP``), the ceiling that utilisation is quoted
   against;
3. ``flops``: the model FLOPs of one image, counted by ``torch.utils.flop_counter`` on
   :func:`irnet_ray.inference.infer_image` (every scale and flip of the backbone, the CAM head,
   IRNet): convolutions and matrix products only, 2 FLOPs per multiply-add;
4. ``sanity``: labels of ``--check-images`` images from ``label_batch`` on the device against
   ``label_image`` on the CPU in float32 with the same weights: semantic pixel agreement %;
5. ``per_image``: the baseline, ``label_image`` image by image on the device;
6. ``batched``: ``label_batch`` at each of ``--batch-sizes``: one warm-up batch, then
   ``--repeats`` rounds of ``--batches`` batches; images/s (median over rounds), the share of
   time in inference (backbone, CAM head, IRNet) / walk / instances / other, peak GPU memory
   (``torch.cuda.max_memory_allocated``), and achieved TFLOP/s = FLOPs per image x images/s,
   end to end and over the inference stage alone, with their fraction of the bf16 peak.

A deadline (``--deadline``, seconds from the start) bounds the run: no new batch size starts
after it, nor one that the previous size's time says would end past it. Weights are seeded
random (labeling cost does not depend on what they learned, except through the number of
instances); images are the built-in synthetic set, 1-3 classes each, ``--distinct-images`` of
them cycled.

``--device cpu --quick`` runs every step at tiny sizes on a CPU (the smoke test), so the script
is known to work end to end except for what only CUDA does.
"""

from __future__ import annotations

import argparse
import copy
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

#: Modules the GPU machine does not have; the labeling inference path must not import them.
FORBIDDEN_IMPORTS = ("ray", "boto3", "botocore", "pycocotools", "pydensecrf")
DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)
#: Matmul side of the peak measurement: large enough to reach the H200's bf16 plateau.
PEAK_SIZE = 8192
PEAK_WARMUP = 3
PEAK_TIMED = 10
#: Stop starting configurations this many seconds after the start (the run must fit 8 minutes
#: with start-up and the CPU check).
DEADLINE_SECONDS = 360.0
#: Below this semantic pixel agreement with the CPU float32 labels the run is flagged: more than
#: float rounding at near-ties would be a bug of the device path.
MIN_AGREEMENT = 0.99
#: The throughput goal per H200 at 512 px (docs/benchmarks.md).
TARGET_IMAGES_PER_SECOND = 400.0
#: ``--quick``: every step at tiny sizes (the CPU smoke test).
QUICK = {"arch": "resnet18", "size": 64, "batch_sizes": [2], "batches": 1, "repeats": 1, "scales": (1.0, 0.5),
         "walk_steps": 8, "per_image_images": 2, "check_images": 1, "distinct_images": 2, "peak_size": 256,
         "threads": 1}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default="cuda", help="torch device (cpu: the smoke test's check)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a CPU check: " + json.dumps(QUICK))
    parser.add_argument("--arch", default="resnet50", help="backbone of the seeded models")
    parser.add_argument("--size", type=int, default=512, help="square image side")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[8, 16, 32], help="label_batch sizes, ascending")
    parser.add_argument("--batches", type=int, default=2, help="batches per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per batch size (median)")
    parser.add_argument("--scales", type=cam_scales, default=DEFAULT_SCALES, help="CAM inference scales")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="CAMs of flipped images too")
    parser.add_argument("--walk-steps", type=int, default=256, help="random walk steps t")
    parser.add_argument("--per-image-images", type=int, default=8, help="images of the label_image baseline")
    parser.add_argument("--check-images", type=int, default=2, help="images of the device vs CPU float32 check")
    parser.add_argument("--distinct-images", type=int, default=32, help="synthetic images generated, then cycled")
    parser.add_argument("--peak-size", type=int, default=PEAK_SIZE, help="side of the bf16 peak matmul")
    parser.add_argument("--deadline", type=float, default=DEADLINE_SECONDS,
                        help="seconds from the start after which no new batch size starts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core); 1 keeps a shared machine's "
                        "busy cores from stalling every thread hand-off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (rewritten after every step)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.deadline = min(args.deadline, 60.0)
    for name in ("size", "batches", "repeats", "walk_steps", "per_image_images", "check_images", "distinct_images",
                 "peak_size"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class Run:
    """The results so far, printed step by step and saved after each."""

    def __init__(self, args):
        self.args, self.started, self.result = args, time.perf_counter(), {"settings": vars(args).copy(), "steps": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def record(self, key: str, value, line: str) -> None:
        self.result[key] = value
        self.result["steps"].append(key)
        self.result["seconds"] = self.elapsed()
        print(f"[{self.elapsed():6.1f} s] {key}: {line}", flush=True)
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(self.result, indent=2, default=str))


def versions(device) -> dict:
    import numpy
    import scipy
    import torch
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(device), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
    return info


def peak_matmul(device, size: int) -> dict:
    """Measured bf16 dense matmul TFLOP/s on ``device`` (random data)."""
    import torch
    from labeling_common import synchronize

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(PEAK_WARMUP):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(PEAK_TIMED):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - started) / PEAK_TIMED
    return {"size": size, "dtype": "bfloat16", "seconds": seconds, "tflops": 2 * size**3 / seconds / 1e12}


def count_flops(cam, irn, image, classes, cam_config) -> dict:
    """Model FLOPs of one image: every backbone pass (scales, flips), CAM head, IRNet."""
    from torch.utils.flop_counter import FlopCounterMode

    from irnet_ray.inference import infer_image

    counter = FlopCounterMode(display=False)
    with counter:
        infer_image(cam, irn, image, classes, cam_config)
    by_operator = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"per_image": int(counter.get_total_flops()), "by_operator": by_operator}


def sanity_check(cam_cpu, irn_cpu, cam, irn, images, classes, cam_config, synthesis_config) -> dict:
    """Semantic labels of ``label_batch`` on the device vs ``label_image`` on the CPU (float32)."""
    import torch
    from labeling_common import semantic_agreement

    from irnet_ray.inference import label_batch, label_image

    on_device = label_batch(cam, irn, images, classes, cam_config, synthesis_config)
    with torch.autocast("cpu", enabled=False):  # float32 whatever the device path does
        on_cpu = [label_image(cam_cpu, irn_cpu, image, c, cam_config, synthesis_config)
                  for image, c in zip(images, classes, strict=True)]  # fmt: skip
    agreement = semantic_agreement([l.semantic for l, _ in on_device], [l.semantic for l, _ in on_cpu])
    instances = [(len(a.instances.classes), len(b.instances.classes)) for (a, _), (b, _) in zip(on_device, on_cpu)]
    return {"images": len(images), "semantic_agreement": agreement, "instances_device_vs_cpu": instances}


def measure(label, images, classes, batch_size: int, batches: int, repeats: int, device) -> dict:
    """Warm-up batch, then ``repeats`` rounds of ``batches`` calls of ``label`` on cycled images."""
    import torch
    from labeling_common import StageProbe, stage_split, synchronize

    def batch(k: int):
        picks = [(k * batch_size + i) % len(images) for i in range(batch_size)]
        return [images[i] for i in picks], [classes[i] for i in picks]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    label(*batch(0), {})
    rates, wall, reported, probed = [], 0.0, {}, {}
    for r in range(repeats):
        synchronize(device)
        with StageProbe() as probe:
            started = time.perf_counter()
            for b in range(batches):
                own: dict[str, float] = {}
                label(*batch(1 + r * batches + b), own)
                for key, value in own.items():
                    reported[key] = reported.get(key, 0.0) + value
            synchronize(device)
            seconds = time.perf_counter() - started
        for key, value in probe.seconds.items():
            probed[key] = probed.get(key, 0.0) + value
        wall += seconds
        rates.append(batches * batch_size / seconds)
    split = stage_split(wall, reported, probed)
    return {"batch_size": batch_size, "images_per_second": statistics.median(rates), "rounds_images_per_second": rates,
            "images": repeats * batches * batch_size, "wall_seconds": wall, **split,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}  # fmt: skip


def add_flop_rates(row: dict, flops: dict, peak: dict) -> None:
    per_image = flops["per_image"]
    row["achieved_tflops"] = per_image * row["images_per_second"] / 1e12
    inference = row["seconds"]["inference"]
    row["inference_tflops"] = per_image * row["images"] / inference / 1e12 if inference > 0 else None
    row["utilisation"] = row["achieved_tflops"] / peak["tflops"]
    row["inference_utilisation"] = row["inference_tflops"] / peak["tflops"] if row["inference_tflops"] else None


def describe(row: dict) -> str:
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["shares"].items())
    memory = f", peak {row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") is not None else ""
    return (f"{row['images_per_second']:.2f} images/s ({shares}){memory}, {row['achieved_tflops']:.2f} TFLOP/s "
            f"({100 * row['utilisation']:.1f}% of bf16 peak; "
            f"inference stage {100 * (row['inference_utilisation'] or 0):.1f}%)")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)

    import torch
    from labeling_common import seeded_models, synthetic_images

    from irnet_ray.config import CamInferenceConfig, SynthesisConfig
    from irnet_ray.inference import label_batch, label_image

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = versions(device)
    run.record("versions", info, f"torch {info['torch']}, CUDA {info['cuda']}, {info.get('gpu', 'no GPU')}")
    peak = peak_matmul(device, args.peak_size)
    run.record("peak", peak, f"bf16 {args.peak_size}^3 matmul: {peak['tflops']:.1f} TFLOP/s")

    cam_cpu, irn_cpu = seeded_models(args.arch, seed=args.seed)
    cam, irn = copy.deepcopy(cam_cpu).to(device), copy.deepcopy(irn_cpu).to(device)
    cam_config = CamInferenceConfig(scales=tuple(args.scales), flip=args.flip)
    synthesis_config = SynthesisConfig(steps=args.walk_steps)
    count = max(args.distinct_images, args.check_images, args.per_image_images)
    images, classes = synthetic_images(min(count, args.distinct_images), args.size, seed=args.seed)
    run.record("images", {"distinct": len(images), "size": args.size, "classes_per_image": [len(c) for c in classes]},
               f"{len(images)} synthetic {args.size}x{args.size} images generated")  # fmt: skip

    flops = count_flops(cam, irn, images[0], classes[0], cam_config)
    run.record("flops", flops, f"{flops['per_image'] / 1e9:.1f} GFLOP per image (all scales, flips, IRNet)")

    check = [images[i % len(images)] for i in range(args.check_images)]
    check_classes = [classes[i % len(images)] for i in range(args.check_images)]
    sanity = sanity_check(cam_cpu, irn_cpu, cam, irn, check, check_classes, cam_config, synthesis_config)
    sanity["ok"] = sanity["semantic_agreement"] >= MIN_AGREEMENT
    run.record("sanity", sanity, f"{100 * sanity['semantic_agreement']:.2f}% semantic pixels agree with CPU float32 "
               f"(instances device/CPU {sanity['instances_device_vs_cpu']})"
               + ("" if sanity["ok"] else f"  WARNING: below {100 * MIN_AGREEMENT:.0f}%"))  # fmt: skip

    def per_image(batch_images, batch_classes, timings):
        for image, c in zip(batch_images, batch_classes):
            own: dict[str, float] = {}
            label_image(cam, irn, image, c, cam_config, synthesis_config, own)
            for key, value in own.items():
                timings[key] = timings.get(key, 0.0) + value

    baseline = measure(per_image, images, classes, args.per_image_images, 1, 1, device)
    add_flop_rates(baseline, flops, peak)
    run.record("per_image", baseline, describe(baseline))

    def batched(batch_images, batch_classes, timings):
        label_batch(cam, irn, batch_images, batch_classes, cam_config, synthesis_config, timings)

    rows, skipped, last = [], [], None
    for batch_size in args.batch_sizes:
        if last is not None:
            # The next size does about as many images/s on proportionally more images per round.
            expected = last[1] * batch_size / last[0]
            if run.elapsed() + expected > args.deadline:
                skipped.append(batch_size)
                continue
        if run.elapsed() > args.deadline:
            skipped.append(batch_size)
            continue
        started = time.perf_counter()
        row = measure(batched, images, classes, batch_size, args.batches, args.repeats, device)
        last = (batch_size, time.perf_counter() - started)
        add_flop_rates(row, flops, peak)
        row["speedup_vs_per_image"] = row["images_per_second"] / baseline["images_per_second"]
        rows.append(row)
        run.record("batched", rows, f"B={batch_size}: {describe(row)}, {row['speedup_vs_per_image']:.2f}x per-image")
    best = max(rows, key=lambda r: r["images_per_second"]) if rows else None
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN_IMPORTS)
    summary = {"best_batch_size": best and best["batch_size"], "best_images_per_second": best and best["images_per_second"],
               "target_images_per_second": TARGET_IMAGES_PER_SECOND, "skipped_batch_sizes": skipped,
               "sanity_ok": sanity["ok"], "forbidden_imports": loaded}  # fmt: skip
    run.record("summary", summary, json.dumps(summary))
    return 0 if not loaded else 1


if __name__ == "__main__":
    sys.exit(main())
