#!/usr/bin/env python
"""Benchmark: sparse random walk (ours) vs. the dense formulation of the 2019 reference code.

The random walk of Eq. 12-13 propagates K stride-4 score maps with ``T^t vec(scores * (1 - B))``,
t = 256. Two ways to compute it:

* ``sparse`` -- :func:`irnet_ray.synthesis.random_walk`, end to end: builds the sparse CSR
  transition matrix (at most 69 non-zeros per row at radius 5) and applies it 256 times.
  Memory O(N), time O(t N K).
* ``dense`` -- what the reference did: the dense N x N transition matrix (here
  ``transition_matrix(...).to_dense()``, so both methods use exactly the same weights), squared
  eight times (T^256 = T^(2^8)), then one product with the seeded scores. Memory O(N^2), time
  O(N^3). The reference wrote it as ``x @ T_column_normalised``; with our row-normalised T the
  same numbers are ``T^256 @ x_columns``. Also timed end to end (matrix construction included).

Every (method, size) runs in a fresh Python process (this script re-invoked with a hidden
``--worker`` flag), so that peak memory is that method's alone: on CPU the growth of the peak
RSS (``ru_maxrss``) over the baseline taken after imports, a tiny warm-up and input creation;
on CUDA ``torch.cuda.max_memory_allocated`` over the memory allocated at the same point.

Dense runs are skipped when their matrices would not fit ``--dense-max-gib`` (it needs
``DENSE_MATRICES`` N x N float32 matrices at once) or N exceeds ``--dense-max-n`` (the O(N^3)
time: 94x125, N = 11750, is eight 11750^3 products, about 3 minutes on 2 CPU cores).

Usage::

    python benchmarks/random_walk.py                                  # default sizes, CPU
    python benchmarks/random_walk.py --sizes 24x32,48x64 --repeats 1  # quick check
    python benchmarks/random_walk.py --device cuda --json rw.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

STEPS = 256
SQUARINGS = 8  # STEPS == 2 ** SQUARINGS
# Peak number of N x N float32 matrices alive in the dense method: the old T and the new
# T @ T during each squaring (the to_dense() result is the first old T). 3 leaves room for the
# allocator and BLAS work space, as a conservative estimate for the skip decision.
DENSE_MATRICES = 3
DEFAULT_SIZES = "24x32,48x64,64x80,94x125,128x128,256x256"
METHODS = ("sparse", "dense")
MIB = 2**20
GIB = 2**30


# --------------------------------------------------------------------------------------------
# Inputs and the two methods (run inside the worker processes)
# --------------------------------------------------------------------------------------------


def make_inputs(height: int, width: int, maps: int, seed: int):
    """Seeded random inputs: boundary = rand**3 (mostly low, some strong edges), scores U[0, 1]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    boundary = torch.rand(height, width, generator=generator) ** 3
    scores = torch.rand(maps, height, width, generator=generator)
    return scores, boundary


def run_sparse(scores, boundary, radius: int, beta: float):
    from irnet_ray.synthesis import random_walk

    return random_walk(scores, boundary, radius=radius, beta=beta, steps=STEPS)


def run_dense(scores, boundary, radius: int, beta: float):
    """The reference's formulation: dense T, squared SQUARINGS times, one product with x."""
    import warnings

    from irnet_ray.synthesis import transition_matrix

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = transition_matrix(boundary, radius=radius, beta=beta).to_dense()
    for _ in range(SQUARINGS):
        matrix = matrix @ matrix
    columns = (scores.float() * (1.0 - boundary.float())).flatten(1).T  # (N, K)
    walked = matrix @ columns
    return walked.T.reshape(scores.shape)


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes, Linux: KiB


