"""Training inputs as Ray Datasets: records -> decoded (and downscaled) image rows.

This is the one module of :mod:`irnet_ray.data` that imports Ray; the per-image helpers it
uses (reading, decoding, downscaling, the row layout) are in :mod:`irnet_ray.data.images`.

Row layout of decoded datasets (what :func:`decode_batch` returns, one row per record)

=============  ==========================================================================
``image_id``   the record's id
``image``      the RGB pixels as raw bytes of a C-contiguous (H, W, 3) uint8 array
               (``b""`` when decoding failed); :func:`~irnet_ray.data.images.row_image` turns it back into an array
``height``     H (0 on failure)
``width``      W (0 on failure)
``classes``    the record's class ids (list of ints)
``error``      ``""``, or ``"<reason>: <message>"`` when the image could not be used
``labels``     IR label datasets only: raw bytes of the (H, W) uint8 IR label map, resized
               with the image (nearest neighbour)
=============  ==========================================================================

Why bytes + shape rather than an (H, W, 3) tensor column: images of one data set have
different sizes and a failed row has no image at all. Ray Data 2.60 stores ragged arrays as a
variable-shaped tensor extension type, but a block whose images happen to share one shape
becomes a fixed-shape tensor column, and an empty placeholder for a failed row is another
shape again; mixing those across blocks is where tensor extension types have been fragile.
A binary column plus two integer columns is plain Arrow: it concatenates, spills, and
round-trips through Parquet the same way in every version.

Failures never raise: a missing object, an unreadable or undecodable file, a bad IR label map
becomes a row with ``error`` set, so a training job can count and name them and carry on.
``reason`` is one of :data:`irnet_ray.data.decode.DECODE_REASONS` or ``missing``,
``access_denied``, ``unreachable``, ``storage_error``, ``bad_uri``, ``bad_labels``,
``label_size_mismatch``, ``error``.

IR label Parquet (written by the relation-mining job, read by IRNet training): one row per
image with columns :data:`IR_LABEL_COLUMNS`: ``image_id`` (string), ``uri`` (string: the image,
as in :class:`~irnet_ray.data.sources.ImageRecord`), ``classes`` (list of int) and
``ir_labels_png`` (binary: :func:`irnet_ray.data.decode.encode_png` of the (H, W) IR label map
at the image's full resolution; 0 background, 1..C classes, 255 ignore). IRNet training reads
only this table and decodes the image in the same map, so no join is needed.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import ray

from .decode import decode_png
from .images import class_ids, downscale, error_text, load_image, object_column
from .sources import ImageRecord
from .storage import StorageNotFound, StorageOptions, exists, join, read_bytes, resolve

__all__ = [
    "IR_LABEL_COLUMNS",
    "DECODED_COLUMNS",
    "DEFAULT_DECODE_CPUS",
    "records_dataset",
    "decode_batch",
    "decode_records",
    "ir_label_dataset",
    "decode_ir_batch",
    "decode_ir_labels",
    "check_ir_label_schema",
]

IR_LABEL_COLUMNS = ("image_id", "uri", "classes", "ir_labels_png")
IR_LABEL_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()), pa.field("uri", pa.string()), pa.field("classes", pa.list_(pa.int64())),
    pa.field("ir_labels_png", pa.binary()),
])  # fmt: skip
#: The ``format`` of a relation-mining output's job record (irnet_ray.pipeline.commit_log).
IR_FORMAT_NAME = "irnet-ray-ir-labels"
#: Written by the relation-mining job when every row is committed; lists the output's files.
IR_LABEL_MANIFEST = "_manifest.json"
#: Written by the relation-mining job first: a folder with it and no manifest is unfinished.
IR_LABEL_JOB = "_job.json"
DECODED_COLUMNS = ("image_id", "image", "height", "width", "classes", "error")
#: CPUs reserved by each decode task: small, so decoding never starves training workers on a
#: 2-core machine (and many decode tasks can run next to them on a big one).
DEFAULT_DECODE_CPUS = 0.25
DEFAULT_DECODE_BATCH = 16


# --------------------------------------------------------------------------------------
# batches


def _column(batch: Any, name: str) -> list:
    """A batch column as a Python list, for numpy dict batches and pandas frames alike."""
    values = batch[name]
    if hasattr(values, "tolist") and not isinstance(values, np.ndarray):
        values = values.tolist()  # pandas Series
    return list(values)


def _finish(rows: list[dict], with_labels: bool) -> dict[str, np.ndarray]:
    names = DECODED_COLUMNS + (("labels",) if with_labels else ())
    out: dict[str, np.ndarray] = {}
    for name in names:
        values = [r[name] for r in rows]
        if name in ("height", "width"):
            out[name] = np.asarray(values, dtype=np.int64)
        elif name in ("image", "labels", "classes"):
            out[name] = object_column(values)
        else:
            out[name] = np.asarray(values, dtype=object)
    return out


def _failed(image_id: str, classes: list[int], error: str, with_labels: bool) -> dict:
    row = {"image_id": image_id, "image": b"", "height": 0, "width": 0, "classes": classes, "error": error}
    if with_labels:
        row["labels"] = b""
    return row


def decode_batch(
    batch: Any, options: StorageOptions = StorageOptions(), max_side: int | None = None, max_pixels: int = 50_000_000
) -> dict[str, np.ndarray]:
    """``map_batches`` function: record rows (``image_id``, ``uri``, ``classes``) -> decoded rows.

    Accepts numpy dict batches or pandas frames; returns a numpy dict batch (module docstring).
    Never raises for a bad image: the row carries ``error`` instead.
    """
    rows = []
    for image_id, uri, classes in zip(_column(batch, "image_id"), _column(batch, "uri"), _column(batch, "classes")):
        image_id, classes = str(image_id), class_ids(classes)
        try:
            image = downscale(load_image(str(uri), options, max_pixels), max_side)
        except Exception as exc:  # noqa: BLE001 - recorded per image, never fatal
            rows.append(_failed(image_id, classes, error_text(exc), False))
            continue
        rows.append({
            "image_id": image_id, "image": image.tobytes(), "height": image.shape[0], "width": image.shape[1],
            "classes": classes, "error": "",
        })  # fmt: skip
    return _finish(rows, with_labels=False)


def decode_ir_batch(
    batch: Any, options: StorageOptions = StorageOptions(), max_side: int | None = None, max_pixels: int = 50_000_000
) -> dict[str, np.ndarray]:
    """``map_batches`` function: IR label rows (:data:`IR_LABEL_COLUMNS`) -> decoded rows with
    ``labels``. The label map must have the image's size; both are downscaled together."""
    rows = []
    columns = [_column(batch, name) for name in IR_LABEL_COLUMNS]
    for image_id, uri, classes, png in zip(*columns):
        image_id, classes = str(image_id), class_ids(classes)
        try:
            image = load_image(str(uri), options, max_pixels)
        except Exception as exc:  # noqa: BLE001
            rows.append(_failed(image_id, classes, error_text(exc), True))
            continue
        try:
            if png is None or len(png) == 0:
                raise ValueError("no IR label map stored for this image")
            labels = decode_png(bytes(png))
        except Exception as exc:  # noqa: BLE001
            rows.append(_failed(image_id, classes, f"bad_labels: {' '.join(str(exc).split())}", True))
            continue
        if labels.shape != image.shape[:2]:
            message = f"IR label map is {labels.shape[1]}x{labels.shape[0]}, image is {image.shape[1]}x{image.shape[0]}"
            rows.append(_failed(image_id, classes, f"label_size_mismatch: {message}", True))
            continue
        image, labels = downscale(image, max_side), downscale(labels, max_side, nearest=True)
        rows.append({
            "image_id": image_id, "image": image.tobytes(), "height": image.shape[0], "width": image.shape[1],
            "classes": classes, "error": "", "labels": labels.tobytes(),
        })  # fmt: skip
    return _finish(rows, with_labels=True)


