"""The labeling job's driver: checks, the Ray Data pipeline, the single committer, the manifest.

``label_images`` runs in the driver process (a laptop, the head node, or a ``ray job submit``
entrypoint). It checks every user input before any work starts (models, image set, output
folder), writes the per-image errors it can find in the listing itself, streams the pending
images through the pipeline of :mod:`irnet_ray.label.stages` and commits each written file as it
arrives (:mod:`irnet_ray.label.output` has the protocol), then writes the errors table and the
manifest.
"""

from __future__ import annotations

import collections
import json
import os
import time
import uuid
from typing import Callable, Sequence

import ray

from irnet_ray import __version__
from irnet_ray.data import output_format as of
from irnet_ray.data.sources import ClassVocabulary, EmptyImageSetError, ImageRecord, load_records
from irnet_ray.data.storage import StorageOptions, normalize

from . import output as out
from .config import LabelJobConfig, label_settings, settings_id
from .models import LabelModels, check_models
from .scores import ScoreBoard
from .stages import STAGES, LabelActor, decode_for_labeling, write_label_file

__all__ = ["label_images", "LabelJobFailed", "LabelJobInterrupted", "format_summary"]

_MAX_LISTED_GT_ERRORS = 20
_MAX_INPUT_BLOCKS = 2000
_PAUSE_ENV = "IRNET_RAY_TEST_PAUSE_AFTER_COMMITS"


class LabelJobFailed(RuntimeError):
    """The pipeline failed while running; what was committed stays, a rerun continues."""


class LabelJobInterrupted(RuntimeError):
    """Raised by the ``stop_after_commits`` test hook: the job stops as if killed."""


def _records(images: str | Sequence[ImageRecord], vocabulary: ClassVocabulary,
             options: StorageOptions) -> list[ImageRecord]:  # fmt: skip
    if isinstance(images, str):
        # A repeated image id becomes a per-image error (duplicate_id) instead of refusing the
        # whole set, where the source can list one (manifests, folder trees). Sources whose ids
        # are unique by construction (built-in, VOC) take no such option: a TypeError raised
        # before any reading, and a real one raises again on the plain call.
        try:
            records, _ = load_records(images, options, vocabulary=vocabulary, allow_duplicate_ids=True)
        except TypeError:
            records, _ = load_records(images, options, vocabulary=vocabulary)
    else:
        records = list(images)
        if not all(isinstance(r, ImageRecord) for r in records):
            raise TypeError("images must be an image-set spec (str) or a sequence of ImageRecord")
    if not records:
        raise EmptyImageSetError("the image set is empty: nothing to label")
    return records


def _plan(records: list[ImageRecord], committed: set, num_classes: int, run_id: str):
    """(pending records, error rows found in the listing, number already committed)."""
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


def _use_gpu(config: LabelJobConfig) -> float:
    """GPUs per actor: the setting, or 1 when the cluster has GPUs and the setting is ``None``."""
    if config.gpus_per_actor is not None:
        return float(config.gpus_per_actor)
    return 1.0 if float(ray.cluster_resources().get("GPU", 0)) > 0 else 0.0


def _check_cpus(config: LabelJobConfig) -> None:
    """Refuse a pool whose minimum takes every CPU: Ray Data would start the actors and then
    wait forever for decode / write tasks that can never be scheduled (ray.md, 2-core trap)."""
    total = float(ray.cluster_resources().get("CPU", 0))
    needed = int(config.min_actors) * float(config.cpus_per_actor) + float(config.decode_cpus) + float(config.write_cpus)
    if total > 0 and needed > total:
        raise out.LabelJobError(
            f"{config.min_actors} actor(s) x {config.cpus_per_actor} CPU plus one decode ({config.decode_cpus}) and one "
            f"write ({config.write_cpus}) task need {needed:g} CPUs, the cluster has {total:g}: the job would hang. "
            "Lower --min-actors or --cpus-per-actor (fractions are fine), or add CPUs"
        )