def worker(spec: dict) -> dict:
    """One (method, size) in this fresh process: warm up, build inputs, time, measure memory."""
    import torch

    # Before any parallel region: the OpenMP/MKL worker threads inherit the FTZ/DAZ flags of the
    # thread that creates them; set later, they would only reach the main thread.
    torch.set_flush_denormal(spec["flush_denormal"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    method = run_sparse if spec["method"] == "sparse" else run_dense
    radius, beta = spec["radius"], spec["beta"]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # Warm-up on a tiny map: lazy initialisation (CUDA context, cuBLAS/cuSPARSE handles, imports)
    # is neither timed nor counted as the method's memory.
    tiny_scores, tiny_boundary = make_inputs(8, 8, 2, 0)
    method(tiny_scores.to(device), tiny_boundary.to(device), radius, beta)
    sync()

    scores, boundary = make_inputs(spec["height"], spec["width"], spec["maps"], spec["seed"])
    scores, boundary = scores.to(device), boundary.to(device)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _max_rss_bytes()

    times, result = [], None
    for _ in range(spec["repeats"]):
        result = None  # free the previous result before the next run
        sync()
        start = time.perf_counter()
        result = method(scores, boundary, radius, beta)
        sync()
        times.append(time.perf_counter() - start)

    peak = (torch.cuda.max_memory_allocated(device) if cuda else _max_rss_bytes()) - baseline
    torch.save(result.detach().float().cpu(), spec["result_path"])
    return {
        "status": "ok",
        "times_s": times,
        "time_s": statistics.median(times),
        "repeats": len(times),
        "peak_mib": max(peak, 0) / MIB,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().strip().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 94x125), got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return height, width


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sparse random walk (irnet_ray) vs. the reference's dense T^256 (Eq. 12-13).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES,
                        help="comma-separated stride-4 map sizes HxW (image ~ 4H x 4W)")
    parser.add_argument("--maps", type=int, default=20, help="score maps K propagated together")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of sparse; the median is reported")
    parser.add_argument("--dense-repeats", type=int, default=1,
                        help="timed runs of dense (each takes minutes at 94x125 on a small CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--dense-max-gib", type=float, default=4.0,
                        help=f"skip dense when its {DENSE_MATRICES} N x N float32 matrices need more")
    parser.add_argument("--dense-max-n", type=int, default=12000, help="skip dense above this N = h*w (O(N^3) time)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers (None: torch's default)")
    parser.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.set_flush_denormal in the workers: without it, the subnormal floats that "
                        "appear while squaring T make CPU BLAS ~10x slower and the dense time a CPU artefact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--radius", type=int, default=5)
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one run
    return parser


def machine_info(args) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": args.threads or torch.get_num_threads(),
        "device": args.device,
    }
    if args.device == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def dense_skip_reason(n: int, args) -> tuple[str | None, float]:
    needs_gib = DENSE_MATRICES * n * n * 4 / GIB
    if needs_gib > args.dense_max_gib:
        return f"skipped: needs {needs_gib:.1f} GiB", needs_gib
    if n > args.dense_max_n:
        return f"skipped: N > {args.dense_max_n}", needs_gib
    return None, needs_gib