# --------------------------------------------------------------------------------------
# datasets


def records_dataset(records: Sequence[ImageRecord]) -> "ray.data.Dataset":
    """A Ray Dataset with one row per record (:meth:`ImageRecord.to_row`)."""
    records = list(records)
    if not records:
        raise ValueError("no image records: the training set is empty")
    return ray.data.from_items([r.to_row() for r in records])


def decode_records(
    records: Sequence[ImageRecord] | "ray.data.Dataset",
    options: StorageOptions = StorageOptions(),
    *,
    max_side: int | None = None,
    num_cpus: float = DEFAULT_DECODE_CPUS,
    batch_size: int = DEFAULT_DECODE_BATCH,
) -> "ray.data.Dataset":
    """Records (or a records dataset) -> decoded rows (lazy; decode runs in CPU tasks)."""
    ds = records if isinstance(records, ray.data.Dataset) else records_dataset(records)
    return ds.map_batches(
        decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"options": options, "max_side": max_side},
    )  # fmt: skip


def ir_label_dataset(uri: str | Iterable[str], options: StorageOptions = StorageOptions()) -> "ray.data.Dataset":
    """The IR label Parquet file(s) at ``uri`` (a file or a folder; local or ``s3://``).

    Raises :class:`~irnet_ray.data.storage.StorageNotFound` when nothing is there and
    ``ValueError`` when a column of :data:`IR_LABEL_COLUMNS` is missing.
    """
    uris = [uri] if isinstance(uri, str) else list(uri)
    if not uris:
        raise ValueError("no IR label Parquet given")
    uris = [file for item in uris for file in _committed_files(item, options)]
    paths, filesystem = [], None
    for item in uris:
        if not exists(item, options):
            raise StorageNotFound(f"no IR label Parquet at {item}", item)
        filesystem, path = resolve(item, options)
        paths.append(path)
    ds = ray.data.read_parquet(paths if len(paths) > 1 else paths[0], filesystem=filesystem)
    check_ir_label_schema(ds, ", ".join(uris))
    return ds.select_columns(list(IR_LABEL_COLUMNS))


