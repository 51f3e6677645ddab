"""The labeling job's driver: a thin definition on :mod:`irnet_ray.pipeline`.

``label_images`` runs in the driver process (a laptop, the head node, or a ``ray job submit``
entrypoint). It checks every user input before any work starts (models, image set, output
folder), writes the per-image errors it can find in the listing itself, streams the pending
images through decode tasks -> :class:`~irnet_ray.label.stages.LabelActor` pool -> writer, and
commits each written file as it arrives (:mod:`irnet_ray.pipeline.commit_log` has the protocol),
then writes the errors table and the manifest.
"""

from __future__ import annotations

import collections
import time
import uuid
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import pyarrow as pa

from irnet_ray import __version__
from irnet_ray.data import output_format as of
from irnet_ray.data.sources import ClassVocabulary, ImageRecord
from irnet_ray.data.storage import StorageOptions, normalize
from irnet_ray.model_files import check_model_pair
from irnet_ray.pipeline import commit_log as cl
from irnet_ray.pipeline.inputs import open_image_set, reads_with_ray
from irnet_ray.pipeline.planning import Plan, read_committed
from irnet_ray.pipeline.progress import quiet_ray_data
from irnet_ray.pipeline.resources import plan_pool
from irnet_ray.pipeline.run import (
    LeaseConfig,
    PipelineFailed,
    PipelineSpec,
    finish_output,
    open_output,
    run_pipeline,
)

from .config import LabelJobConfig, label_settings, settings_id
from .scores import ScoreBoard
from .stages import LARGE_COLUMNS, STAGES, LabelActor, ground_truth, summarize_rows

if TYPE_CHECKING:
    from irnet_ray.pipeline.inputs import StreamPlan

__all__ = ["label_images", "LabelJobFailed", "format_summary", "format_plan"]

_MAX_LISTED_GT_ERRORS = 20
#: Changed image ids named in a refusal or a dry-run summary.
_MAX_LISTED_CHANGED = 5

#: The pipeline's failures, under the labeling job's names.
LabelJobFailed = PipelineFailed


def _changed_message(output: str, changed: pa.Table) -> str:
    rows = changed.slice(0, _MAX_LISTED_CHANGED).to_pylist()
    examples = "; ".join(f"{r['image_id']}: {r['old_uri']} -> {r['uri']}" + (" (file changed)" if r["uri"] == r["old_uri"] else "")
                         for r in rows)  # fmt: skip
    return (f"{changed.num_rows} image id(s) committed in {output} now name another file (e.g. {examples}); "
            "pass --relabel-changed (relabel_changed=True) to label them again, or --overwrite to start over")


def _plan_summary(output: str, plan: "Plan | StreamPlan", retried: int, relabel_changed: bool) -> dict:
    changed = plan.changed.num_rows
    return {
        "output": output, "dry_run": True, "images": plan.rows,
        "to_label": plan.to_send + (changed if relabel_changed else 0), "skipped": plan.skipped,
        "refused": len(plan.errors), "refused_by_reason": plan.refused, "retried": retried, "changed": changed,
        "changed_examples": plan.changed.slice(0, _MAX_LISTED_CHANGED).to_pylist(),
        "relabel_changed": bool(relabel_changed),
    }  # fmt: skip


_EMPTY = "the image set is empty: nothing to label"


def ensure_ray(address: str | None) -> None:
    from irnet_ray.train.ray_train import ensure_ray as start  # torch: imported when a run needs it

    start(address=address)


def format_plan(summary: dict) -> str:
    """The dry-run summary for people."""
    refused = ", ".join(f"{k} {v}" for k, v in summary["refused_by_reason"].items()) or "none"
    lines = [f"dry run on {summary['output']}: {summary['images']} input row(s)",
             f"  would label {summary['to_label']} image(s) (of them {summary['retried']} earlier transient failure(s) "
             f"retried" + (f", {summary['changed']} changed" if summary["relabel_changed"] else "") + ")",
             f"  skipped (committed): {summary['skipped']}",
             f"  refused from the listing: {summary['refused']} ({refused})",
             f"  changed files under committed ids: {summary['changed']}"
             + ("" if summary["relabel_changed"] or not summary["changed"] else " (a run is refused; --relabel-changed relabels them)")]  # fmt: skip
    lines += [f"    {r['image_id']}: {r['old_uri']} -> {r['uri']}" for r in summary["changed_examples"]]
    return "\n".join(lines)


