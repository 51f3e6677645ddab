"""The driver of a batch-inference job: plan, stream through Ray Data, commit, finish.

A job (labeling, relation mining) is a thin definition on top of this: its decode options, its
model actor class, an optional CPU stage, its data schema and what its commit records add.

    open_output      check the folder against the job (models + settings), read the commit log
    plan_table       skip committed rows, refuse bad listing rows (planning.plan_table)
    run_pipeline     records -> decode tasks -> actor pool -> [CPU stage] -> writer -> commits
    finish_output    every row accounted for? errors table, manifest, orphan files removed
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import sys
import warnings
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import ray

from irnet_ray.data.columnar import table_of_records
from irnet_ray.data.sources import ImageRecord
from irnet_ray.data.storage import StorageOptions, is_s3

from . import commit_log as cl
from .attempts import DEFAULT_MAX_CRASHES, AttemptLedger, retry_options
from .lease import Lease, LeaseConfig
from .progress import Progress, quiet_ray_data
from .resources import PoolPlan
from .stages import decode_images, write_file

__all__ = ["PipelineFailed", "TooManyErrors", "CpuStage", "PipelineSpec", "LeaseConfig", "decode_memory",
           "open_output", "check_local_output", "run_pipeline", "finish_output"]  # fmt: skip

#: Input blocks at most (each block is one decode task's worth of records).
MAX_INPUT_BLOCKS = 2000
#: Parallel existence checks of the committed files before the manifest is written.


class PipelineFailed(RuntimeError):
    """The pipeline failed while running; what was committed stays, a rerun continues."""


class TooManyErrors(PipelineFailed):
    """More than the allowed share of the images failed: no manifest was written."""


@dataclasses.dataclass(frozen=True)
class CpuStage:
    """A CPU task stage between the actor pool and the writer (relation mining's dense CRF)."""

    fn: Callable
    kwargs: dict
    cpus: float
    batch_size: int


def decode_memory(decode_kwargs: dict, decode_batch_size: int) -> int:
    """Bytes a decode task reserves: one image's decoding at its bound, plus the batch's
    downscaled images (at most ``max_side`` squared each, or the pixel limit when not downscaled)."""
    side = decode_kwargs.get("max_side")
    per_image = 3 * (int(side) ** 2 if side else int(decode_kwargs["max_pixels"]))
    return int(decode_kwargs["max_decode_bytes"]) + int(decode_batch_size) * per_image


def check_local_output(output: str, allow: bool = False) -> None:
    """Refuse a local output on a Ray cluster of more than one alive node: the writer tasks run
    on every node and would each write to their own node's disk, while the driver's manifest
    would list files that exist nowhere together. ``allow``: the path is a shared mount (NFS).
    Does nothing when Ray is not initialised (nothing but the driver writes then)."""
    if allow or is_s3(output) or not ray.is_initialized():
        return
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    if alive > 1:
        raise cl.JobInputError(
            f"output {output} is a local path but the Ray cluster has {alive} nodes: each node would write to its "
            "own disk; write to s3:// (or another shared store), or, if the path is a filesystem shared by every "
            "node (NFS), pass --allow-local-output-on-cluster"
        )


@contextlib.contextmanager
def open_output(output: str, job: dict, options: StorageOptions, overwrite: bool, run_id: str,
                summarize: cl.Summarize | None = None, *, lease: LeaseConfig = LeaseConfig(),
                allow_local_output_on_cluster: bool = False,
                ) -> Iterator[tuple[cl.OutputState, cl.Committer]]:  # fmt: skip
    """``with open_output(...) as (state, committer):`` the run's hold on ``output``.

    Takes the output's lease first (a second writer is refused, naming the first; see
    :mod:`.lease`), then checks the folder against the job and reads its commit log. The lease is
    released when the block ends, by success or exception (a killed process leaves it to time
    out). A local output on a multi-node cluster is refused (:func:`check_local_output`; checked
    again in :func:`run_pipeline` when Ray starts later).
    """
    check_local_output(output, allow_local_output_on_cluster)
    held = Lease.acquire(output, options, run_id, lease, command=" ".join(sys.argv))
    try:
        state = cl.prepare_output(output, job, options, overwrite)
        committer = cl.Committer(output, state, options, run_id, summarize, lease=held)
        committer.allow_local_output_on_cluster = allow_local_output_on_cluster
        yield state, committer
    finally:
        held.release()


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What a job plugs into the pipeline (the stages are in :mod:`.stages`)."""

    decode_kwargs: dict  # decode_images settings (options, max_side, min_side, max_pixels, ...)
    decode_batch_size: int
    actor: type  # a ModelActor subclass
    actor_kwargs: dict  # its constructor arguments (threads, use_gpu and the guard are added)
    write_kwargs: dict  # write_file settings (output, options, data_schema, large_columns, run_id, ...)
    rows_per_file: int
    cpu_stage: CpuStage | None = None


def run_pipeline(
    pending: "Sequence[ImageRecord] | pa.Table | ray.data.Dataset",
    committer: cl.Committer,
    spec: PipelineSpec,
    plan: PoolPlan,
    *,
    max_crashes: int = DEFAULT_MAX_CRASHES,
    log: Callable[[str], None] = lambda message: None,
    stage: str = "pipeline",
    total: int | None = None,
    verbose: bool = False,
) -> int:
    """Stream ``pending`` (records, an image table of :mod:`irnet_ray.data.columnar`, or a Dataset
    of its rows: :meth:`.inputs.StreamPlan.send`) through the pipeline and commit every file as
    it arrives; returns the number of commits made. An image that ends its worker process
    ``max_crashes`` times becomes a ``crashed_worker`` error row (:mod:`.attempts`).

    Progress goes to ``log`` as lines (:class:`.progress.Progress`: ``stage``, images done of
    ``total``, images/s, ETA); Ray Data's own progress output is off unless ``verbose``."""
    check_local_output(committer.output, committer.allow_local_output_on_cluster)
    quiet_ray_data(verbose)
    if total is None:
        total = len(pending) if not isinstance(pending, ray.data.Dataset) else 0
    ledger = AttemptLedger.remote()
    progress = Progress(stage, total, log)
    try:
        ds = _dataset(pending, spec, plan, {"ledger": ledger, "max_crashes": int(max_crashes)})
        return _commit_stream(ds, committer, progress)
    finally:
        progress.close()
        ray.kill(ledger)


def _dataset(pending: "Sequence[ImageRecord] | pa.Table | ray.data.Dataset", spec: PipelineSpec, plan: PoolPlan,
             guard: dict):  # fmt: skip
    # Ray 2.60 has no named parameters for task retries and actor restarts; its deprecation of
    # ray_remote_args (for 2.64) does not apply to them yet.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
    crashes = guard["max_crashes"]
    if isinstance(pending, ray.data.Dataset):  # read and planned by Ray Data (inputs.plan_dataset)
        # Blocks of one decode batch: a block of 64k rows would be one decode task.
        ds = pending.repartition(target_num_rows_per_block=int(spec.decode_batch_size))
    else:
        table = pending if isinstance(pending, pa.Table) else table_of_records(pending)
        # The input goes to Ray Data as Arrow blocks (no Python dict per row in the driver).
        rows = table.num_rows
        blocks = max(1, min(MAX_INPUT_BLOCKS, -(-rows // int(spec.decode_batch_size))))
        step = -(-rows // blocks)
        ds = ray.data.from_arrow([table.slice(start, step) for start in range(0, rows, step)] or [table])
    ds = ds.map_batches(decode_images, batch_size=int(spec.decode_batch_size), batch_format="numpy",
                        num_cpus=float(plan.cpu_tasks["decode"]),
                        memory=decode_memory(spec.decode_kwargs, spec.decode_batch_size),
                        fn_kwargs={**spec.decode_kwargs, **guard},
                        **retry_options(crashes, spec.decode_batch_size, actor=False))  # fmt: skip
    ds = ds.map_batches(
        spec.actor, batch_size=plan.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor,
        fn_constructor_kwargs={**spec.actor_kwargs, **guard, "threads": max(1, round(plan.cpus_per_actor)),
                               "use_gpu": plan.use_gpu},
        **retry_options(crashes, plan.batch_size, actor=True),
    )  # fmt: skip
    stage = spec.cpu_stage
    if stage is not None:
        ds = ds.map_batches(stage.fn, batch_size=stage.batch_size, batch_format="pyarrow", num_cpus=stage.cpus,
                            fn_kwargs={**stage.kwargs, **guard},
                            **retry_options(crashes, stage.batch_size, actor=False))  # fmt: skip
    # Ray Data bundles the blocks up to rows_per_file rows per writer call, so files hold
    # rows_per_file rows (fewer only at the end of a bundle). Not repartition(strict=True): its
    # tasks take a whole CPU each, which waits behind the actor pool on small clusters and holds
    # every commit back until the pool is done.
    return ds.map_batches(write_file, batch_size=int(spec.rows_per_file), batch_format="pyarrow",
                          num_cpus=float(plan.cpu_tasks["write"]), fn_kwargs=spec.write_kwargs,
                          **retry_options(0, 1, actor=False))  # fmt: skip


def _commit_stream(ds, committer: cl.Committer, progress: Progress) -> int:
    commits = 0
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in batches:
            for meta in batch.column("meta").to_pylist():
                meta = json.loads(meta)
                committer.commit(meta)
                commits += 1
                progress.add(len(meta.get("image_ids", ())) + len(meta.get("errors", ())))
    except cl.JobInputError:
        raise
    except Exception as exc:
        raise PipelineFailed(
            f"the pipeline failed after committing {committer.processed} image(s) and {committer.errors} error(s) in "
            f"this run ({type(exc).__name__}: {' '.join(str(exc).split())[:500]}); {committer.output} stays "
            "unfinished: rerun the same job to process the rest"
        ) from exc
    finally:
        # Stop the pipeline now, not when the iterator is garbage collected: a stopped job must
        # not keep writing files next to a rerun.
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return commits


def finish_output(output: str, committer: cl.Committer, expected: "set | pa.Array | Callable[[pa.Table], pa.Array]",
                  options: StorageOptions,
                  manifest: dict[str, Any], max_error_rate: float = 1.0) -> dict:  # fmt: skip
    """Check that every expected key is committed, that at most ``max_error_rate`` of the output's
    rows are errors (:class:`TooManyErrors` otherwise: a misconfigured run, e.g. wrong credentials,
    must not end as a complete manifest of errors) and that every committed file exists, then write
    the errors table and the manifest (``manifest`` plus the files and counts) and delete this run's
    orphans (:func:`~irnet_ray.pipeline.commit_log.delete_orphans`). ``expected``: the keys, or a
    function of the committed table returning the expected keys missing from it."""
    if isinstance(expected, pa.Array) or callable(expected):  # keys of planning.key_column: checked vectorised
        from .planning import key_column

        done = committer.committed_table()
        if callable(expected):  # the keys are not all here: it finds the missing ones (inputs.StreamPlan.missing)
            missing = expected(done)
        else:
            done_keys = key_column(done.column("image_id"), done.column("occurrence"))
            missing = pc.filter(expected, pc.invert(pc.is_in(expected, value_set=done_keys)))
        lost = [tuple(k.split("\x1f")) for k in missing.slice(0, 3).to_pylist()] + [None] * max(0, len(missing) - 3)
    else:
        lost = committer.committed.missing(expected)
    if lost:
        raise PipelineFailed(
            f"{len(lost)} image(s) never came back from the pipeline (e.g. {[k[0] for k in lost[:3]]}); "
            f"{output} stays unfinished: run the same job again to process them"
        )
    standing = committer.standing
    check_error_rate(output, standing, max_error_rate)
    errors_file = cl.write_errors_table(output, standing, options)
    data_files = cl.committed_files(standing)
    _check_files_exist(output, [f["path"] for f in data_files] + [errors_file["path"]], options)
    committer.snapshot()  # a rerun reads the log in one request
    if committer.lease is not None:
        committer.lease.check()  # a run that lost its lease writes no manifest
    rows = sum(len(c.get("image_ids", [])) for c in standing)
    errors = sum(len(c.get("errors", [])) for c in standing)
    manifest = {**manifest, "complete": True, "images": rows + errors, "rows": rows, "errors": errors,
                "data_files": data_files, "errors_file": errors_file, "commits": len(committer.commits)}  # fmt: skip
    cl.write_manifest(output, manifest, options)
    # Every file a commit ever named is kept, also those replaced (no longer listed) by a relabel.
    cl.delete_orphans(output, [f["path"] for f in cl.committed_files(committer.commits)] + [errors_file["path"]], options,
                      started=committer.started, written=committer.delivered | {errors_file["path"]})  # fmt: skip
    return manifest


def check_error_rate(output: str, commits: list[dict], max_error_rate: float) -> None:
    """Raise :class:`TooManyErrors` with the reasons when errors exceed ``max_error_rate`` of the rows."""
    errors = [e for c in commits for e in c.get("errors", [])]
    rows = len(errors) + sum(len(c.get("image_ids", [])) for c in commits)
    if rows and len(errors) / rows > float(max_error_rate):
        reasons = collections.Counter(e["reason"] for e in errors).most_common()
        examples = "; ".join(f"{e['image_id']}: {e['message']}" for e in errors[:2])
        raise TooManyErrors(
            f"{len(errors)} of {rows} image(s) failed ({len(errors) / rows:.0%}, more than --max-error-rate "
            f"{float(max_error_rate):g}): {', '.join(f'{r} {n}' for r, n in reasons)} (e.g. {examples}). No manifest "
            f"was written, so {output} reads as unfinished. Fix the cause and rerun (transient failures such as "
            "access_denied are retried), or pass a higher --max-error-rate to accept these errors"
        )


def _check_files_exist(output: str, paths: list[str], options: StorageOptions) -> None:
    """Raise :class:`PipelineFailed` naming the first missing file (no manifest may list it)."""
    if not paths:
        return
    found = cl.files_exist(output, paths, options)  # one listing per folder, not one request per file
    missing = [path for path, there in zip(paths, found) if not there]
    if missing:
        raise PipelineFailed(
            f"{len(missing)} committed file(s) of {output} are missing (e.g. {missing[0]}); no manifest was written. "
            "Something deleted them while the job ran: run the job with --overwrite (overwrite=True) to start over"
        )
