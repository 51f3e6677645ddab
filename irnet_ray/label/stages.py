"""The three stages of the labeling pipeline, as Ray Data calls them on batches.

1. :func:`decode_for_labeling` (CPU tasks): read + decode the image, keep its original size,
   downscale it to the labeling size; read its ground truth when it has some. Never raises.
2. :class:`LabelActor` (an actor pool; GPU when the actor has one): loads both models once,
   labels each image with :func:`irnet_ray.inference.label_image` (one backbone pass for the
   CAM head and IRNet), brings the masks back to the original size and encodes the output row
   (:func:`irnet_ray.data.output_format.encode_label_row`), scores it against its ground
   truth. Image bytes stop here. A failure of one image becomes an error row.
3. :func:`write_label_file` (CPU tasks, one call per ``rows_per_file`` rows): writes the label
   rows as one Parquet file named by its image ids and returns one small row (``meta``, JSON)
   that tells the driver what to commit: the file, its image ids, the batch's error rows, the
   images' score records and the stage timings.

Every row between stages 2 and 3 has :data:`STREAM_SCHEMA`: the label columns (null for an
error row) plus the error, score and timing columns.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa

from irnet_ray.data import output_format as of
from irnet_ray.data import ray_datasets as rd
from irnet_ray.data.parquet_files import content_name, write_table
from irnet_ray.data.storage import StorageOptions, join

from .models import LabelModels, load_models
from .output import DATA
from .scores import load_ground_truth, pack_ground_truth, score_image, unpack_ground_truth

__all__ = ["STAGES", "STREAM_SCHEMA", "decode_for_labeling", "LabelActor", "write_label_file"]

#: Stages timed per image (seconds), summed per commit and in the manifest.
STAGES = ("decode", "inference", "synthesis", "encode", "score", "write")
_ACTOR_STAGES = ("inference", "synthesis", "encode", "score")

STREAM_SCHEMA = pa.schema(
    [pa.field(f.name, f.type, nullable=True) for f in of.LABEL_SCHEMA]
    + [
        pa.field("error_stage", pa.string()),
        pa.field("error_reason", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("score", pa.string()),  # JSON score record ("" when the image has no ground truth)
        pa.field("gt_error", pa.string()),
    ]
    + [pa.field(f"t_{stage}", pa.float64()) for stage in STAGES if stage != "write"]
)

_DECODED = ("image_id", "uri", "classes", "image", "height", "width", "orig_height", "orig_width", "error", "gt",
            "gt_error", "t_decode", "t_gt")  # fmt: skip


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def decode_for_labeling(
    batch: dict, options: StorageOptions, max_side: int | None, min_side: int, max_pixels: int, evaluate: bool
) -> dict[str, np.ndarray]:
    """Record rows -> decoded rows (:data:`_DECODED`); a failure sets ``error`` (never raises)."""
    rows = []
    for i in range(len(batch["image_id"])):
        started = time.perf_counter()
        uri = str(batch["uri"][i])
        row = {"image_id": str(batch["image_id"][i]), "uri": uri, "classes": rd.class_ids(batch["classes"][i]), "gt": b"",
               "gt_error": "", **rd.decode_keeping_size(uri, options, max_side, max_pixels=max_pixels,
                                                        min_side=min_side)}  # fmt: skip
        row["t_decode"] = time.perf_counter() - started
        started = time.perf_counter()
        if evaluate and not row["error"]:
            try:
                row["gt"] = _ground_truth(batch, i, uri, (row["orig_height"], row["orig_width"]), options)
            except Exception as exc:  # noqa: BLE001 - the image is still labeled, just not scored
                row["gt_error"] = _text(exc)
        row["t_gt"] = time.perf_counter() - started  # counted as scoring time
        rows.append(row)
    return {name: rd.object_column([r[name] for r in rows]) for name in _DECODED}


def _ground_truth(batch: dict, i: int, uri: str, size: tuple[int, int], options: StorageOptions) -> bytes:
    semantic_uri = batch["semantic_uri"][i] if "semantic_uri" in batch else None
    instance_uri = batch["instance_uri"][i] if "instance_uri" in batch else None
    gt = load_ground_truth(uri, semantic_uri or None, instance_uri or None, options)
    if gt is not None:
        for part in (gt.semantic, gt.instances):
            if part is not None and part.shape != tuple(size):
                raise ValueError(f"ground truth is {part.shape[1]}x{part.shape[0]}, the image {size[1]}x{size[0]}")
    return pack_ground_truth(gt)


class LabelActor:
    """Labels decoded rows with both models, loaded once per actor (see the module doc).

    ``debug`` (tests only): ``{"kill_at_image": n, "kill_marker": path}`` ends this process
    abruptly when it starts its n-th image, once (the marker file remembers it).
    """

    def __init__(self, models: LabelModels, options: StorageOptions, settings: dict, run_id: str, config_id: str,
                 threads: int, use_gpu: bool, debug: dict | None = None) -> None:  # fmt: skip
        import torch

        from .config import config_from_settings

        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        cam, irn = load_models(models, options)
        self.cam, self.irn = cam.to(self.device).eval(), irn.to(self.device).eval()
        self.cam_config, self.synthesis_config = config_from_settings(settings)
        self.models, self.run_id, self.config_id = models, run_id, config_id
        self.debug = dict(debug or {})
        self.images_started = 0

    def _maybe_fail_for_test(self) -> None:
        marker = self.debug.get("kill_marker")
        if marker and self.images_started == int(self.debug.get("kill_at_image", -1)) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)

    def __call__(self, batch: dict) -> pa.Table:
        rows = []
        for i in range(len(batch["image_id"])):
            row = {name: batch[name][i] for name in _DECODED}
            base = {"image_id": str(row["image_id"]), "uri": str(row["uri"]), "classes": rd.class_ids(row["classes"]),
                    "run_id": self.run_id, "gt_error": str(row["gt_error"]), "t_decode": float(row["t_decode"])}  # fmt: skip
            if row["error"]:
                reason, _, message = str(row["error"]).partition(": ")
                rows.append({**base, "error_stage": "decode", "error_reason": reason, "error_message": message})
                continue
            self.images_started += 1
            self._maybe_fail_for_test()
            try:
                rows.append({**base, **self._label(row, base["classes"])})
            except Exception as exc:  # noqa: BLE001 - recorded per image, the batch goes on
                rows.append({**base, "error_stage": "label", "error_reason": "label_failed",
                             "error_message": f"{type(exc).__name__}: {_text(exc)}"})  # fmt: skip
        return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)

    def _label(self, row: dict, classes: list[int]) -> dict:
        from irnet_ray.inference import label_image

        timings: dict[str, float] = {}
        image = rd.row_image(row)
        labels, inference = label_image(self.cam, self.irn, image, classes, self.cam_config, self.synthesis_config,
                                        timings)  # fmt: skip
        started = time.perf_counter()
        size = (int(row["orig_height"]), int(row["orig_width"]))
        out = of.encode_label_row(
            image_id=str(row["image_id"]), uri=str(row["uri"]), size=size, classes=classes,
            class_names=self.models.vocabulary, semantic=labels.semantic, instance_masks=labels.instances.masks,
            instance_classes=labels.instances.classes, instance_scores=labels.instances.scores,
            run_id=self.run_id, cam_model_id=self.models.cam_id, irn_model_id=self.models.irn_id,
            config_id=self.config_id,
        )  # fmt: skip
        timings["encode"] = time.perf_counter() - started
        started = time.perf_counter()
        out["score"], out["gt_error"] = "", str(row["gt_error"])
        gt = unpack_ground_truth(row["gt"])
        if gt is not None:
            try:
                semantic = of.resize_nearest(labels.semantic, size)
                masks = of.resize_nearest(labels.instances.masks, size)
                record = score_image(len(self.models.vocabulary), semantic, masks, labels.instances.classes,
                                     labels.instances.scores, gt, self._baselines(inference, labels, size))  # fmt: skip
                out["score"] = json.dumps(record, separators=(",", ":"))
            except Exception as exc:  # noqa: BLE001 - e.g. ground truth with values outside the classes
                out["gt_error"] = _text(exc)
        timings["score"] = time.perf_counter() - started + float(row["t_gt"])
        out.update({f"t_{stage}": float(timings.get(stage, 0.0)) for stage in _ACTOR_STAGES})
        return out


    def _baselines(self, inference, labels, size: tuple[int, int]) -> dict[str, tuple]:
        """The paper's comparison rows for this image (:data:`~.scores.BASELINES`), at ``size``."""
        from irnet_ray.models.cam import cam_semantic_labels
        from irnet_ray.synthesis import cam_connected_components

        cams = inference.cams
        highres, classes = cams.highres.cpu().numpy(), cams.classes.cpu().numpy()
        cam_labels = cam_semantic_labels(cams.highres, cams.classes, self.cam_config.eval_background_threshold)
        cam_labels = cam_labels.cpu().numpy()
        out = {"cam": (of.resize_nearest(cam_labels, size), None, None, None)}
        for name, semantic in (("cam_components", cam_labels), ("boundary_components", labels.semantic)):
            parts = cam_connected_components(semantic, highres, classes)
            out[name] = (None, of.resize_nearest(parts.masks, size), parts.classes, parts.scores)
        return out


