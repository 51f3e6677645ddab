"""The labeling job's stage definitions on :mod:`irnet_ray.pipeline` (see its stages).

* decode: :func:`irnet_ray.pipeline.stages.decode_images` with :func:`ground_truth` (the
  image's ground truth, when it has some, is read next to it, to score the labels);
* :class:`LabelActor`: loads the CAM + IRNet pair once, labels every image of a batch with ONE
  call of :func:`irnet_ray.inference.label_batch` (size buckets, one backbone call per scale,
  one block-diagonal random walk), brings the masks back to the original size, encodes the row
  (:func:`irnet_ray.data.output_format.encode_label_row`) and scores it against its ground truth;
* write: :func:`irnet_ray.pipeline.stages.write_file` with :func:`summarize_rows` (the score
  records, ground-truth problems and stage timings that the commit records carry).

Every row between the actor and the writer has :data:`STREAM_SCHEMA`: the label columns (null
for an error row) plus the error, score and timing columns.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from irnet_ray.data import output_format as of
from irnet_ray.data.images import row_image
from irnet_ray.data.storage import StorageOptions
from irnet_ray.model_files import ModelPair, load_model_pair
from irnet_ray.pipeline.stages import ERROR_COLUMNS, FINGERPRINT, ModelActor, text_of

from .scores import baseline_predictions, load_ground_truth, pack_ground_truth, score_image, unpack_ground_truth

__all__ = ["STAGES", "STREAM_SCHEMA", "LARGE_COLUMNS", "ground_truth", "LabelActor", "summarize_rows"]

#: Stages timed per image (seconds), summed per commit and in the manifest. ``walk`` and
#: ``instances`` are parts of ``synthesis`` (the batch's share per image).
STAGES = ("decode", "inference", "synthesis", "walk", "instances", "encode", "score", "write")
_ACTOR_STAGES = ("inference", "synthesis", "walk", "instances", "encode", "score")
#: Columns the writer never needs in Python (the masks): dropped before its row summary.
LARGE_COLUMNS = ("semantic_png", "instances")

STREAM_SCHEMA = pa.schema(
    [pa.field(f.name, f.type, nullable=True) for f in of.LABEL_SCHEMA]
    + list(ERROR_COLUMNS)
    + [
        pa.field("score", pa.string()),  # JSON score record ("" when the image has no ground truth)
        pa.field("gt_error", pa.string()),
        FINGERPRINT,
    ]
    + [pa.field(f"t_{stage}", pa.float64()) for stage in STAGES if stage != "write"]
)


def ground_truth(batch: dict, i: int, uri: str, size: tuple[int, int], options: StorageOptions) -> bytes:
    """The packed ground truth of row ``i`` (``b""`` when it has none), checked against the image's size."""
    semantic_uri = batch["semantic_uri"][i] if "semantic_uri" in batch else None
    instance_uri = batch["instance_uri"][i] if "instance_uri" in batch else None
    gt = load_ground_truth(uri, semantic_uri or None, instance_uri or None, options)
    if gt is not None:
        for part in (gt.semantic, gt.instances):
            if part is not None and part.shape != tuple(size):
                raise ValueError(f"ground truth is {part.shape[1]}x{part.shape[0]}, the image {size[1]}x{size[0]}")
    return pack_ground_truth(gt)


class LabelActor(ModelActor):
    """Labels decoded rows with both models, loaded once per actor (see the module doc)."""

    schema = STREAM_SCHEMA

    def __init__(self, models: ModelPair, options: StorageOptions, settings: dict, run_id: str, config_id: str,
                 threads: int, use_gpu: bool, **guard) -> None:  # fmt: skip
        from .config import config_from_settings

        super().__init__(threads, use_gpu, **guard)
        cam, irn = load_model_pair(models, options)
        self.cam, self.irn = cam.to(self.device).eval(), irn.to(self.device).eval()
        self.cam_config, self.synthesis_config = config_from_settings(settings)
        self.models, self.run_id, self.config_id = models, run_id, config_id

    def base_fields(self, row: dict) -> dict:
        return {**super().base_fields(row), "run_id": self.run_id, "gt_error": str(row["gt_error"]),
                "t_decode": float(row["t_decode"])}  # fmt: skip

    def process(self, rows: list[dict]) -> list[dict]:
        from irnet_ray.inference import label_batch

        timings: dict[str, float] = {}
        classes = [self.base_fields(row)["classes"] for row in rows]
        results = label_batch(self.cam, self.irn, [row_image(row) for row in rows], classes, self.cam_config,
                              self.synthesis_config, timings)  # fmt: skip
        share = {stage: timings.get(stage, 0.0) / len(rows) for stage in ("inference", "synthesis", "walk", "instances")}
        return [self._row(row, c, labels, inference, share) for row, c, (labels, inference) in zip(rows, classes, results)]

    def _row(self, row: dict, classes: list[int], labels, inference, share: dict) -> dict:
        timings = dict(share)
        started = time.perf_counter()
        size = (int(row["orig_height"]), int(row["orig_width"]))
        out = {**self.base_fields(row), **of.encode_label_row(
            image_id=str(row["image_id"]), uri=str(row["uri"]), size=size, classes=classes,
            class_names=self.models.vocabulary, semantic=labels.semantic, instance_masks=labels.instances.masks,
            instance_classes=labels.instances.classes, instance_scores=labels.instances.scores,
            run_id=self.run_id, cam_model_id=self.models.cam_id, irn_model_id=self.models.irn_id,
            config_id=self.config_id,
        )}  # fmt: skip
        timings["encode"] = time.perf_counter() - started
        started = time.perf_counter()
        out["score"], out["gt_error"] = "", str(row["gt_error"])
        gt = unpack_ground_truth(row["gt"])
        if gt is not None:
            try:
                semantic = of.resize_nearest(labels.semantic, size)
                masks = of.resize_nearest(labels.instances.masks, size)
                cams = inference.cams
                baselines = baseline_predictions(cams.highres.cpu().numpy(), cams.classes.cpu().numpy(), labels.semantic,
                                                 self.cam_config.eval_background_threshold, size)  # fmt: skip
                record = score_image(len(self.models.vocabulary), semantic, masks, labels.instances.classes,
                                     labels.instances.scores, gt, baselines)  # fmt: skip
                out["score"] = json.dumps(record, separators=(",", ":"))
            except Exception as exc:  # noqa: BLE001 - e.g. ground truth with values outside the classes
                out["gt_error"] = text_of(exc)
        timings["score"] = time.perf_counter() - started + float(row["t_gt"])
        out.update({f"t_{stage}": float(timings.get(stage, 0.0)) for stage in _ACTOR_STAGES})
        return out


def summarize_rows(rows: list[dict], good: list[int]) -> dict:
    """What the commit record of a file adds for labeling: per-image score records, ground-truth
    problems and the summed stage timings of its images (:func:`~irnet_ray.pipeline.stages.write_file`)."""
    meta: dict = {"scores": {}, "gt_errors": [], "timings": dict.fromkeys(STAGES, 0.0), "timed_images": len(good)}
    for i in good:
        r = rows[i]
        for stage in STAGES[:-1]:
            meta["timings"][stage] += float(r[f"t_{stage}"] or 0.0)
        if r["score"]:
            meta["scores"][r["image_id"]] = json.loads(r["score"])
        if r["gt_error"]:
            meta["gt_errors"].append({"image_id": r["image_id"], "message": r["gt_error"]})
    return meta