def _dataset(pending: list[ImageRecord], models: LabelModels, output: str, config: LabelJobConfig, settings: dict,
             config_id: str, run_id: str, options: StorageOptions, gpus: float, debug: dict):  # fmt: skip
    rows = [r.to_row() for r in pending]
    blocks = max(1, min(_MAX_INPUT_BLOCKS, -(-len(rows) // int(config.decode_batch_size))))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_for_labeling, batch_size=int(config.decode_batch_size), batch_format="numpy",
        num_cpus=float(config.decode_cpus),
        fn_kwargs={"options": options, "max_side": config.max_side, "min_side": int(config.min_side),
                   "max_pixels": int(config.max_pixels), "evaluate": bool(config.evaluate)},
    )  # fmt: skip
    ds = ds.map_batches(
        LabelActor, batch_size=int(config.batch_size), batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=int(config.min_actors), max_size=int(config.max_actors)),
        num_gpus=gpus, num_cpus=float(config.cpus_per_actor),
        fn_constructor_kwargs={"models": models, "options": options, "settings": settings, "run_id": run_id,
                               "config_id": config_id, "threads": max(1, round(float(config.cpus_per_actor))),
                               "use_gpu": gpus > 0, "debug": debug},
    )  # fmt: skip
    # Ray Data bundles the actors' output blocks up to rows_per_file rows per writer call, so
    # files hold rows_per_file rows (fewer only at the end of a bundle), not one per block. Not
    # repartition(strict=True): its tasks take a whole CPU each, which waits behind the actor
    # pool on small clusters and holds every commit back until labeling ends.
    return ds.map_batches(
        write_label_file, batch_size=int(config.rows_per_file), batch_format="pyarrow",
        num_cpus=float(config.write_cpus), fn_kwargs={"output": output, "options": options},
    )  # fmt: skip


class _Committer:
    """The driver's commit log: refuses to commit a key twice, repairs files that would."""

    def __init__(self, output: str, state: out.OutputState, num_classes: int, options: StorageOptions,
                 run_id: str) -> None:  # fmt: skip
        self.output, self.options, self.run_id, self.num_classes = output, options, run_id, num_classes
        self.commits = list(state.commits)
        self.sequence = state.next_sequence
        self.labeled = self.errors = self.repaired = 0
        # Transient failures of earlier runs are tried again: withdrawn first (a commit of its
        # own), so a rerun stopped half-way still knows they are not done.
        self.retried = out.transient_errors(self.commits)
        if self.retried:
            self._write({"file": None, "image_ids": [], "errors": [], "withdrawn": [list(k) for k in self.retried]})
        self.committed: set[tuple[str, int]] = set()
        for commit in out.effective_commits(self.commits):
            self.committed |= out.commit_keys(commit)

    def _write(self, fields: dict) -> dict:
        record = {"sequence": self.sequence, "run_id": self.run_id,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "time": time.time(), **fields}  # fmt: skip
        out.write_commit(self.output, record, self.options)
        self.sequence += 1
        self.commits.append(record)
        return record

    @property
    def standing(self) -> list[dict]:
        """The commits with withdrawn errors left out (what the output holds)."""
        return out.effective_commits(self.commits)

    def commit(self, meta: dict) -> dict:
        file, ids = meta.get("file"), [str(i) for i in meta.get("image_ids", [])]
        counts = collections.Counter(ids)
        again = {i for i in ids if (i, 0) in self.committed or counts[i] > 1}
        if again and file:
            # A retried task delivered rows that are committed already: drop them from the file.
            file = out.drop_rows(self.output, file["path"], {i for i in again if (i, 0) in self.committed},
                                 self.options)  # fmt: skip
            self.repaired += 1
            ids = [i for i in dict.fromkeys(ids) if (i, 0) not in self.committed]
            if file is None:
                ids = []
        new_keys = {(i, 0) for i in ids}
        errors = []
        for e in meta.get("errors", []):
            key = (str(e["image_id"]), int(e["occurrence"]))
            if key not in self.committed and key not in new_keys:
                errors.append(e)
                new_keys.add(key)
        board = ScoreBoard(self.num_classes)
        for image_id in ids:
            board.add(meta.get("scores", {}).get(image_id))
        record = self._write({
            "file": file, "image_ids": ids, "errors": errors,
            "scores": board.compact() if board.images else None,
            "gt_errors": [g for g in meta.get("gt_errors", []) if g["image_id"] in set(ids)],
            "timings": meta.get("timings", {}), "timed_images": int(meta.get("timed_images", 0)),
        })  # fmt: skip
        self.committed |= new_keys
        self.labeled += len(ids)
        self.errors += len(errors)
        return record


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
    ray_address: str | None = None,
    debug: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Label ``images`` (an image-set spec as :func:`~irnet_ray.data.sources.load_records`
    takes, or records) with the CAM model at ``cam_model_uri`` (``None``: the one IRNet was
    trained with) and IRNet at ``irn_model_uri``, into ``output_uri`` (local or ``s3://``).

    Returns a summary: ``output``, ``run_id``, ``images`` (input rows), ``labeled`` / ``errors``
    (this run), ``skipped`` (committed before), ``total_labeled`` / ``total_errors`` /
    ``errors_by_reason`` (the whole output), ``images_per_second`` (this run's labeling),
    ``metrics`` (``None`` without ground truth), ``files``, ``seconds``. User mistakes raise
    before any work starts: :class:`~irnet_ray.label.output.LabelJobError`, ``ValueError``
    (including the image-set errors of :mod:`irnet_ray.data.sources`) or a
    :class:`~irnet_ray.data.storage.StorageError`.

    ``debug`` (tests only): ``stop_after_commits`` (raise :class:`LabelJobInterrupted` after that
    many commits of this run), ``pause_after_commits`` (sleep there, to be killed from outside;
    also read from ``IRNET_RAY_TEST_PAUSE_AFTER_COMMITS`` so a test can pause a CLI process),
    ``kill_at_image`` + ``kill_marker`` (see ``LabelActor``).
    """
    log = log or (lambda message: None)
    started = time.perf_counter()
    debug = dict(debug or {})
    if os.environ.get(_PAUSE_ENV):
        debug.setdefault("pause_after_commits", int(os.environ[_PAUSE_ENV]))
    run_id = uuid.uuid4().hex[:12]
    if not isinstance(config, LabelJobConfig):
        raise TypeError(f"config must be a LabelJobConfig, got {type(config).__name__}")
    output = normalize(output_uri)
    models = check_models(cam_model_uri, irn_model_uri, storage_options)
    vocabulary = ClassVocabulary(models.vocabulary)
    records = _records(images, vocabulary, storage_options)
    settings = label_settings(config)
    config_id = settings_id(settings)
    job = {"format": of.FORMAT_NAME, "format_version": of.FORMAT_VERSION, "models": models.record(),
           "settings": settings, "settings_id": config_id, "vocabulary": list(models.vocabulary),
           "irnet_ray_version": __version__}  # fmt: skip
    state = out.prepare_output(output, job, storage_options, overwrite)
    committer = _Committer(output, state, vocabulary.num_classes, storage_options, run_id)
    pending, input_errors, skipped = _plan(records, committer.committed, vocabulary.num_classes, run_id)
    log(f"labeling {len(pending)} image(s) into {output} ({skipped} already committed, "
        f"{len(committer.retried)} earlier transient failure(s) retried, "
        f"{len(input_errors)} refused from the listing)")  # fmt: skip
    if input_errors:
        committer.commit({"file": None, "image_ids": [], "errors": input_errors})
    stop_after = debug.pop("stop_after_commits", None)
    pause_after = debug.pop("pause_after_commits", None)

    labeling_started = time.perf_counter()
    gpus = 0.0
    if pending:
        from irnet_ray.train.ray_train import ensure_ray

        ensure_ray(address=ray_address)
        gpus = _use_gpu(config)
        _check_cpus(config)
        ds = _dataset(pending, models, output, config, settings, config_id, run_id, storage_options, gpus, debug)
        commits_this_run = 0
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            for batch in batches:
                for meta in batch.column("meta").to_pylist():
                    committer.commit(json.loads(meta))
                    commits_this_run += 1
                    if stop_after is not None and commits_this_run >= int(stop_after):
                        raise LabelJobInterrupted(f"stopped after {commits_this_run} commit(s) (test hook)")
                    if pause_after is not None and commits_this_run >= int(pause_after):
                        log(f"paused after {commits_this_run} commit(s) (test hook)")
                        time.sleep(3600)
        except (LabelJobInterrupted, out.LabelJobError):
            raise
        except Exception as exc:
            raise LabelJobFailed(
                f"the labeling pipeline failed after committing {committer.labeled} image(s) and {committer.errors} "
                f"error(s) in this run ({type(exc).__name__}: {' '.join(str(exc).split())[:500]}); "
                f"{output} stays unfinished: rerun the same job to label the rest"
            ) from exc
        finally:
            # Stop the pipeline now, not when the iterator is garbage collected: a stopped job
            # must not keep writing files next to a rerun.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    labeling_seconds = time.perf_counter() - labeling_started

    expected = {(r.image_id, 0) for r in pending} | {(e["image_id"], e["occurrence"]) for e in input_errors}
    lost = sorted(expected - committer.committed)
    if lost:
        raise LabelJobFailed(
            f"{len(lost)} image(s) never came back from the pipeline (e.g. {[k[0] for k in lost[:3]]}); "
            f"{output} stays unfinished: run the same job again to label them"
        )
    standing = committer.standing
    errors_file = out.write_errors_table(output, standing, storage_options)
    data_files = out.committed_files(standing)
    totals = _totals(standing, vocabulary.names)
    this_run = {
        "run_id": run_id, "labeled": committer.labeled, "errors": committer.errors, "skipped": skipped,
        "repaired_files": committer.repaired, "seconds": time.perf_counter() - started,
        "labeling_seconds": labeling_seconds,
        "images_per_second": (committer.labeled / labeling_seconds) if committer.labeled and labeling_seconds else None,
        "gpus_per_actor": gpus, "min_actors": config.min_actors, "max_actors": config.max_actors,
        "cpus_per_actor": config.cpus_per_actor, "batch_size": config.batch_size,
        "rows_per_file": config.rows_per_file,
    }  # fmt: skip
    runs = dict((state.previous_manifest or {}).get("runs", {}))
    for rid, counts in totals.pop("runs").items():
        runs[rid] = {**runs.get(rid, {}), **counts}
    runs[run_id] = {**runs.get(run_id, {}), **this_run}
    manifest = {
        **job, "complete": True, "run_id": run_id,
        "images": totals["labeled"] + totals["errors"], "rows": totals["labeled"],
        "data_files": data_files, "errors_file": errors_file,
        "commits": len(committer.commits), "runs": runs, **totals,
    }  # fmt: skip
    out.write_manifest(output, manifest, storage_options)
    out.delete_orphans(output, [f["path"] for f in data_files] + [errors_file["path"]], storage_options)
    summary = {
        "output": output, "run_id": run_id, "images": len(records), "labeled": committer.labeled,
        "errors": committer.errors, "skipped": skipped, "retried": len(committer.retried),
        "total_labeled": totals["labeled"],
        "total_errors": totals["errors"], "errors_by_reason": totals["errors_by_reason"],
        "images_per_second": this_run["images_per_second"], "metrics": totals["metrics"],
        "files": len(data_files), "seconds": this_run["seconds"], "labeling_seconds": labeling_seconds,
        "timings": totals["timings"],
        "manifest": f"{output}/{out.MANIFEST}",
    }  # fmt: skip
    log(format_summary(summary))
    return summary


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
