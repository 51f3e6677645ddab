"""Relation mining (Sec. 4.1) as a batch-inference job: a thin definition on :mod:`irnet_ray.pipeline`.

decode tasks -> :class:`CamActor` pool (multi-scale + flip CAMs of a whole batch with
:func:`irnet_ray.inference.infer_cams_batch`; GPUs when the cluster has them) -> :func:`crf_stage`
CPU tasks (confident regions refined by a dense CRF, :func:`irnet_ray.relations.ir_label_map`,
brought back to the original size) -> writer -> the driver's commit log.

The output folder follows :mod:`irnet_ray.pipeline.commit_log` (the labeling job's protocol):
``data/part-*.parquet`` of :data:`IR_LABEL_SCHEMA` rows, one commit record per file, per-image
errors in ``errors/``, ``_manifest.json`` last. IRNet training reads exactly the files that the
manifest lists (:func:`irnet_ray.data.ray_datasets.ir_label_dataset`). A rerun with the same
CAM model and settings mines only what is not committed (and returns at once when everything is).
"""

from __future__ import annotations

import time
import uuid
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from irnet_ray import __version__
from irnet_ray.config import (
    CamInferenceConfig,
    MiningOptions,
    RelationConfig,
    config_to_dict,
    settings_id,
)
from irnet_ray.data.decode import encode_png
from irnet_ray.data.images import class_ids, row_image
from irnet_ray.data.output_format import resize_nearest
from irnet_ray.data.ray_datasets import IR_FORMAT_NAME, IR_LABEL_SCHEMA
from irnet_ray.data.sources import ClassVocabulary, ImageRecord
from irnet_ray.data.storage import StorageOptions, normalize
from irnet_ray.model_files import CamModelRef, assert_no_secrets, check_cam_model, load_checked_cam
from irnet_ray.pipeline import commit_log as cl
from irnet_ray.pipeline.attempts import DEFAULT_MAX_CRASHES, guarded
from irnet_ray.pipeline.inputs import open_image_set, reads_with_ray
from irnet_ray.pipeline.progress import quiet_ray_data
from irnet_ray.pipeline.resources import plan_pool
from irnet_ray.pipeline.run import CpuStage, LeaseConfig, PipelineSpec, finish_output, open_output, run_pipeline
from irnet_ray.pipeline.stages import ERROR_COLUMNS, FINGERPRINT, ModelActor, error_fields, text_of

__all__ = ["MiningOptions", "mine_relations_job", "CamActor", "crf_stage", "MANIFEST"]

MANIFEST = cl.MANIFEST
FORMAT_VERSION = 1
_CAM_STREAM = pa.schema([
    pa.field("image_id", pa.string()), pa.field("uri", pa.string()), pa.field("classes", pa.list_(pa.int64())),
    pa.field("image", pa.binary()), pa.field("height", pa.int64()), pa.field("width", pa.int64()),
    pa.field("orig_height", pa.int64()), pa.field("orig_width", pa.int64()),
    pa.field("cams", pa.binary()),  # (K, height, width) float16, the CAMs of the image's classes
    *ERROR_COLUMNS, FINGERPRINT,
])  # fmt: skip
_IR_STREAM = pa.schema([*IR_LABEL_SCHEMA, *ERROR_COLUMNS, FINGERPRINT])


class CamActor(ModelActor):
    """Loads the CAM model once; adds the full-resolution CAMs of each image (float16 bytes)."""

    schema = _CAM_STREAM
    failure = ("cam", "label_failed")

    def __init__(self, cam: CamModelRef, options: StorageOptions, cam_config: dict, threads: int, use_gpu: bool,
                 **guard):  # fmt: skip
        super().__init__(threads, use_gpu, **guard)
        self.model = load_checked_cam(cam, options).to(self.device).eval()
        self.config = CamInferenceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cam_config.items()})

    def process(self, rows: list[dict]) -> list[dict]:
        import torch

        from irnet_ray.inference import infer_cams_batch

        classes = [class_ids(row["classes"]) for row in rows]
        outputs = infer_cams_batch(self.model, [row_image(row) for row in rows], classes, self.config)
        return [{
            **self.base_fields(row), "image": row["image"], "height": int(row["height"]), "width": int(row["width"]),
            "orig_height": int(row["orig_height"]), "orig_width": int(row["orig_width"]),
            "cams": out.highres.to("cpu", torch.float16).numpy().tobytes(),
        } for row, out in zip(rows, outputs)]  # fmt: skip