def write_label_file(table: pa.Table, output: str, options: StorageOptions) -> pa.Table:
    """Write the label rows of ``table`` (:data:`STREAM_SCHEMA`) as one Parquet file under
    ``{output}/data/``; returns one row with a ``meta`` JSON string for the driver to commit."""
    table = table.cast(STREAM_SCHEMA) if table.schema != STREAM_SCHEMA else table
    rows = table.drop_columns(["semantic_png", "instances"]).to_pylist()  # small columns only
    good = [i for i, r in enumerate(rows) if r["error_reason"] is None]
    meta: dict = {"file": None, "image_ids": [rows[i]["image_id"] for i in good], "errors": [], "scores": {},
                  "gt_errors": [], "timings": dict.fromkeys(STAGES, 0.0), "timed_images": len(good)}  # fmt: skip
    for r in rows:
        if r["error_reason"] is not None:
            meta["errors"].append(of.error_row(
                image_id=r["image_id"], uri=r["uri"], classes=r["classes"] or [], stage=r["error_stage"],
                reason=r["error_reason"], message=r["error_message"] or "", run_id=r["run_id"],
            ))  # fmt: skip
            continue
        for stage in STAGES[:-1]:
            meta["timings"][stage] += float(r[f"t_{stage}"] or 0.0)
        if r["score"]:
            meta["scores"][r["image_id"]] = json.loads(r["score"])
        if r["gt_error"]:
            meta["gt_errors"].append({"image_id": r["image_id"], "message": r["gt_error"]})
    if good:
        labels = table.take(pa.array(good, pa.int64())).select(list(of.LABEL_COLUMNS)).cast(of.LABEL_SCHEMA)
        started = time.perf_counter()
        written = write_table(join(output, DATA), content_name("part", meta["image_ids"]), labels, options)
        meta["timings"]["write"] = time.perf_counter() - started
        name = written["uri"].rsplit("/", 1)[-1]
        meta["file"] = {"path": f"{DATA}/{name}", "rows": written["rows"], "bytes": written["bytes"]}
    return pa.table({"meta": pa.array([json.dumps(meta, separators=(",", ":"))], pa.string())})
