"""Relation mining (Sec. 4.1) as a Ray Data job: images -> CAMs -> dense CRF -> IR label Parquet.

Stages, each sized for what it does:

1. decode (CPU tasks, ``decode_cpus`` each): read and decode the image, downscale it so its long
   side is at most ``max_side`` (``None``: as is), keep the original size;
2. CAM inference (an actor pool that loads the CAM model once per actor; GPUs when the cluster
   has them, CPU otherwise): multi-scale + flip CAMs at the decoded resolution
   (:func:`irnet_ray.inference.infer_cams`, the code the labeling job runs too);
3. CRF (CPU tasks, ``crf_cpus`` each; pydensecrf is CPU-only, so GPUs never wait for it):
   :func:`irnet_ray.relations.ir_label_map`, brought back to the original size (nearest) and
   PNG-encoded;
4. write (CPU tasks): files of ``rows_per_file`` rows, named by the image ids they hold, with
   the columns of :data:`irnet_ray.data.ray_datasets.IR_LABEL_COLUMNS`.

The driver commits the run by writing ``_manifest.json`` (files, row counts, per-image errors,
settings, CAM model) after every file is written; :func:`irnet_ray.data.ray_datasets.ir_label_dataset`
reads the files the manifest lists and refuses a folder whose mining never finished. A rerun on
the same folder returns at once if it finished with the same settings, and otherwise clears the
folder's earlier (partial) output and mines again; a folder that holds anything else is refused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import ray

from irnet_ray.config import CamInferenceConfig, RelationConfig, config_to_dict
from irnet_ray.data import ray_datasets as rd
from irnet_ray.data.decode import encode_png
from irnet_ray.data.output_format import resize_nearest
from irnet_ray.data.parquet_files import content_name, write_table
from irnet_ray.data.sources import ImageRecord
from irnet_ray.data.storage import (
    StorageOptions,
    delete_file,
    exists,
    join,
    list_files,
    normalize,
    read_bytes,
    write_bytes,
)
from irnet_ray.train import checkpoint as ckpt

__all__ = ["MiningOptions", "mine_relations_job", "MANIFEST", "STARTED"]

MANIFEST = rd.IR_LABEL_MANIFEST
STARTED = rd.IR_LABEL_STARTED


@dataclasses.dataclass(frozen=True)
class MiningOptions:
    """Resources and sizes of the mining pipeline (not part of the method's settings)."""

    max_side: int | None = None
    min_side: int = 16  # one cell of the stride-16 CAM; smaller images are recorded as too_small
    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float = 1.0  # used only when the cluster has GPUs
    cpus_per_actor: float = 1.0
    decode_cpus: float = rd.DEFAULT_DECODE_CPUS
    crf_cpus: float = 1.0
    batch_size: int = 4
    rows_per_file: int = 256
    use_gpu: bool | None = None  # None: when the cluster has GPUs

    def __post_init__(self) -> None:
        if self.max_side is not None and int(self.max_side) < 16:
            raise ValueError(f"MiningOptions.max_side must be >= 16 (or None), got {self.max_side}")
        if not 1 <= int(self.min_actors) <= int(self.max_actors):
            raise ValueError(f"MiningOptions needs 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        for name in ("cpus_per_actor", "decode_cpus", "crf_cpus"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"MiningOptions.{name} must be > 0, got {getattr(self, name)}")
        if int(self.batch_size) < 1 or int(self.rows_per_file) < 1:
            raise ValueError("MiningOptions.batch_size and rows_per_file must be >= 1")


# --------------------------------------------------------------------------------------
# stages (plain functions and one actor class; Ray calls them on numpy dict batches)


def _column(batch: dict, name: str) -> list:
    return list(batch[name])


def _rows_to_batch(rows: list[dict], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: rd.object_column([r[name] for r in rows]) for name in names}


_DECODED = ("image_id", "uri", "classes", "image", "height", "width", "orig_height", "orig_width", "error")


def decode_for_mining(batch: dict, options: StorageOptions, max_side: int | None,
                      min_side: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Records -> decoded (possibly downscaled) images with their original size; never raises."""
    rows = []
    for image_id, uri, classes in zip(_column(batch, "image_id"), _column(batch, "uri"), _column(batch, "classes")):
        rows.append({"image_id": str(image_id), "uri": str(uri),
                     "classes": rd.class_ids(classes),
                     **rd.decode_keeping_size(str(uri), options, max_side, min_side=min_side)})  # fmt: skip
    return _rows_to_batch(rows, _DECODED)


class CamActor:
    """Loads the CAM model once; adds full-resolution CAMs (float16 bytes, (K, H, W)) to each row."""

    def __init__(self, cam_model_uri: str, options: StorageOptions, cam_config: dict, threads: int, device: str):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        model, meta = ckpt.load_cam_model(cam_model_uri, options)
        self.model = model.to(self.device).eval()
        self.num_classes = len(meta["vocabulary"])
        self.config = CamInferenceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cam_config.items()})

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        import torch

        from irnet_ray.inference import infer_cams

        out = {name: list(batch[name]) for name in _DECODED}
        cams_column = []
        for i, error in enumerate(out["error"]):
            cams_column.append(b"")
            if error:
                continue
            classes = rd.class_ids(out["classes"][i])
            if classes and max(classes) > self.num_classes:
                out["error"][i] = (f"bad_classes: class id {max(classes)} is outside the CAM model's "
                                   f"vocabulary (1..{self.num_classes})")  # fmt: skip
                out["image"][i] = b""
                continue
            image = rd.row_image({k: out[k][i] for k in ("image", "height", "width")})
            cams = infer_cams(self.model, image, classes, self.config).highres
            cams_column[-1] = cams.to("cpu", torch.float16).numpy().tobytes()
        result = {name: rd.object_column(out[name]) for name in _DECODED}
        result["cams"] = rd.object_column(cams_column)
        return result


def crf_batch(batch: dict, relations: dict) -> dict[str, np.ndarray]:
    """CAMs -> CRF-refined IR label map at the original size, PNG-encoded; never raises."""
    from irnet_ray.relations import ir_label_map

    config = RelationConfig(**relations)
    rows = []
    for i in range(len(batch["image_id"])):
        row = {"image_id": str(batch["image_id"][i]), "uri": str(batch["uri"][i]),
               "classes": rd.class_ids(batch["classes"][i]),
               "ir_labels_png": b"", "error": str(batch["error"][i])}  # fmt: skip
        if not row["error"]:
            try:
                height, width = int(batch["height"][i]), int(batch["width"][i])
                image = rd.row_image({"image": batch["image"][i], "height": height, "width": width})
                cams = np.frombuffer(batch["cams"][i], dtype=np.float16).reshape(len(row["classes"]), height, width)
                labels = ir_label_map(image, cams.astype(np.float32), np.asarray(row["classes"]), config)
                size = (int(batch["orig_height"][i]), int(batch["orig_width"][i]))
                labels = resize_nearest(labels, size)
                row["ir_labels_png"] = encode_png(labels)
            except Exception as exc:  # noqa: BLE001 - recorded per image
                row["error"] = f"mining_error: {' '.join(str(exc).split()) or type(exc).__name__}"
        rows.append(row)
    return _rows_to_batch(rows, ("image_id", "uri", "classes", "ir_labels_png", "error"))


def write_batch(batch: dict, folder: str, options: StorageOptions) -> dict[str, np.ndarray]:
    """Write the good rows of a batch as one Parquet file; returns one small row per image."""
    ids = [str(v) for v in batch["image_id"]]
    errors = [str(v) for v in batch["error"]]
    good = [i for i, e in enumerate(errors) if not e]
    file_uri = ""
    if good:
        table = pa.table({
            "image_id": pa.array([ids[i] for i in good], pa.string()),
            "uri": pa.array([str(batch["uri"][i]) for i in good], pa.string()),
            "classes": pa.array([rd.class_ids(batch["classes"][i]) for i in good],
                                pa.list_(pa.int64())),
            "ir_labels_png": pa.array([bytes(batch["ir_labels_png"][i]) for i in good], pa.binary()),
        })  # fmt: skip
        file_uri = write_table(folder, content_name("part", [ids[i] for i in good]), table, options)["uri"]
    files = [file_uri if not e else "" for e in errors]
    return {"image_id": rd.object_column(ids), "error": rd.object_column(errors), "file": rd.object_column(files)}


# --------------------------------------------------------------------------------------
# driver


def _cluster_has_gpus() -> bool:
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def _check_cpus(options: MiningOptions) -> None:
    """Refuse a pool whose minimum takes every CPU: Ray Data would start the actors and wait
    forever for decode / CRF / write tasks that can never be scheduled (2-core trap, ray.md)."""
    total = float(ray.cluster_resources().get("CPU", 0))
    needed = int(options.min_actors) * float(options.cpus_per_actor) + float(options.crf_cpus) + float(options.decode_cpus)
    if total > 0 and needed > total:
        raise ValueError(
            f"{options.min_actors} CAM actor(s) x {options.cpus_per_actor} CPU plus one CRF task ({options.crf_cpus}) "
            f"and one decode task ({options.decode_cpus}) need {needed:g} CPUs, the cluster has {total:g}: the job "
            f"would hang; lower --min-actors, --cpus-per-actor or --crf-cpus (fractions are fine), or add CPUs"
        )


def _prepare_folder(output: str, settings: dict, options: StorageOptions, overwrite: bool) -> dict | None:
    """The finished manifest of an identical earlier run, or None after clearing the folder."""
    manifest_uri, started_uri = join(output, MANIFEST), join(output, STARTED)
    if exists(manifest_uri, options) and not overwrite:
        manifest = json.loads(read_bytes(manifest_uri, options))
        if manifest.get("settings") == settings:
            return manifest
        raise ValueError(
            f"{output} holds IR labels mined with other settings; use another output folder or --overwrite"
        )
    if exists(output, options):
        files = list_files(output, options)
        if files and not overwrite and not exists(started_uri, options):
            raise ValueError(
                f"output folder {output} is not empty and is not an irnet-ray relation-mining output "
                f"({len(files)} file(s), e.g. {files[0]}); choose an empty or new folder"
            )
        for uri in files:  # an unfinished (or, with overwrite, any) earlier run
            delete_file(uri, options)
    write_bytes(started_uri, json.dumps({"settings": settings}, sort_keys=True).encode(), options)
    return None


def mine_relations_job(
    records: Sequence[ImageRecord],
    cam_model_uri: str,
    output_uri: str,
    *,
    cam_inference: CamInferenceConfig = CamInferenceConfig(),
    relations: RelationConfig = RelationConfig(),
    options: MiningOptions = MiningOptions(),
    storage_options: StorageOptions = StorageOptions(),
    overwrite: bool = False,
) -> dict:
    """Mine IR labels for ``records`` with the CAM model at ``cam_model_uri`` into ``output_uri``.

    Returns a summary (``output``, ``images``, ``mined``, ``errors``, ``files``, ``seconds``,
    ``already_complete``). ``storage_options`` reach the images, the model and the output.
    """
    from irnet_ray.train.ray_train import ensure_ray

    started = time.perf_counter()
    records = list(records)
    if not records:
        raise ValueError("no image records: the relation-mining set is empty")
    _, cam_meta = ckpt.load_model(cam_model_uri, storage_options)  # a user mistake fails here, early
    if cam_meta["kind"] != "cam":
        raise ValueError(f"{cam_model_uri} holds a {cam_meta['kind']!r} model, expected a CAM model")
    output_uri = normalize(output_uri)
    settings = {
        "cam_model": cam_model_uri,
        "cam_model_created": cam_meta.get("created"),
        "cam_inference": config_to_dict(cam_inference),
        "relations": config_to_dict(relations),
        "max_side": options.max_side,
        "min_side": options.min_side,
        "images": len(records),
        "fingerprint": rd.records_fingerprint(records),
    }
    ckpt.assert_no_secrets(settings, "mining settings")
    done = _prepare_folder(output_uri, settings, storage_options, overwrite)
    if done is not None:
        return {**done["summary"], "already_complete": True, "seconds": time.perf_counter() - started}

    ensure_ray()
    _check_cpus(options)
    use_gpu = _cluster_has_gpus() if options.use_gpu is None else bool(options.use_gpu)
    ds = rd.records_dataset(records)
    ds = ds.map_batches(decode_for_mining, batch_size=options.batch_size, batch_format="numpy",
                        num_cpus=options.decode_cpus,
                        fn_kwargs={"options": storage_options, "max_side": options.max_side,
                                   "min_side": options.min_side})  # fmt: skip
    ds = ds.map_batches(
        CamActor, batch_size=options.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=int(options.min_actors), max_size=int(options.max_actors)),
        num_gpus=float(options.gpus_per_actor) if use_gpu else 0, num_cpus=float(options.cpus_per_actor),
        fn_constructor_kwargs={"cam_model_uri": cam_model_uri, "options": storage_options,
                               "cam_config": config_to_dict(cam_inference),
                               "threads": max(1, round(float(options.cpus_per_actor))),
                               "device": "cuda" if use_gpu else "cpu"},
    )  # fmt: skip
    ds = ds.map_batches(crf_batch, batch_size=options.batch_size, batch_format="numpy", num_cpus=options.crf_cpus,
                        fn_kwargs={"relations": config_to_dict(relations)})  # fmt: skip
    ds = ds.map_batches(write_batch, batch_size=int(options.rows_per_file), batch_format="numpy",
                        num_cpus=options.decode_cpus,
                        fn_kwargs={"folder": output_uri, "options": storage_options})  # fmt: skip

    outcome: dict[str, tuple[str, str]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for image_id, error, file_uri in zip(batch["image_id"], batch["error"], batch["file"]):
            outcome[str(image_id)] = (str(error), str(file_uri))
    missing = [r.image_id for r in records if r.image_id not in outcome]
    if missing or len(outcome) != len({r.image_id for r in records}):
        raise RuntimeError(f"relation mining lost {len(missing)} image(s) (e.g. {missing[:3]}); nothing was committed")
    errors = [{"image_id": i, "error": e} for i, (e, _) in outcome.items() if e]
    files = sorted({f for e, f in outcome.values() if f})
    mined = len(outcome) - len(errors)
    if mined == 0:
        raise ValueError(f"relation mining produced no IR labels: every image failed ({rd.summarize_errors(errors)})")
    summary = {"output": output_uri, "images": len(records), "mined": mined, "errors": errors, "files": files,
               "use_gpu": use_gpu, "seconds": time.perf_counter() - started}  # fmt: skip
    manifest = {"kind": "ir_labels", "settings": settings, "files": files, "rows": mined, "summary": summary,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    write_bytes(join(output_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode(), storage_options)
    return {**summary, "already_complete": False}