def _commit_summary(num_classes: int):
    """What a labeling commit record adds: the images' merged scores, their ground-truth
    problems and the stage timings (from the writer's meta)."""

    def summarize(meta: dict, ids: list) -> dict:
        board = ScoreBoard(num_classes)
        for image_id in ids:
            board.add(meta.get("scores", {}).get(image_id))
        kept = set(ids)
        return {"scores": board.compact() if board.images else None,
                "gt_errors": [g for g in meta.get("gt_errors", []) if g["image_id"] in kept],
                "timings": meta.get("timings", {}), "timed_images": int(meta.get("timed_images", 0))}  # fmt: skip

    return summarize


def _totals(commits: list[dict], class_names: Sequence[str]) -> dict:
    board = ScoreBoard(len(class_names), class_names)
    timings = dict.fromkeys(STAGES, 0.0)
    timed = images = errors = 0
    reasons: collections.Counter = collections.Counter()
    gt_errors: list[dict] = []
    runs: dict[str, dict] = {}
    for c in commits:
        board.add(c.get("scores"))
        for stage in STAGES:
            timings[stage] += float(c.get("timings", {}).get(stage, 0.0))
        timed += int(c.get("timed_images", 0))
        images += len(c.get("image_ids", []))
        errors += len(c.get("errors", []))
        reasons.update(e["reason"] for e in c.get("errors", []))
        gt_errors.extend(c.get("gt_errors", []))
        run = runs.setdefault(c["run_id"], {"labeled": 0, "errors": 0, "commits": 0})
        run["labeled"] += len(c.get("image_ids", []))
        run["errors"] += len(c.get("errors", []))
        run["commits"] += 1
    per_image = {stage: (timings[stage] / timed * 1000.0 if timed else None) for stage in STAGES}
    return {
        "labeled": images, "errors": errors, "errors_by_reason": dict(sorted(reasons.items())),
        "metrics": board.evaluate(), "ground_truth_errors": {"count": len(gt_errors),
                                                              "examples": gt_errors[:_MAX_LISTED_GT_ERRORS]},
        "timings": {"seconds": timings, "ms_per_image": per_image, "images": timed}, "runs": runs,
    }  # fmt: skip