def crf_stage(table: pa.Table, relations: dict, ledger=None, max_crashes: int = DEFAULT_MAX_CRASHES) -> pa.Table:
    """CAMs -> CRF-refined IR label map at the original size, PNG-encoded; a failure of one image
    becomes its error row (reason ``mining_failed``; ``crashed_worker`` when it keeps ending the
    process, see :mod:`irnet_ray.pipeline.attempts`)."""
    config = RelationConfig(**relations)
    rows = table.to_pylist()

    def crashed(i: int, starts: int) -> dict:
        message = f"the dense CRF of this image ended its worker process {starts} time(s)"
        return {**_ir_row(rows[i]), **error_fields("crf", "crashed_worker", message)}

    keys = [row["image_id"] for row in rows]
    out = guarded(ledger, max_crashes, keys, lambda indices: [_crf_row(rows[i], config) for i in indices], crashed)
    return pa.Table.from_pylist(out, schema=_IR_STREAM)


def _ir_row(row: dict) -> dict:
    fields = ("image_id", "uri", "classes", "error_stage", "error_reason", "error_message")
    return {**{name: row[name] for name in fields}, "ir_labels_png": None, "fingerprint": row.get("fingerprint") or ""}


def _crf_row(row: dict, config: RelationConfig) -> dict:
    from irnet_ray.relations import ir_label_map

    result = _ir_row(row)
    if row["error_reason"] is not None:
        return result
    try:
        height, width = int(row["height"]), int(row["width"])
        cams = np.frombuffer(row["cams"], dtype=np.float16).reshape(len(row["classes"]), height, width)
        labels = ir_label_map(row_image(row), cams.astype(np.float32), np.asarray(row["classes"]), config)
        labels = resize_nearest(labels, (int(row["orig_height"]), int(row["orig_width"])))
        result["ir_labels_png"] = encode_png(labels)
    except Exception as exc:  # noqa: BLE001 - recorded per image
        result.update(error_fields("crf", "mining_failed", f"{type(exc).__name__}: {text_of(exc)}"))
    return result