def run_worker_process(spec: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"status": f"failed (exit {done.returncode})", "error": "\n".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def benchmark(args, log=print) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    machine = machine_info(args)
    config = {
        "maps": args.maps, "repeats": args.repeats, "dense_repeats": args.dense_repeats,
        "steps": STEPS, "radius": args.radius, "beta": args.beta, "seed": args.seed,
        "dense_max_gib": args.dense_max_gib, "dense_max_n": args.dense_max_n,
        "dense_matrices_estimate": DENSE_MATRICES, "device": args.device,
        "threads": machine["torch_threads"], "flush_denormal": args.flush_denormal,
    }
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rw-bench-") as tmp:
        for height, width in args.sizes:
            n = height * width
            row = {
                "size": f"{height}x{width}", "height": height, "width": width,
                "image_size": f"{4 * height}x{4 * width}", "n": n,
            }
            outputs = {}
            for method in METHODS:
                if method == "dense":
                    reason, needs_gib = dense_skip_reason(n, args)
                    if reason:
                        row[method] = {"status": reason, "needs_gib": needs_gib}
                        log(f"[{row['size']}] {method}: {reason}", file=sys.stderr)
                        continue
                spec = {
                    "method": method, "height": height, "width": width, "maps": args.maps,
                    "seed": args.seed, "radius": args.radius, "beta": args.beta, "device": args.device,
                    "threads": args.threads, "flush_denormal": args.flush_denormal,
                    "repeats": args.repeats if method == "sparse" else args.dense_repeats,
                    "result_path": os.path.join(tmp, f"{method}-{height}x{width}.pt"),
                }
                log(f"[{row['size']}] {method}: running ...", file=sys.stderr)
                result = run_worker_process(spec)
                if method == "dense":
                    result["needs_gib"] = dense_skip_reason(n, args)[1]
                row[method] = result
                if result["status"] == "ok":
                    outputs[method] = torch.load(spec["result_path"])
                    log(f"[{row['size']}] {method}: {result['time_s']:.3f} s, {result['peak_mib']:.1f} MiB",
                        file=sys.stderr)
                else:
                    log(f"[{row['size']}] {method}: {result['status']}\n{result.get('error', '')}", file=sys.stderr)
            sparse, dense = row["sparse"], row.get("dense", {})
            row["time_ratio"] = _ratio(dense.get("time_s"), sparse.get("time_s"))
            row["memory_ratio"] = _ratio(dense.get("peak_mib"), sparse.get("peak_mib"))
            if "sparse" in outputs and "dense" in outputs:
                a, b = outputs["sparse"].double(), outputs["dense"].double()
                row["max_rel_diff"] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
            else:
                row["max_rel_diff"] = None
            rows.append(row)
    return {"machine": machine, "config": config, "results": rows,
            "total_wall_s": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _method_cells(result: dict) -> tuple[str, str]:
    if result.get("status") != "ok":
        return result.get("status", "-"), "-"
    return f"{result['time_s']:.3f}", f"{result['peak_mib']:.1f}"


def markdown_table(report: dict) -> str:
    header = ("| map (h x w) | image (4h x 4w) | N | sparse time (s) | sparse peak (MiB) | dense time (s) "
              "| dense peak (MiB) | time dense/sparse | memory dense/sparse | max rel diff |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["results"]:
        sparse_time, sparse_mem = _method_cells(row["sparse"])
        dense_time, dense_mem = _method_cells(row["dense"])
        lines.append(
            f"| {row['size']} | {row['image_size']} | {row['n']} | {sparse_time} | {sparse_mem} | {dense_time} "
            f"| {dense_mem} | {_fmt(row['time_ratio'], '.1f')} | {_fmt(row['memory_ratio'], '.1f')} "
            f"| {_fmt(row['max_rel_diff'], '.2e')} |"
        )
    return "\n".join(lines)


def describe(report: dict) -> str:
    m, c = report["machine"], report["config"]
    device = m["device"] + (f" ({m['cuda_device']}, CUDA {m['cuda']})" if "cuda_device" in m else "")
    memory = "torch.cuda.max_memory_allocated growth" if m["device"] == "cuda" else "peak RSS growth (ru_maxrss)"
    return (
        f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} torch threads, "
        f"device {device}, Python {m['python']}, {m['platform']}\n"
        f"Config: K = {c['maps']} maps, t = {c['steps']} steps, radius {c['radius']}, beta {c['beta']}, "
        f"seed {c['seed']}, flush denormals {'on' if c['flush_denormal'] else 'off'}; time = median of {c['repeats']} run(s) (sparse), {c['dense_repeats']} run(s) "
        f"(dense), both end to end incl. the transition matrix; peak = {memory}, one fresh process "
        f"per cell; dense skipped above {c['dense_max_gib']:g} GiB ({c['dense_matrices_estimate']} N x N "
        f"float32) or N > {c['dense_max_n']}; max rel diff = max|sparse - dense| / max|dense|.\n"
        f"Total wall time: {report['total_wall_s']:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return result
    if args.maps < 1 or args.repeats < 1 or args.dense_repeats < 1:
        raise SystemExit("--maps, --repeats and --dense-repeats must be >= 1")
    report = benchmark(args)
    print(markdown_table(report))
    print()
    print(describe(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