def label_images(
    images: str | Sequence[ImageRecord],
    cam_model_uri: str | None,
    irn_model_uri: str,
    output_uri: str,
    config: LabelJobConfig = LabelJobConfig(),
    storage_options: StorageOptions = StorageOptions(),
    *,
    overwrite: bool = False,
    lease: LeaseConfig = LeaseConfig(),
    allow_local_output_on_cluster: bool = False,
    dry_run: bool = False,
    relabel_changed: bool = False,
    manifest_columns: Mapping[str, str] | None = None,
    inputs: str = "auto",
    ray_address: str | None = None,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> dict:
    """Label ``images`` (an image-set spec as :func:`~irnet_ray.data.sources.load_records`
    takes, or records) with the CAM model at ``cam_model_uri`` (``None``: the one IRNet was
    trained with) and IRNet at ``irn_model_uri``, into ``output_uri`` (local or ``s3://``).

    Returns a summary: ``output``, ``run_id``, ``images`` (input rows), ``labeled`` / ``errors``
    (this run), ``skipped`` (committed before), ``total_labeled`` / ``total_errors`` /
    ``errors_by_reason`` (the whole output), ``images_per_second`` (this run's labeling),
    ``metrics`` (``None`` without ground truth), ``files``, ``seconds``. User mistakes raise
    before any work starts: :class:`~irnet_ray.pipeline.commit_log.JobInputError` (``LabelJobError``), a
    :class:`~irnet_ray.model_files.ModelFileError`, ``ValueError``
    (including the image-set errors of :mod:`irnet_ray.data.sources`) or a
    :class:`~irnet_ray.data.storage.StorageError`.

    The run holds the output's lease while it runs (``lease``: heartbeat, timeout, take-over;
    see :mod:`irnet_ray.pipeline.lease`): a second run on the same output is refused with a
    ``JobInputError`` naming the first. A local output on a multi-node Ray cluster is refused
    unless ``allow_local_output_on_cluster`` (the path is shared by every node, e.g. NFS).

    ``dry_run``: read the image set and the output's commit log, return what a run would do
    (:func:`format_plan`: to label, skipped, refused by reason, retried, changed) and stop: no
    actors (no Ray at all unless ``inputs="ray"``), no lease, nothing written. A committed image id whose input now names another file
    (another URI, or another size or modification time of its file) refuses the run, naming the
    first few; ``relabel_changed`` labels them again instead (the old rows are withdrawn through
    commits; committed files are never deleted).

    ``manifest_columns``: the manifest's column names when they are not the defaults
    (``image_column``, ``classes_column``, ``id_column``, ``semantic_column``, ``instance_column``).

    ``inputs``: where a manifest or ``folder:`` tree is read and planned. ``"ray"``: by Ray Data
    (:mod:`irnet_ray.pipeline.inputs`: blocks in the object store; the driver holds an 8-byte hash
    a row and the rows that are not plainly pending); ``"driver"``: with pyarrow in this process
    (:mod:`irnet_ray.data.columnar`; no Ray needed); ``"auto"`` (default): Ray Data for a run,
    the driver for a dry run. Other sources (built-in, VOC, records) are read in the driver.

    ``log`` gets the run's lines: the plan, the actor pool and progress (images done, images/s,
    ETA, every 10 s). Ray Data's own progress output is off unless ``verbose``.
    """
    log = log or (lambda message: None)
    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:12]
    if not isinstance(config, LabelJobConfig):
        raise TypeError(f"config must be a LabelJobConfig, got {type(config).__name__}")
    output = normalize(output_uri)
    models = check_model_pair(cam_model_uri, irn_model_uri, storage_options)
    vocabulary = ClassVocabulary(models.vocabulary)
    with_ray = reads_with_ray(images, inputs, dry_run)
    if with_ray:
        ensure_ray(address=ray_address)
        quiet_ray_data(verbose)  # the set is read and planned by Ray Data: quiet from here on
    image_set = open_image_set(images, vocabulary, storage_options, columns=manifest_columns, with_ray=with_ray,
                               empty_message=_EMPTY)  # fmt: skip
    if dry_run:
        committed, retried = read_committed(output, storage_options)
        plan = image_set.plan(committed, vocabulary.num_classes, "dry-run")
        summary = _plan_summary(output, plan, retried, relabel_changed)
        log(format_plan(summary))
        return summary
    settings = label_settings(config)
    config_id = settings_id(settings)
    job = {"format": of.FORMAT_NAME, "format_version": of.FORMAT_VERSION, "models": models.record(),
           "settings": settings, "settings_id": config_id, "vocabulary": list(models.vocabulary),
           "irnet_ray_version": __version__}  # fmt: skip
    with open_output(output, job, storage_options, overwrite, run_id, _commit_summary(vocabulary.num_classes),
                     lease=lease, allow_local_output_on_cluster=allow_local_output_on_cluster) as (state, committer):
        plan = image_set.plan(committer.committed_table(), vocabulary.num_classes, run_id)
        changed = plan.changed.num_rows
        if changed:
            if not relabel_changed:
                raise cl.JobInputError(_changed_message(output, plan.changed))
            keys = zip(plan.changed.column("image_id").to_pylist(), plan.changed.column("occurrence").to_pylist())
            committer.withdraw(keys)
            plan = image_set.replan(plan, committer.committed_table(), vocabulary.num_classes, run_id)
        input_errors, skipped, to_send, input_rows = plan.errors, plan.skipped, plan.to_send, plan.rows
        pending, expected = plan.send(), plan.expected()
        log(f"labeling {to_send} image(s) into {output} ({skipped} already committed, "
            f"{len(committer.retried)} earlier transient failure(s) retried, "
            f"{len(input_errors)} refused from the listing, {changed} changed file(s) relabeled)")  # fmt: skip
        if input_errors:
            committer.commit({"file": None, "image_ids": [], "errors": input_errors, "inputs": plan.inputs})

        labeling_started = time.perf_counter()
        plan = None
        if to_send:
            ensure_ray(address=ray_address)
            plan = plan_pool(min_actors=config.min_actors, max_actors=config.max_actors,
                             gpus_per_actor=config.gpus_per_actor, cpus_per_actor=config.cpus_per_actor,
                             batch_size=config.batch_size,
                             cpu_tasks={"decode": config.decode_cpus, "write": config.write_cpus})  # fmt: skip
            log(f"{plan.min_actors}..{plan.max_actors} labeling actor(s), {plan.gpus_per_actor:g} GPU and "
                f"{plan.cpus_per_actor:g} CPU each, {plan.batch_size} image(s) per call")  # fmt: skip
            spec = PipelineSpec(
                decode_batch_size=config.decode_batch_size,
                decode_kwargs={"options": storage_options, "max_side": config.max_side, "min_side": int(config.min_side),
                               "max_pixels": int(config.max_pixels), "max_decode_bytes": int(config.max_decode_bytes),
                               "ground_truth": ground_truth if config.evaluate else None},
                actor=LabelActor,
                actor_kwargs={"models": models, "options": storage_options, "settings": settings, "run_id": run_id,
                              "config_id": config_id},
                write_kwargs={"output": output, "options": storage_options, "data_schema": of.LABEL_SCHEMA,
                              "large_columns": LARGE_COLUMNS, "run_id": run_id, "summarize": summarize_rows},
                rows_per_file=config.rows_per_file,
            )  # fmt: skip
            run_pipeline(pending, committer, spec, plan, max_crashes=config.max_crashes, log=log, stage="labeling",
                         total=to_send, verbose=verbose)  # fmt: skip
        labeling_seconds = time.perf_counter() - labeling_started

        totals = _totals(committer.standing, vocabulary.names)
        this_run = {
            "run_id": run_id, "labeled": committer.processed, "errors": committer.errors, "skipped": skipped,
            "repaired_files": committer.repaired, "seconds": time.perf_counter() - started,
            "labeling_seconds": labeling_seconds,
            "images_per_second": (committer.processed / labeling_seconds)
            if committer.processed and labeling_seconds else None,
            "min_actors": config.min_actors, "cpus_per_actor": config.cpus_per_actor,
            "rows_per_file": config.rows_per_file,
            **({"gpus_per_actor": plan.gpus_per_actor, "max_actors": plan.max_actors, "batch_size": plan.batch_size}
               if plan else {}),
        }  # fmt: skip
        runs = dict((state.previous_manifest or {}).get("runs", {}))
        for rid, counts in totals.pop("runs").items():
            runs[rid] = {**runs.get(rid, {}), **counts}
        runs[run_id] = {**runs.get(run_id, {}), **this_run}
        manifest = finish_output(output, committer, expected, storage_options,
                                 {**job, "run_id": run_id, "runs": runs, **totals},
                                 max_error_rate=config.max_error_rate)  # fmt: skip
    summary = {
        "output": output, "run_id": run_id, "images": input_rows, "changed": changed, "labeled": committer.processed,
        "errors": committer.errors, "skipped": skipped, "retried": len(committer.retried),
        "total_labeled": totals["labeled"],
        "total_errors": totals["errors"], "errors_by_reason": totals["errors_by_reason"],
        "images_per_second": this_run["images_per_second"], "metrics": totals["metrics"],
        "files": len(manifest["data_files"]), "seconds": this_run["seconds"], "labeling_seconds": labeling_seconds,
        "timings": totals["timings"],
        "manifest": f"{output}/{cl.MANIFEST}",
    }  # fmt: skip
    return summary  # its lines: format_summary (the CLI prints them on stdout)


