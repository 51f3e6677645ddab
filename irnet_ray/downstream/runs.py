"""A finished labeling output, read through its ``_manifest.json`` (no torch, no Ray here).

:func:`open_labels` reads the manifest only; the data files are read one at a time when rows
are asked for, so opening an ImageNet-sized output costs one GET. Rows are filtered into
training targets by :func:`kept_instances` and :func:`semantic_labels`, which the exports and
the torch readers share (``docs/downstream.md``).
"""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from irnet_ray.data.output_format import FORMAT_NAME, decode_rle, decode_semantic
from irnet_ray.data.parquet_files import read_table
from irnet_ray.data.storage import StorageOptions, exists, join, normalize, read_bytes

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "DEFAULT_MIN_AREA",
    "IGNORE_INDEX",
    "LabelRunError",
    "LabelRun",
    "KeptInstances",
    "open_labels",
    "keeps",
    "kept_instances",
    "semantic_labels",
]

#: Instances scoring below this are dropped. An instance's score is the maximum of its
#: propagated instance map (divided by its maximum) inside the mask, and a pixel only joins an
#: instance when that map beats the background threshold (``ins_background_threshold``, 0.25
#: by default), so real instances score above it; the labeling job scores 0 the pieces smaller
#: than ``min_instance_fraction`` of the image (a demo run: 400 of 1,251 instances, median area
#: 4 px). 0.05 drops exactly those.
DEFAULT_SCORE_THRESHOLD = 0.05
#: Instances smaller than this many pixels are dropped (a 4 x 4 patch): on small images the
#: 1 % rule above keeps pieces of a few pixels, which give Mask R-CNN empty 28 x 28 targets.
DEFAULT_MIN_AREA = 16
#: The "ignore" value of semantic targets and VOC label maps.
IGNORE_INDEX = 255

_MANIFEST = "_manifest.json"
_JOB = "_job.json"


class LabelRunError(ValueError):
    """The labeling output cannot be read as training data (unfinished, empty, inconsistent)."""


@dataclass(frozen=True)
class KeptInstances:
    """The instances of one row that pass the filters: ``masks`` (N, H, W) bool, ``class_ids``
    (N,) int64 in 1..C, ``scores`` (N,) float32, ``positions`` (N,) their index in the row's
    ``instances`` list (to reuse the stored RLE, bbox and area), ``dropped`` how many were not kept."""

    masks: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    positions: np.ndarray
    dropped: int


@dataclass(frozen=True)
class LabelRun:
    """A finished labeling output: its manifest, vocabulary and committed data files.

    ``data_files`` are URIs of exactly the files the manifest lists, ``file_rows`` their row
    counts as the manifest records them (rows are addressed as (file, row) without reading the
    files). Class id ``c`` is named ``vocabulary[c - 1]``; 0 is background.
    """

    output_uri: str
    manifest: dict
    vocabulary: tuple[str, ...]
    data_files: tuple[str, ...]
    file_rows: tuple[int, ...]
    options: StorageOptions = StorageOptions()

    @property
    def num_classes(self) -> int:
        """C: class ids are 1..C."""
        return len(self.vocabulary)

    @property
    def num_images(self) -> int:
        return sum(self.file_rows)

    @functools.cached_property
    def _row_ends(self) -> list[int]:
        return np.cumsum(self.file_rows).tolist()

    def locate(self, index: int) -> tuple[int, int]:
        """Image ``index`` (0-based, in manifest order) -> (file index, row inside that file)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range 0..{self.num_images - 1}")
        ends = self._row_ends
        file_index = bisect.bisect_right(ends, index)
        return file_index, index - (ends[file_index - 1] if file_index else 0)

    def read_file(self, file_index: int, columns: Sequence[str] | None = None) -> pa.Table:
        """One committed data file as a table (all columns, or ``columns``); its row count is
        checked against the manifest, so (file, row) addresses stay right."""
        uri = self.data_files[file_index]
        table = read_table(uri, self.options, list(columns) if columns is not None else None)
        if table.num_rows != self.file_rows[file_index]:
            raise LabelRunError(
                f"{uri} has {table.num_rows} rows but {join(self.output_uri, _MANIFEST)} lists "
                f"{self.file_rows[file_index]}: the output was changed after the run finished"
            )
        return table

    def iter_rows(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every labeled row as a dict, one data file in memory at a time."""
        for file_index in range(len(self.data_files)):
            table = self.read_file(file_index, columns)
            for batch in table.to_batches(max_chunksize=64):
                yield from batch.to_pylist()

    def images(self) -> Iterator[dict[str, Any]]:
        """``{image_id, uri, height, width}`` of every labeled image (masks are not decoded)."""
        return self.iter_rows(["image_id", "uri", "height", "width"])

    def check_class_ids(self, class_ids: Sequence[int] | np.ndarray, image_id: str, what: str) -> None:
        """Raise :class:`LabelRunError` naming the image when a class id is outside 1..C."""
        values = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        bad = values[(values < 1) | (values > self.num_classes)]
        if bad.size:
            raise LabelRunError(
                f"image {image_id!r}: {what} class id {int(bad[0])} is outside the run's vocabulary of "
                f"{self.num_classes} classes (1..{self.num_classes}): the output is inconsistent"
            )


