"""Training data from a finished labeling output: torchvision targets, a torch Dataset, a Ray Dataset.

* :func:`instance_targets`: one data row -> Mask R-CNN targets (``boxes``, ``labels``, ``masks``).
* :func:`semantic_target`: one data row -> DeepLab target (H x W int64, 255 ignore).
* :class:`LabelDataset`: ``(image uint8 3 x H x W, target)`` pairs, rows read lazily file by file.
* :func:`label_dataset_ray`: the committed data files as a ``ray.data.Dataset`` (Ray imported lazily).

Everything reads only the files ``_manifest.json`` lists (:func:`open_labels`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from irnet_ray.data.images import load_image
from irnet_ray.data.storage import StorageOptions, resolve

from .runs import (
    DEFAULT_MIN_AREA,
    DEFAULT_SCORE_THRESHOLD,
    IGNORE_INDEX,
    LabelRun,
    LabelRunError,
    kept_instances,
    open_labels,
    semantic_labels,
)

__all__ = [
    "IGNORE_INDEX",
    "LabelRun",
    "LabelRunError",
    "open_labels",
    "masks_to_boxes",
    "instance_targets",
    "semantic_target",
    "LabelDataset",
    "detection_collate",
    "label_dataset_ray",
]

TASKS = ("instance", "semantic")


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) float32 ``x1 y1 x2 y2`` boxes of (N, H, W) non-empty masks, in pixel-edge
    coordinates: a mask covering columns 3..5 gives x1 = 3, x2 = 6 (COCO's ``x + w``)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for n, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            raise ValueError(f"instance mask {n} is empty: it has no box")
        boxes[n] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def instance_targets(
    row: dict, run: LabelRun, *, score_threshold: float = DEFAULT_SCORE_THRESHOLD, min_area: int = DEFAULT_MIN_AREA
) -> dict[str, torch.Tensor]:
    """torchvision detection targets of one data row: ``boxes`` (N, 4) float32 x1 y1 x2 y2 from
    the masks, ``labels`` (N,) int64 class ids 1..C, ``masks`` (N, H, W) uint8, ``scores`` (N,).

    Instances scoring below ``score_threshold`` or smaller than ``min_area`` pixels are dropped
    (defaults and why: :data:`~irnet_ray.downstream.runs.DEFAULT_SCORE_THRESHOLD`). An image
    left with no instance gives empty tensors (torchvision trains on it as a negative).
    """
    kept = kept_instances(row, run, score_threshold=score_threshold, min_area=min_area)
    return {
        "boxes": torch.from_numpy(masks_to_boxes(kept.masks)).reshape(-1, 4),
        "labels": torch.from_numpy(kept.class_ids),
        "masks": torch.from_numpy(kept.masks.astype(np.uint8)),
        "scores": torch.from_numpy(kept.scores),
    }


def semantic_target(row: dict, run: LabelRun, *, ignore_below: float | None = None) -> torch.Tensor:
    """(H, W) int64 class-index target of one data row: 0 background, 1..C, 255 ignore.

    ``ignore_below``: pixels of instances scoring below it become 255 (the output has no
    per-pixel confidence; see :func:`~irnet_ray.downstream.runs.semantic_labels`).
    """
    return torch.from_numpy(semantic_labels(row, run, ignore_below=ignore_below).astype(np.int64))


class LabelDataset(Dataset):
    """``(image, target)`` pairs of a finished labeling output, for torch ``DataLoader``s.

    ``image``: uint8 (3, H, W) read from the row's ``uri`` (local, ``s3://`` or ``synthetic://``)
    at the size the masks have. ``task="instance"``: ``target`` is :func:`instance_targets`'
    dict; ``task="semantic"``: :func:`semantic_target`'s (H, W) int64 map. ``transform(image,
    target)`` (optional) is applied last.

    Construction reads the manifest only: item ``i`` is addressed as (file, row) from the row
    counts it lists. Items are read one data file at a time and the last file read is kept, so
    a sequential pass reads every file once (shuffle with a sampler that keeps files together,
    or use :func:`label_dataset_ray`, when files are large).
    """

    def __init__(
        self,
        output_uri: str | LabelRun,
        task: str = "instance",
        *,
        options: StorageOptions = StorageOptions(),
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        min_area: int = DEFAULT_MIN_AREA,
        ignore_below: float | None = None,
        transform: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.run = output_uri if isinstance(output_uri, LabelRun) else open_labels(output_uri, options)
        self.task = task
        self.score_threshold, self.min_area, self.ignore_below = score_threshold, min_area, ignore_below
        self.transform = transform
        self._cached: tuple[int, pa.Table] | None = None

    @property
    def num_classes(self) -> int:
        return self.run.num_classes

    def __len__(self) -> int:
        return self.run.num_images

    def __getstate__(self) -> dict:  # DataLoader workers start without the cached file
        return {**self.__dict__, "_cached": None}

    def row(self, index: int) -> dict[str, Any]:
        """Data row ``index`` as a dict (reads its file unless it is the one read last)."""
        file_index, row_index = self.run.locate(index)
        if self._cached is None or self._cached[0] != file_index:
            self._cached = (file_index, self.run.read_file(file_index))
        return self._cached[1].slice(row_index, 1).to_pylist()[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        row = self.row(index)
        image = load_image(row["uri"], self.run.options)
        if image.shape[:2] != (int(row["height"]), int(row["width"])):
            raise LabelRunError(
                f"image {row['image_id']!r} at {row['uri']} is {image.shape[1]}x{image.shape[0]} but was labeled at "
                f"{row['width']}x{row['height']}: the file changed since the run"
            )
        image_tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.task == "instance":
            target: Any = instance_targets(row, self.run, score_threshold=self.score_threshold, min_area=self.min_area)
        else:
            target = semantic_target(row, self.run, ignore_below=self.ignore_below)
        if self.transform is not None:
            return self.transform(image_tensor, target)
        return image_tensor, target


def detection_collate(batch: Sequence[tuple]) -> tuple[list, list]:
    """``DataLoader`` ``collate_fn`` for detection: lists of images and targets (sizes differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def label_dataset_ray(
    output_uri: str | LabelRun,
    options: StorageOptions = StorageOptions(),
    *,
    columns: Sequence[str] | None = None,
    **read_parquet_kwargs: Any,
):
    """A ``ray.data.Dataset`` of exactly the data files the manifest lists (streamed by Ray
    Data; ``s3://`` outputs through the same pyarrow filesystem as the rest of the package).

    Rows are the raw data rows (``docs/output-format.md``); map them with
    :func:`instance_targets` / :func:`semantic_target` in the training loop.
    """
    import ray

    run = output_uri if isinstance(output_uri, LabelRun) else open_labels(output_uri, options)
    filesystem, paths = None, []
    for uri in run.data_files:
        filesystem, path = resolve(uri, run.options)
        paths.append(path)
    return ray.data.read_parquet(
        paths, filesystem=filesystem, columns=list(columns) if columns is not None else None, **read_parquet_kwargs
    )