def _committed_files(uri: str, options: StorageOptions) -> list[str]:
    """The files of a relation-mining output folder (as its manifest lists them), or ``[uri]``
    for plain Parquet; a mining output without a manifest never finished and is refused."""
    manifest = join(uri, IR_LABEL_MANIFEST)
    if not uri.endswith(".parquet") and exists(manifest, options):
        files = [join(uri, f["path"]) for f in json.loads(read_bytes(manifest, options)).get("data_files", [])]
        if not files:
            raise ValueError(f"the relation-mining output {uri} lists no IR label files")
        return files
    if exists(join(uri, IR_LABEL_JOB), options):
        raise ValueError(
            f"relation mining into {uri} did not finish (no {IR_LABEL_MANIFEST}); rerun mine-relations "
            f"with the same output to complete it"
        )
    return [uri]


def check_ir_label_schema(ds: "ray.data.Dataset", uri: str) -> None:
    schema = ds.schema()
    names = set(schema.names) if schema is not None else set()
    missing = [c for c in IR_LABEL_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"IR label Parquet {uri} lacks column(s) {', '.join(missing)}; expected {', '.join(IR_LABEL_COLUMNS)}"
        )


def decode_ir_labels(
    ds: "ray.data.Dataset",
    options: StorageOptions = StorageOptions(),
    *,
    max_side: int | None = None,
    num_cpus: float = DEFAULT_DECODE_CPUS,
    batch_size: int = DEFAULT_DECODE_BATCH,
) -> "ray.data.Dataset":
    """IR label rows -> decoded rows with ``labels`` (lazy)."""
    return ds.map_batches(
        decode_ir_batch, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"options": options, "max_side": max_side},
    )  # fmt: skip