def open_labels(output_uri: str, options: StorageOptions = StorageOptions()) -> LabelRun:
    """The finished labeling output at ``output_uri`` (a folder or ``s3://`` prefix).

    Reads ``_manifest.json`` only. Raises :class:`LabelRunError` when there is no manifest (the
    run did not finish: rerun the same ``irnet-ray label`` command to complete it), when the
    folder is another job's output, or when the run labeled no image.
    """
    output = normalize(output_uri)
    manifest_uri = join(output, _MANIFEST)
    if not exists(manifest_uri, options):
        if exists(join(output, _JOB), options):
            raise LabelRunError(
                f"the labeling run in {output} did not finish (no {_MANIFEST}); rerun the same "
                f"`irnet-ray label` command with --output {output} to complete it"
            )
        raise LabelRunError(
            f"no labeling output at {output} (no {_MANIFEST}): pass the --output folder of a finished "
            f"`irnet-ray label` run; an unfinished one is completed by rerunning the same command"
        )
    try:
        manifest = json.loads(read_bytes(manifest_uri, options))
    except json.JSONDecodeError as error:
        raise LabelRunError(f"{manifest_uri} is not valid JSON: {error}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise LabelRunError(
            f"{output} holds {manifest.get('format')!r} output, not pseudo masks ({FORMAT_NAME!r}); "
            f"pass the --output folder of `irnet-ray label`"
        )
    if not manifest.get("complete", False):
        raise LabelRunError(f"{manifest_uri} says the run is not complete; rerun the same `irnet-ray label` command")
    vocabulary = manifest.get("vocabulary")
    if not vocabulary and exists(join(output, _JOB), options):
        vocabulary = json.loads(read_bytes(join(output, _JOB), options)).get("vocabulary")
    if not vocabulary:
        raise LabelRunError(f"{manifest_uri} names no vocabulary (class names)")
    files = list(manifest.get("data_files") or [])
    rows = [int(f.get("rows", 0)) for f in files]
    if sum(rows) == 0:
        errors = manifest.get("errors", 0)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((manifest.get("errors_by_reason") or {}).items()))
        raise LabelRunError(
            f"the labeling run in {output} labeled 0 images "
            f"({errors} error row(s){': ' + reasons if reasons else ''}); nothing to train on"
        )
    return LabelRun(
        output_uri=output,
        manifest=manifest,
        vocabulary=tuple(str(name) for name in vocabulary),
        data_files=tuple(join(output, f["path"]) for f in files),
        file_rows=tuple(rows),
        options=options,
    )


def keeps(instance: dict, *, score_threshold: float, min_area: int) -> bool:
    """Whether an ``instances`` element passes the filters: ``score >= score_threshold`` and
    ``area >= min_area`` pixels."""
    return float(instance["score"]) >= score_threshold and int(instance["area"]) >= min_area


def kept_instances(
    row: dict, run: LabelRun, *, score_threshold: float = DEFAULT_SCORE_THRESHOLD, min_area: int = DEFAULT_MIN_AREA
) -> KeptInstances:
    """The instances of a data row with ``score >= score_threshold`` and ``area >= min_area``
    pixels, decoded (pycocotools). A class id outside the vocabulary raises :class:`LabelRunError`."""
    instances = list(row["instances"] or [])
    run.check_class_ids([i["class_id"] for i in instances], row["image_id"], "instance")
    height, width = int(row["height"]), int(row["width"])
    positions = [n for n, i in enumerate(instances) if keeps(i, score_threshold=score_threshold, min_area=min_area)]
    masks = np.zeros((len(positions), height, width), dtype=bool)
    for k, n in enumerate(positions):
        mask = decode_rle(instances[n]["rle"])
        if mask.shape != (height, width):
            raise LabelRunError(
                f"image {row['image_id']!r}: an instance mask is {mask.shape}, the image ({height}, {width})"
            )
        masks[k] = mask
    return KeptInstances(
        masks=masks,
        class_ids=np.asarray([int(instances[n]["class_id"]) for n in positions], dtype=np.int64),
        scores=np.asarray([float(instances[n]["score"]) for n in positions], dtype=np.float32),
        positions=np.asarray(positions, dtype=np.int64),
        dropped=len(instances) - len(positions),
    )


def semantic_labels(row: dict, run: LabelRun, *, ignore_below: float | None = None) -> np.ndarray:
    """The (H, W) uint8 class-index map of a data row (0 background, 1..C), 255 = ignore.

    The output has no per-pixel confidence; the only confidence it stores is the instances'
    score. ``ignore_below``: the pixels of instances scoring below it become 255, so e.g. the
    tiny score-0 fragments are trained neither as their class nor as background. ``None`` (the
    default) keeps the map as labeled.
    """
    semantic = decode_semantic(row["semantic_png"])
    height, width = int(row["height"]), int(row["width"])
    if semantic.shape != (height, width):
        raise LabelRunError(
            f"image {row['image_id']!r}: the semantic map is {semantic.shape}, the image ({height}, {width})"
        )
    present = np.unique(semantic)
    run.check_class_ids(present[present > 0], row["image_id"], "semantic")
    if ignore_below is None:
        return semantic
    semantic = semantic.copy()
    for instance in row["instances"] or []:
        if float(instance["score"]) < ignore_below:
            semantic[decode_rle(instance["rle"])] = IGNORE_INDEX
    return semantic