def format_summary(summary: dict) -> str:
    """A few lines for people: counts, throughput, output, metrics."""
    rate = summary.get("images_per_second")
    lines = [
        f"labeled {summary['labeled']} image(s), {summary['errors']} error(s), {summary['skipped']} already done"
        + (f"; {rate:.2f} images/s" if rate else ""),
        f"output: {summary['output']} ({summary['total_labeled']} labeled, {summary['total_errors']} errors in "
        f"{summary['files']} data file(s); manifest {summary['manifest']})",
    ]  # fmt: skip
    if summary.get("errors_by_reason"):
        lines.append("errors by reason: " + ", ".join(f"{k} {v}" for k, v in summary["errors_by_reason"].items()))
    metrics = summary.get("metrics")
    if metrics:
        parts = [f"{name} {metrics[key]:.1f}" for key, name in (("miou", "mIoU"), ("ap50", "AP^r_50"), ("ap70", "AP^r_70"))
                 if metrics.get(key) is not None]  # fmt: skip
        lines.append(f"evaluation on {metrics['images']} image(s) with ground truth: " + ", ".join(parts))
        names = {"cam": "CAM", "cam_components": "CAM + components", "boundary_components": "CAM + boundary + components"}
        for key, part in (metrics.get("baselines") or {}).items():
            parts = [f"{name} {part[k]:.1f}" for k, name in (("miou", "mIoU"), ("ap50", "AP^r_50"), ("ap70", "AP^r_70"))
                     if part.get(k) is not None]  # fmt: skip
            lines.append(f"  baseline {names.get(key, key)}: " + ", ".join(parts))
    return "\n".join(lines)
