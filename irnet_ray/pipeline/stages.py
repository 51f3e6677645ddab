"""The stages every batch-inference job is made of, as Ray Data calls them on batches.

1. :func:`decode_images` (CPU tasks): read + decode each image, keep its original size,
   downscale it to the working size; optionally read its ground truth. Never raises: a failure
   becomes the row's ``error`` (``"<reason>: <message>"``).
2. :class:`ModelActor` (an actor pool; GPU when the actor has one): the base of the jobs' model
   actors. It loads the models once, turns decode failures into error rows, lets the job check
   each row, runs the job's :meth:`ModelActor.process` on every good row of the batch in ONE
   call (the batched GPU path), and isolates a failing image by retrying the batch's rows one
   by one, so one bad image becomes one error row, never a failed batch.
3. an optional CPU stage of the job (relation mining's dense CRF);
4. :func:`write_file` (CPU tasks, one call per ``rows_per_file`` rows): writes the good rows as
   one Parquet file named by its image ids and returns one small row (``meta``, JSON) that tells
   the driver what to commit: the file, its image ids, the error rows, and the job's summary of
   the rows (scores, timings).

Rows between the actor and the writer carry the job's data columns plus :data:`ERROR_COLUMNS`
(all null for a good row).
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import pyarrow as pa

from irnet_ray.data import output_format as of
from irnet_ray.data.images import class_ids, decode_keeping_size, object_column
from irnet_ray.data.parquet_files import content_name, write_table
from irnet_ray.data.storage import StorageOptions, join

from .attempts import DEFAULT_MAX_CRASHES, guarded
from .commit_log import DATA

__all__ = ["DECODED_COLUMNS", "FINGERPRINT", "ERROR_COLUMNS", "error_fields", "decode_images", "ModelActor", "write_file", "text_of"]

#: Columns of a decoded row (:func:`decode_images`).
DECODED_COLUMNS = ("image_id", "uri", "classes", "image", "height", "width", "orig_height", "orig_width", "error",
                   "gt", "gt_error", "t_decode", "t_gt", "fingerprint")  # fmt: skip
#: The input file's fingerprint rides along every row to the commit record (``""``: none).
FINGERPRINT = pa.field("fingerprint", pa.string())
#: Error columns of every row after the actor (null on a good row).
ERROR_COLUMNS = (
    pa.field("error_stage", pa.string()),
    pa.field("error_reason", pa.string()),
    pa.field("error_message", pa.string()),
)


def text_of(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def error_fields(stage: str, reason: str, message: str) -> dict:
    return {"error_stage": stage, "error_reason": reason, "error_message": message}


#: ``ground_truth(batch, i, uri, (height, width), options) -> bytes`` of a job that scores.
GroundTruth = Callable[[dict, int, str, tuple, StorageOptions], bytes]


def decode_images(
    batch: dict,
    options: StorageOptions,
    max_side: int | None,
    min_side: int,
    max_pixels: int,
    max_decode_bytes: int | None = None,
    ground_truth: GroundTruth | None = None,
    ledger=None,
    max_crashes: int = DEFAULT_MAX_CRASHES,
) -> dict[str, np.ndarray]:
    """Record rows -> decoded rows (:data:`DECODED_COLUMNS`); a failure sets ``error``.

    Images are decoded one at a time, so a task holds at most ``max_decode_bytes`` for decoding
    (refused from the header above that, see :func:`irnet_ray.data.decode.decode_memory_bytes`)
    plus the batch's downscaled images: the task's memory reservation. An image that keeps
    killing the decoding process ends as a ``crashed_worker`` row (:mod:`.attempts`)."""

    def decode(indices: list[int]) -> list[dict]:
        return [_decode_row(batch, i, options, max_side, min_side, max_pixels, max_decode_bytes, ground_truth)
                for i in indices]  # fmt: skip

    def crashed(i: int, starts: int) -> dict:
        return {**_undecoded_row(batch, i),
                "error": f"crashed_worker: decoding this image ended its worker process {starts} time(s)"}  # fmt: skip

    rows = guarded(ledger, max_crashes, [str(v) for v in batch["image_id"]], decode, crashed)
    return {name: object_column([r[name] for r in rows]) for name in DECODED_COLUMNS}


def _undecoded_row(batch: dict, i: int) -> dict:
    return {"image_id": str(batch["image_id"][i]), "uri": str(batch["uri"][i]), "classes": class_ids(batch["classes"][i]),
            "gt": b"", "gt_error": "", "image": b"", "height": 0, "width": 0, "orig_height": 0, "orig_width": 0,
            "error": "", "t_decode": 0.0, "t_gt": 0.0,
            "fingerprint": str(batch["fingerprint"][i] or "") if "fingerprint" in batch else ""}  # fmt: skip


def _decode_row(batch: dict, i: int, options, max_side, min_side, max_pixels, max_decode_bytes, ground_truth) -> dict:
    started = time.perf_counter()
    row = _undecoded_row(batch, i)
    uri = row["uri"]
    row.update(decode_keeping_size(uri, options, max_side, max_pixels=max_pixels, min_side=min_side,
                                   max_decode_bytes=max_decode_bytes))  # fmt: skip
    row["t_decode"] = time.perf_counter() - started
    started = time.perf_counter()
    if ground_truth is not None and not row["error"]:
        try:
            row["gt"] = ground_truth(batch, i, uri, (row["orig_height"], row["orig_width"]), options)
        except Exception as exc:  # noqa: BLE001 - the image is still processed, just not scored
            row["gt_error"] = text_of(exc)
    row["t_gt"] = time.perf_counter() - started
    return row


class ModelActor:
    """Base of the model actor pools (see the module doc).

    A job's actor sets :attr:`schema` (its output row schema, error columns included), loads its
    models in ``__init__`` after calling ``super().__init__``, and implements

    * :meth:`check` (optional): ``None`` or ``(reason, message)`` for a decoded row that must not
      reach the models (e.g. a class outside the model's vocabulary);
    * :meth:`process`: the output rows of a list of good decoded rows, one per row, in order.
      Images of one call go through the models together.
    """

    schema: pa.Schema
    #: Stage and reason recorded when :meth:`process` raises for one image.
    failure = ("label", "label_failed")

    def __init__(self, threads: int, use_gpu: bool, ledger=None, max_crashes: int = DEFAULT_MAX_CRASHES) -> None:
        import torch

        from irnet_ray.inference import resolve_device

        torch.set_num_threads(max(1, int(threads)))
        self.device = resolve_device("cuda" if use_gpu else "cpu")
        self.ledger, self.max_crashes = ledger, int(max_crashes)

    def check(self, row: dict) -> tuple[str, str] | None:
        return None

    def process(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def base_fields(self, row: dict) -> dict:
        """Columns every output row carries (the decoded row's identity)."""
        return {"image_id": str(row["image_id"]), "uri": str(row["uri"]), "classes": class_ids(row["classes"]),
                "fingerprint": str(row.get("fingerprint") or "")}

    def __call__(self, batch: dict) -> pa.Table:
        rows = [{name: batch[name][i] for name in batch} for i in range(len(batch["image_id"]))]
        out: list[dict | None] = [None] * len(rows)
        good: list[int] = []
        for i, row in enumerate(rows):
            if row["error"]:
                reason, _, message = str(row["error"]).partition(": ")
                out[i] = {**self.base_fields(row), **error_fields("decode", reason, message)}
                continue
            problem = self.check(row)
            if problem is not None:
                out[i] = {**self.base_fields(row), **error_fields("input", *problem)}
                continue
            good.append(i)
        def crashed(j: int, starts: int) -> dict:
            message = f"labeling this image ended the actor's process {starts} time(s)"
            return {**self.base_fields(rows[good[j]]), **error_fields(self.failure[0], "crashed_worker", message)}

        results = guarded(self.ledger, self.max_crashes, [str(rows[i]["image_id"]) for i in good],
                          lambda indices: self._process_isolating_failures([rows[good[j]] for j in indices]),
                          crashed)  # fmt: skip
        for i, result in zip(good, results):
            out[i] = result
        return pa.Table.from_pylist(out, schema=self.schema)

    def _process_isolating_failures(self, rows: list[dict]) -> list[dict]:
        if not rows:
            return []
        try:
            return self.process(rows)
        except Exception as exc:  # noqa: BLE001 - find the image(s) that fail, keep the others
            if len(rows) == 1:
                return [{**self.base_fields(rows[0]), **self.failure_fields(exc)}]
        return [result for row in rows for result in self._process_isolating_failures([row])]

    def failure_fields(self, exc: BaseException) -> dict:
        from irnet_ray.inference import ImageTooLargeForDevice

        if isinstance(exc, ImageTooLargeForDevice):
            return error_fields(self.failure[0], "out_of_memory", text_of(exc))
        return error_fields(self.failure[0], self.failure[1], f"{type(exc).__name__}: {text_of(exc)}")


#: ``summarize(rows, good_indices) -> extra meta fields`` (rows without their large columns).
SummarizeRows = Callable[[list, list], dict]


def write_file(
    table: pa.Table,
    output: str,
    options: StorageOptions,
    data_schema: pa.Schema,
    large_columns: tuple[str, ...],
    run_id: str,
    summarize: SummarizeRows | None = None,
) -> pa.Table:
    """Write the good rows of ``table`` (columns of ``data_schema``) as one Parquet file under
    ``{output}/data/``; returns one row with a ``meta`` JSON string for the driver to commit."""
    small = table.drop_columns([c for c in large_columns if c in table.column_names]).to_pylist()
    good = [i for i, r in enumerate(small) if r["error_reason"] is None]
    meta: dict = {"file": None, "image_ids": [small[i]["image_id"] for i in good], "errors": []}
    for r in small:
        if r["error_reason"] is not None:
            meta["errors"].append(of.error_row(
                image_id=r["image_id"], uri=r["uri"], classes=r["classes"] or [], stage=r["error_stage"],
                reason=r["error_reason"], message=r["error_message"] or "", run_id=run_id,
            ))  # fmt: skip
    # What each row was made from (URI and file fingerprint): a rerun compares them with its input.
    meta["inputs"] = [[r["image_id"], 0, r["uri"], r.get("fingerprint") or ""] for r in small]
    if summarize is not None:
        meta.update(summarize(small, good))
    if good:
        data = table.take(pa.array(good, pa.int64())).select(list(data_schema.names)).cast(data_schema)
        started = time.perf_counter()
        written = write_table(join(output, DATA), content_name("part", meta["image_ids"]), data, options)
        meta.setdefault("timings", {})["write"] = time.perf_counter() - started
        name = written["uri"].rsplit("/", 1)[-1]
        meta["file"] = {"path": f"{DATA}/{name}", "rows": written["rows"], "bytes": written["bytes"]}
    return pa.table({"meta": pa.array([json.dumps(meta, separators=(",", ":"))], pa.string())})
