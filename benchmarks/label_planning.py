#!/usr/bin/env python
"""Benchmark: planning a labeling run over an ImageNet-sized image set, columnar vs in-driver.

What ``irnet-ray label --dry-run`` does before any image is read: read the manifest, map class
names to ids, refuse bad rows, skip committed ids. Two implementations, each mode in a FRESH
subprocess (its ``VmHWM`` is the driver's peak memory for that mode alone):

* ``columnar``: :func:`irnet_ray.data.columnar.load_table` (pyarrow; one listing per image
  folder for fingerprints) + the steps of :func:`irnet_ray.pipeline.planning.read_committed` and ``plan_table``, timed apart (commit log
  read from its snapshot -> committed keys table -> ``pc.is_in`` anti-join, vectorised refusals). No Ray.
* ``ray``: what a labeling run does (:mod:`irnet_ray.pipeline.inputs`): a local Ray started as
  the job starts it, the manifest read and normalised by Ray Data (``read_parquet`` /
  ``read_csv``), planned block by block against the committed keys; the driver holds the
  committed keys, an 8-byte id hash a row and the rows that are not plainly pending. The peak
  is the driver's alone (the blocks are in Ray's object store and workers).
* ``columnar-nosnap``: the same as ``columnar``, with the commit log read record by record (every JSON record,
  as before the log had snapshots, and as a rerun after a crash reads the records newer than the
  last snapshot).
* ``records``: main's path before both: ``load_records`` (one ``ImageRecord`` per row), every JSON
  record read into a Python dict, a Python set of committed keys + :func:`plan_records` (below).
  Capped by ``--old-timeout``.

Inputs: a manifest of ``--rows`` rows (Parquet and CSV), ImageNet-like
(``n01440764/n01440764_10026.JPEG`` under a fake root that holds no files, one class name of
1000 each; no image is read). Two outputs: ``fresh`` (no commits) and ``rerun`` (``--commits``
commit records covering every row, in the commit log's JSON, put on a moto S3 server over
HTTP by 32 threads sharing one boto3 client, and the log's snapshot, as a rerun of a finished job
on S3 finds them). The moto server runs in a process
of its own, on a loopback port, started and stopped by the script. Each mode also reports its
phases (``load``, ``read_commits``, ``plan``); ``docs/benchmarks.md`` has the figures.

Usage::

    python benchmarks/label_planning.py --rows 1281167 --commits 20000 --old-timeout 300 --json runs/label_planning.json
    python benchmarks/label_planning.py --rows 5000 --commits 50       # smoke size (the test's)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLASSES = 1000
#: Threads that write the rerun's commit records to the S3 server.
SETUP_THREADS = 32
FAKE_ROOT = "/nonexistent/imagenet/train"


def make_manifests(folder: Path, rows: int) -> tuple[list[str], dict[str, str]]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    names = [f"n{1440764 + i * 37:08d}" for i in range(CLASSES)]
    cls = np.arange(rows) % CLASSES
    wnid = np.array(names, dtype=object)[cls]
    ids = [f"{w}_{10026 + i}" for i, w in enumerate(wnid)]
    images = [f"{FAKE_ROOT}/{w}/{i}.JPEG" for w, i in zip(wnid, ids)]
    table = pa.table({"image_id": ids, "image": images, "classes": wnid.tolist()})
    paths = {"parquet": str(folder / "train.parquet"), "csv": str(folder / "train.csv")}
    pq.write_table(table, paths["parquet"])
    pacsv.write_csv(table, paths["csv"])
    return names, paths


def write_commits(output: str, ids: list[str], commits: int, endpoint: str) -> None:
    """``commits`` records covering ``ids`` (each naming one small data file), as a finished run
    leaves them: the commit log's JSON (:func:`~irnet_ray.pipeline.commit_log._dump`) put by
    :data:`SETUP_THREADS` writers sharing ONE boto3 client (the project's ``write_commit`` makes
    a boto3 session per record, ~20k sessions took minutes: set-up only, not what is measured)."""
    import boto3
    import pyarrow as pa
    from botocore.config import Config

    from irnet_ray.data.parquet_files import write_table
    from irnet_ray.data.storage import StorageOptions
    from irnet_ray.pipeline import commit_log as cl

    write_table(cl.join(output, cl.DATA), "part-bench.parquet", pa.table({"image_id": ["x"]}),
                StorageOptions(endpoint_url=endpoint))  # fmt: skip
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(max_pool_connections=SETUP_THREADS, retries={"max_attempts": 5}))  # fmt: skip
    step = -(-len(ids) // commits)

    def one(sequence: int) -> None:
        chunk = ids[sequence * step:(sequence + 1) * step]
        record = {"sequence": sequence, "run_id": "bench", "file": {"path": "data/part-bench.parquet", "rows": len(chunk),
                  "bytes": 1}, "image_ids": chunk, "errors": [],
                  "inputs": [[i, 0, f"{FAKE_ROOT}/{i.split('_')[0]}/{i}.JPEG", ""] for i in chunk]}  # fmt: skip
        key = f"{prefix}/{cl.COMMITS}/{sequence:08d}.json"
        client.put_object(Bucket=bucket, Key=key, Body=cl._dump(record), IfNoneMatch="*")
        return record

    with ThreadPoolExecutor(SETUP_THREADS) as pool:
        records = list(pool.map(one, range(commits)))
    # ... and the snapshot a finished run writes before its manifest.
    light, inputs = cl.split_inputs(records)
    del records
    cl.write_snapshot(output, light, inputs, StorageOptions(endpoint_url=endpoint))


_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin (or ends)
server.stop()
"""