def mine_relations_job(
    records: str | Sequence[ImageRecord],
    cam_model_uri: str,
    output_uri: str,
    *,
    cam_inference: CamInferenceConfig = CamInferenceConfig(),
    relations: RelationConfig = RelationConfig(),
    options: MiningOptions = MiningOptions(),
    storage_options: StorageOptions = StorageOptions(),
    overwrite: bool = False,
    lease: LeaseConfig = LeaseConfig(),
    allow_local_output_on_cluster: bool = False,
    vocabulary: ClassVocabulary | None = None,
    manifest_columns: Mapping[str, str] | None = None,
    inputs: str = "auto",
    ray_address: str | None = None,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> dict:
    """Mine IR labels for ``records`` (records, or an image-set spec as
    :func:`~irnet_ray.data.sources.load_records` takes) with the CAM model at ``cam_model_uri``
    into ``output_uri``. A spec's class names resolve with ``vocabulary`` (default: the CAM
    model's); ``manifest_columns`` names a manifest's columns; ``inputs`` says where a manifest or
    ``folder:`` tree is read and planned (``"auto"``/``"ray"``: Ray Data, the driver holding 8 bytes
    a row; ``"driver"``: pyarrow in this process; see :mod:`irnet_ray.pipeline.inputs`). ``log``
    gets progress lines (images done, images/s, ETA); Ray Data's own are off unless ``verbose``.

    Returns a summary (``output``, ``images``, ``mined``, ``errors`` (``[{image_id, error}]`` with
    ``error`` = ``"<reason>: <message>"``), ``files``, ``seconds``, ``already_complete``).
    User mistakes raise before any work starts (``ValueError`` subclasses), among them a second
    run on an output that a running job holds (``lease``, see :mod:`irnet_ray.pipeline.lease`)
    and a local output on a multi-node cluster (unless ``allow_local_output_on_cluster``).
    """
    started = time.perf_counter()
    empty = "no image records: the relation-mining set is empty"
    if not isinstance(records, str):
        records = list(records)
        if not records:
            raise ValueError(empty)
    cam = check_cam_model(cam_model_uri, storage_options)
    output = normalize(output_uri)
    settings = {"cam_inference": config_to_dict(cam_inference), "relations": config_to_dict(relations),
                "max_side": options.max_side, "min_side": options.min_side, "max_pixels": options.max_pixels,
                "max_decode_bytes": options.max_decode_bytes}  # fmt: skip
    assert_no_secrets(settings, "mining settings")
    job = {"format": IR_FORMAT_NAME, "format_version": FORMAT_VERSION, "models": cam.record(), "settings": settings,
           "settings_id": settings_id(settings), "settings_name": "mining", "vocabulary": list(cam.vocabulary),
           "irnet_ray_version": __version__}  # fmt: skip
    run_id = uuid.uuid4().hex[:12]
    with_ray = reads_with_ray(records, inputs)
    if with_ray:
        from irnet_ray.train.ray_train import ensure_ray

        ensure_ray(address=ray_address)
        quiet_ray_data(verbose)
    image_set = open_image_set(records, vocabulary or ClassVocabulary(tuple(cam.vocabulary)), storage_options,
                               columns=manifest_columns, with_ray=with_ray, empty_message=empty)  # fmt: skip
    with open_output(output, job, storage_options, overwrite, run_id, lease=lease,
                     allow_local_output_on_cluster=allow_local_output_on_cluster) as (state, committer):
        planned = image_set.plan(committer.committed_table(), len(cam.vocabulary), run_id)
        if planned.changed.num_rows:
            examples = "; ".join(f"{r['image_id']}: {r['old_uri']} -> {r['uri']}"
                                 for r in planned.changed.slice(0, 3).to_pylist())  # fmt: skip
            raise cl.JobInputError(
                f"{planned.changed.num_rows} image id(s) mined into {output} now name another file (e.g. {examples}); "
                "pass --overwrite (overwrite=True) to mine the set again, or choose another output folder"
            )
        pending, input_errors, skipped = planned.send(), planned.errors, planned.skipped
        if input_errors:
            committer.commit({"file": None, "image_ids": [], "errors": input_errors, "inputs": planned.inputs})
        already_complete = state.previous_manifest is not None and not planned.to_send and not input_errors
        plan = None
        if planned.to_send:
            from irnet_ray.train.ray_train import ensure_ray

            ensure_ray(address=ray_address)
            gpus = None if options.use_gpu is None else (float(options.gpus_per_actor) if options.use_gpu else 0.0)
            if gpus is None:
                from irnet_ray.pipeline.resources import cluster_gpus

                gpus = float(options.gpus_per_actor) if cluster_gpus() > 0 else 0.0
            plan = plan_pool(min_actors=options.min_actors, max_actors=options.max_actors, gpus_per_actor=gpus,
                             cpus_per_actor=options.cpus_per_actor, batch_size=options.batch_size,
                             cpu_tasks={"decode": options.decode_cpus, "crf": options.crf_cpus,
                                        "write": options.write_cpus})  # fmt: skip
            spec = PipelineSpec(
                decode_batch_size=options.decode_batch_size,
                decode_kwargs={"options": storage_options, "max_side": options.max_side, "min_side": int(options.min_side),
                               "max_pixels": int(options.max_pixels), "max_decode_bytes": int(options.max_decode_bytes)},
                actor=CamActor,
                actor_kwargs={"cam": cam, "options": storage_options, "cam_config": config_to_dict(cam_inference)},
                cpu_stage=CpuStage(crf_stage, {"relations": config_to_dict(relations)}, float(options.crf_cpus),
                                   plan.batch_size),
                write_kwargs={"output": output, "options": storage_options, "data_schema": IR_LABEL_SCHEMA,
                              "large_columns": ("ir_labels_png",), "run_id": run_id},
                rows_per_file=options.rows_per_file,
            )  # fmt: skip
            run_pipeline(pending, committer, spec, plan, max_crashes=options.max_crashes, stage="mining",
                         total=planned.to_send, log=log or (lambda message: None), verbose=verbose)  # fmt: skip
        expected = planned.expected()
        standing = committer.standing
        errors = [{"image_id": e["image_id"], "error": f"{e['reason']}: {e['message']}"}
                  for c in standing for e in c.get("errors", [])]  # fmt: skip
        mined = sum(len(c.get("image_ids", [])) for c in standing)
        if mined == 0 and not committer.retried:
            from irnet_ray.data.images import summarize_errors

            raise ValueError(f"relation mining produced no IR labels: every image failed ({summarize_errors(errors)})")
        summary = {"output": output, "images": planned.rows, "mined": mined, "errors": errors,
                   "mined_this_run": committer.processed, "skipped": skipped,
                   "use_gpu": bool(plan and plan.use_gpu), "seconds": time.perf_counter() - started}  # fmt: skip
        manifest = finish_output(output, committer, expected, storage_options,
                                 {**job, "kind": "ir_labels", "run_id": run_id, "summary": summary},
                                 max_error_rate=options.max_error_rate)  # fmt: skip
    return {**summary, "files": [f["path"] for f in manifest["data_files"]], "already_complete": already_complete}