def start_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a loopback port, in a process of its own (as ``tests/conftest.py``
    starts one, but not in this process: its request handling would share this process's GIL
    with the set-up's writers). Returns (process, endpoint URL)."""
    process = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    endpoint = process.stdout.readline().strip()
    if not endpoint.startswith("http://127.0.0.1:"):
        process.kill()
        raise SystemExit(f"the moto server did not start (said {endpoint!r})")
    return process, endpoint


def stop_server(process: subprocess.Popen) -> None:
    try:
        process.stdin.close()
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_mode(mode: str, manifest: str, output: str, endpoint: str | None, names: list[str]) -> dict:
    """One measurement (in this fresh process)."""
    from irnet_ray.data.sources import ClassVocabulary
    from irnet_ray.data.storage import StorageOptions

    options = StorageOptions(endpoint_url=endpoint)
    vocabulary = ClassVocabulary(tuple(names))
    from irnet_ray.data.storage import StorageNotFound, exists, join
    from irnet_ray.pipeline import commit_log as cl

    def read_log() -> tuple[list[dict], object]:  # as read_committed / prepare_output read it
        try:
            return cl.read_commit_log(output, options) if exists(join(output, cl.COMMITS), options) else ([], None)
        except StorageNotFound:
            return [], None

    def read_every_record() -> list[dict]:  # the log's JSON records one by one, as read before snapshots
        uris = [u for u in cl._listing(join(output, cl.COMMITS), options, ".json")
                if cl._COMMIT_NAME.match(u.rsplit("/", 1)[-1])]  # fmt: skip
        return sorted(cl._parallel_read(uris, options), key=lambda c: int(c["sequence"]))

    phases = {}
    started = last = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases[name] = round(now - last, 3)
        last = now

    if mode in ("columnar", "columnar-nosnap"):
        # read_committed's and plan_table's steps (pipeline/planning.py), timed one by one.
        from irnet_ray.data.columnar import load_table
        from irnet_ray.pipeline.planning import committed_table, plan_table

        base = rss_mib()
        table, _ = load_table(manifest, options, vocabulary)
        phase("load")
        commits, inputs = read_log() if mode == "columnar" else cl.split_inputs(read_every_record())
        phase("read_commits")
        retried = cl.transient_errors(commits)
        committed = committed_table(commits, retried, inputs)
        del commits, inputs  # as read_committed does, which then hands the freed pages back
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
        plan = plan_table(table, committed, vocabulary.num_classes, "dry-run")
        phase("plan")
        result = {"pending": plan.pending.num_rows, "skipped": plan.skipped, "refused": len(plan.errors)}
    elif mode == "ray":
        # The labeling job's streamed path (pipeline/inputs.py): Ray Data reads and plans the
        # blocks; the driver holds the committed keys, one 8-byte hash a row and the side rows.
        from irnet_ray.pipeline.inputs import plan_dataset, read_image_dataset
        from irnet_ray.pipeline.planning import read_committed
        from irnet_ray.train.ray_train import ensure_ray

        ensure_ray(include_dashboard=False)  # the object store the job starts with (256 MiB; blocks spill)
        phase("ray_start")
        base = rss_mib()
        committed, _ = read_committed(output, options)
        phase("read_commits")
        plan = plan_dataset(read_image_dataset(manifest, options, vocabulary), committed, vocabulary.num_classes,
                            "dry-run", "empty")  # fmt: skip
        phase("load_and_plan")
        result = {"pending": plan.to_send, "skipped": plan.skipped, "refused": len(plan.errors)}
    else:
        from irnet_ray.data.sources import load_records

        base = rss_mib()
        records, _ = load_records(manifest, options, vocabulary=vocabulary, allow_duplicate_ids=True)
        phase("load")
        commits = read_every_record()
        phase("read_commits")
        committed: set = set()
        for commit in cl.effective_commits(commits):
            committed |= cl.commit_keys(commit)
        pending, errors, skipped = plan_records(records, committed, vocabulary.num_classes, "bench")
        phase("plan")
        result = {"pending": len(pending), "skipped": skipped, "refused": len(errors)}
    result["seconds"] = time.perf_counter() - started
    result["phases"] = phases
    result["peak_rss_mib"] = peak_rss_mib()
    # What planning itself added: the peak above this process's memory before it read anything
    # (its imports, and for the ray mode the running Ray driver: ~0.7 GiB with torch, as any run).
    result["base_rss_mib"] = base
    result["planning_mib"] = result["peak_rss_mib"] - base
    return result


def plan_records(records, committed: set, num_classes: int, run_id: str):
    """The per-row planner the jobs used before :mod:`irnet_ray.pipeline.planning` (kept here as
    the baseline, and as the reference that ``tests/test_label_planning.py`` checks the columnar
    plan against): ``(pending records, error rows, number already committed)``.

    A repeated image id, an image without classes and a class id outside the models' classes
    are refused per row (reasons ``duplicate_id``, ``no_classes``, ``class_out_of_range``).
    """
    from irnet_ray.data import output_format as of

    pending, errors, skipped = [], [], 0
    listed = collections.Counter(r.image_id for r in records)
    occurrences: collections.Counter = collections.Counter()
    for record in records:
        occurrence = occurrences[record.image_id]
        occurrences[record.image_id] += 1
        if (record.image_id, occurrence) in committed:
            skipped += 1
            continue
        reason = message = None
        if listed[record.image_id] > 1:
            # Output rows are keyed by image id and no row can be told to be the right one
            # (first-wins would depend on row order): every row of a repeated id is refused.
            reason = "duplicate_id"
            message = f"image id {record.image_id!r} is listed {listed[record.image_id]} times (this is row {occurrence + 1} of them)"
        elif not record.classes:
            reason, message = "no_classes", "the image has no image-level classes: nothing to localise"
        elif max(record.classes) > num_classes:
            reason = "class_out_of_range"
            message = f"class id {max(record.classes)} is outside the models' classes 1..{num_classes}"
        if reason is None:
            pending.append(record)
        else:
            errors.append(of.error_row(image_id=record.image_id, uri=record.uri, classes=record.classes, stage="input",
                                       reason=reason, message=message, run_id=run_id, occurrence=occurrence))  # fmt: skip
    return pending, errors, skipped


def rss_mib() -> float:
    """This process's resident memory now (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    """This process's peak resident memory. ``VmHWM`` (Linux) rather than ``ru_maxrss``: the
    latter survives ``exec`` and would report the parent's peak for a child started by it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--commits", type=int, default=20_000, help="commit records of the rerun output")
    parser.add_argument("--old-timeout", type=float, default=600.0, help="seconds the records path may take per mode")
    parser.add_argument("--outputs", default="fresh,rerun", help="which outputs to plan against (fresh, rerun)")
    parser.add_argument("--formats", default="parquet,csv", help="manifest formats (parquet, csv)")
    parser.add_argument("--modes", default="columnar,ray,columnar-nosnap,records",
                        help="which planners to run (columnar, ray, columnar-nosnap, records)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=5, metavar=("MODE", "MANIFEST", "OUTPUT", "ENDPOINT", "NAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, manifest, output, endpoint, names = args.child
        print(json.dumps(run_mode(mode, manifest, output, endpoint if endpoint != "-" else None,
                                  json.loads(Path(names).read_text()))))  # fmt: skip
        return 0

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    server, endpoint = start_server()
    rows_out = []
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            names, manifests = make_manifests(folder, args.rows)
            (folder / "names.json").write_text(json.dumps(names))
            import pyarrow.parquet as pq

            ids = pq.read_table(manifests["parquet"], columns=["image_id"]).column("image_id").to_pylist()
            started = time.perf_counter()
            write_commits("s3://bench/rerun", ids, args.commits, endpoint)
            setup = time.perf_counter() - started
            del ids
            print(f"{args.rows} rows; {args.commits} commit records written to moto in {setup:.1f} s", flush=True)
            outputs = {"fresh": str(folder / "fresh-output"), "rerun": "s3://bench/rerun"}
            outputs = {name: outputs[name] for name in args.outputs.split(",")}
            for output_name, output in outputs.items():
                for fmt in args.formats.split(","):
                    for mode in args.modes.split(","):
                        if mode == "columnar-nosnap" and output_name == "fresh":
                            continue  # no log to read: the same as columnar
                        command = [sys.executable, __file__, "--child", mode, manifests[fmt], output, endpoint,
                                   str(folder / "names.json")]  # fmt: skip
                        row = {"output": output_name, "format": fmt, "mode": mode}
                        try:
                            done = subprocess.run(command, capture_output=True, text=True,
                                                  timeout=args.old_timeout if mode not in ("columnar", "ray") else None)  # fmt: skip
                        except subprocess.TimeoutExpired:
                            row.update(timed_out=True, seconds=args.old_timeout)
                        else:
                            if done.returncode != 0:
                                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
                            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                        rows_out.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        stop_server(server)
    print("\n| output | manifest | mode | seconds | driver peak MiB | of it planning MiB | pending | skipped | refused |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows_out:
        if r.get("timed_out"):
            print(f"| {r['output']} | {r['format']} | {r['mode']} | > {r['seconds']:.0f} (timed out) | | | | | |")
        else:
            print(f"| {r['output']} | {r['format']} | {r['mode']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                  f"{r['planning_mib']:.0f} | "
                  f"{r['pending']} | {r['skipped']} | {r['refused']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": args.rows, "commits": args.commits, "setup_seconds": setup,
                                               "results": rows_out}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
