"""Exports of a finished labeling output for off-the-shelf trainers (no torch, no Ray here).

* :func:`export_coco`: one COCO instances JSON (Mask R-CNN trainers, pycocotools' ``COCOeval``).
* :func:`export_voc`: PASCAL VOC-style ``SegmentationClass`` / ``SegmentationObject`` palette
  PNGs and an ``ImageSets/Segmentation`` list (DeepLab trainers).

Both read only the files ``_manifest.json`` lists, one data file at a time. The images are not
copied: COCO's ``file_name`` is the image URI; for VOC, ``ImageSets/Segmentation/<split>_uris.txt``
pairs each listed name with its image URI. ``docs/downstream.md`` has the commands.
"""

from __future__ import annotations

import json
from typing import Iterable
from urllib.parse import quote, unquote

import numpy as np

from irnet_ray.data.decode import encode_png
from irnet_ray.data.output_format import voc_palette
from irnet_ray.data.storage import (
    StorageNotFound,
    StorageOptions,
    delete_file,
    exists,
    join,
    list_files,
    normalize,
    read_bytes,
    write_bytes,
)

from .runs import (
    DEFAULT_MIN_AREA,
    DEFAULT_SCORE_THRESHOLD,
    IGNORE_INDEX,
    LabelRun,
    LabelRunError,
    keeps,
    kept_instances,
    open_labels,
    semantic_labels,
)

__all__ = [
    "ExportError",
    "EXPORT_MARKER",
    "MAX_VOC_INSTANCES",
    "voc_name",
    "image_id_from_voc_name",
    "export_coco",
    "export_voc",
]

#: The file in a VOC export folder that says which labeling output (and filters) it holds.
EXPORT_MARKER = "irnet_ray_export.json"
#: Instance numbers 1..254 fit a VOC object map (0 background, 255 ignore).
MAX_VOC_INSTANCES = 254
_COCO_COLUMNS = ["image_id", "uri", "height", "width", "instances"]


class ExportError(ValueError):
    """An export was refused (its destination holds something else); nothing was written."""


# --------------------------------------------------------------------------------------
# file names of image ids


def voc_name(image_id: str) -> str:
    """The file name (without ``.png``) an image id gets in a VOC export, and the name listed.

    ``/`` stays a folder separator (ImageNet's ``n01440764/n01440764_10026`` becomes a sub-folder);
    each part is percent-encoded (``urllib.parse.quote`` with no safe characters, ``.`` / ``..``
    as ``%2E`` / ``%2E%2E``), so ids of letters, digits, ``_ . - ~`` and ``/`` keep their name
    and :func:`image_id_from_voc_name` (``unquote``) gives every id back. Ids with an empty part
    (a leading, trailing or doubled ``/``) have no file name and raise ``ValueError``.
    """
    parts = str(image_id).split("/")
    if any(part == "" for part in parts):
        raise ValueError(f"image id {image_id!r} has an empty path part (a leading, trailing or doubled '/')")
    encoded = []
    for part in parts:
        encoded.append("%2E" * len(part) if part in (".", "..") else quote(part, safe=""))
    return "/".join(encoded)


def image_id_from_voc_name(name: str) -> str:
    """The image id of a name listed in a VOC export (the inverse of :func:`voc_name`)."""
    return unquote(name)


# --------------------------------------------------------------------------------------
# COCO


def _refuse_existing(dest: str, options: StorageOptions, overwrite: bool) -> None:
    if not overwrite and exists(dest, options):
        raise ExportError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")


def export_coco(
    output_uri: str,
    dest_json_uri: str,
    *,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    min_area: int = DEFAULT_MIN_AREA,
    options: StorageOptions = StorageOptions(),
    overwrite: bool = False,
) -> dict:
    """Write the output's instances as one COCO instances JSON at ``dest_json_uri``.

    ``images``: ``id`` 1..N in manifest order, ``file_name`` the image URI, ``width``,
    ``height`` (and ``irnet_image_id``). ``annotations``: one per instance with ``score >=
    score_threshold`` and ``area >= min_area`` (the same filters as the training targets): the
    stored COCO RLE as ``segmentation`` (``counts`` a str), ``area``, ``bbox`` ``[x, y, w, h]``,
    ``iscrowd`` 0, ``score``. ``categories``: the vocabulary, ids 1..C.

    An existing destination is refused unless ``overwrite``; the JSON is written in one atomic
    put after every row was read, so a failure writes nothing. Returns counts and ``dest``.
    """
    dest = normalize(dest_json_uri)
    _refuse_existing(dest, options, overwrite)
    run = open_labels(output_uri, options)
    images, annotations, dropped = [], [], 0
    for image_number, row in enumerate(run.iter_rows(_COCO_COLUMNS), start=1):
        height, width = int(row["height"]), int(row["width"])
        images.append({"id": image_number, "file_name": row["uri"], "width": width, "height": height,
                       "irnet_image_id": row["image_id"]})  # fmt: skip
        instances = list(row["instances"] or [])
        run.check_class_ids([i["class_id"] for i in instances], row["image_id"], "instance")
        for instance in instances:
            if not keeps(instance, score_threshold=score_threshold, min_area=min_area):
                dropped += 1
                continue
            size = [int(s) for s in instance["rle"]["size"]]
            if size != [height, width]:
                raise LabelRunError(
                    f"image {row['image_id']!r}: an instance mask is {size}, the image {[height, width]}"
                )
            annotations.append({
                "id": len(annotations) + 1,  # COCOeval treats id 0 as "no match": start at 1
                "image_id": image_number,
                "category_id": int(instance["class_id"]),
                "segmentation": {"size": size, "counts": str(instance["rle"]["counts"])},
                "area": int(instance["area"]),
                "bbox": [float(v) for v in instance["bbox"]],
                "iscrowd": 0,
                "score": float(instance["score"]),
            })  # fmt: skip
    coco = {
        "info": {"description": "irnet-ray pseudo masks", "labels": run.output_uri,
                 "run_id": run.manifest.get("run_id"), "settings_id": run.manifest.get("settings_id"),
                 "score_threshold": score_threshold, "min_area": min_area},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": name, "supercategory": "object"} for c, name in enumerate(run.vocabulary, 1)],
    }  # fmt: skip
    write_bytes(dest, json.dumps(coco, separators=(",", ":")).encode(), options)
    return {"dest": dest, "images": len(images), "annotations": len(annotations), "dropped": dropped,
            "categories": run.num_classes}  # fmt: skip


# --------------------------------------------------------------------------------------
# PASCAL VOC


def _object_map(row: dict, run: LabelRun, score_threshold: float, min_area: int) -> tuple[np.ndarray, int, int]:
    """(H, W) uint8 instance-number map of a row: 0 background, 1..N the kept instances in the
    row's order, 255 the pixels of dropped instances (unsure, as VOC's void). Beyond
    :data:`MAX_VOC_INSTANCES`, the lowest-scoring kept instances become 255 too.
    Returns the map, the instances numbered and those made 255."""
    height, width = int(row["height"]), int(row["width"])
    everything = kept_instances(row, run, score_threshold=-np.inf, min_area=0)
    object_map = np.zeros((height, width), dtype=np.uint8)
    instances = list(row["instances"] or [])
    kept = [n for n, i in enumerate(instances) if keeps(i, score_threshold=score_threshold, min_area=min_area)]
    if len(kept) > MAX_VOC_INSTANCES:
        by_score = sorted(kept, key=lambda n: -float(everything.scores[n]))
        kept = sorted(by_score[:MAX_VOC_INSTANCES])
    numbers = {n: k for k, n in enumerate(kept, start=1)}
    for n, mask in enumerate(everything.masks):
        object_map[mask] = numbers.get(n, IGNORE_INDEX)
    return object_map, len(kept), len(everything.masks) - len(kept)


def _export_record(run: LabelRun, split: str, score_threshold: float, min_area: int) -> dict:
    return {"format": "voc", "labels": run.output_uri, "run_id": run.manifest.get("run_id"),
            "manifest_written": run.manifest.get("written"), "split": split,
            "score_threshold": score_threshold, "min_area": min_area}  # fmt: skip


def _existing_files(dest: str, options: StorageOptions) -> list[str]:
    try:
        return list_files(dest, options)
    except StorageNotFound:
        return []


def export_voc(
    output_uri: str,
    dest_folder_uri: str,
    *,
    options: StorageOptions = StorageOptions(),
    overwrite: bool = False,
    split: str = "train",
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    min_area: int = DEFAULT_MIN_AREA,
) -> dict:
    """Write the output as a VOC-style segmentation folder at ``dest_folder_uri``.

    ``SegmentationClass/<name>.png``: the semantic map as labeled (class id = palette index,
    0 background). ``SegmentationObject/<name>.png``: 0 background, 1..N the instances that pass
    ``score_threshold`` / ``min_area`` (in the row's order), 255 the pixels of the dropped ones.
    Both are 8-bit palette PNGs with the PASCAL VOC colour map. ``<name>`` is :func:`voc_name`
    of the image id (a ``cls/name`` id becomes a sub-folder). ``ImageSets/Segmentation/<split>.txt``
    lists the names and ``<split>_uris.txt`` the names with their image URIs; they are written
    last, so their presence means the export is complete.

    Streaming and resumable: one data file in memory at a time; ``irnet_ray_export.json``,
    written first, records the source; a rerun on the same source skips the images whose two
    PNGs exist. A folder holding anything else (another source, other files) is refused unless
    ``overwrite``, which rewrites every PNG and the lists (other files are left alone).
    """
    run = open_labels(output_uri, options)
    dest = normalize(dest_folder_uri)
    marker_uri = join(dest, EXPORT_MARKER)
    record = _export_record(run, split, score_threshold, min_area)
    existing = _existing_files(dest, options)
    if existing and not overwrite:
        if marker_uri not in existing:
            raise ExportError(f"{dest} is not empty and holds no {EXPORT_MARKER}; pass overwrite=True "
                              f"(--overwrite) to write the export into it anyway")  # fmt: skip
        previous = json.loads(read_bytes(marker_uri, options))
        if previous != record:
            changed = ", ".join(sorted(k for k in record if previous.get(k) != record[k]))
            raise ExportError(f"{dest} holds an export of another run or with other settings ({changed} differ); "
                              f"pass overwrite=True (--overwrite) to replace it")  # fmt: skip
    list_uri = join(dest, "ImageSets", "Segmentation", f"{split}.txt")
    uris_uri = join(dest, "ImageSets", "Segmentation", f"{split}_uris.txt")
    if overwrite:  # the lists say "complete": they go first and come back last
        delete_file(list_uri, options)
        delete_file(uris_uri, options)
    write_bytes(marker_uri, json.dumps(record, indent=2, sort_keys=True).encode(), options)
    done = set() if overwrite else set(existing)
    palette = voc_palette()
    names: list[str] = []
    lines: list[str] = []
    counts = {"written": 0, "skipped": 0, "instances": 0, "unsure_instances": 0}
    for row in run.iter_rows():
        name = voc_name(row["image_id"])
        names.append(name)
        lines.append(f"{name}\t{row['uri']}")
        class_uri = join(dest, "SegmentationClass", f"{name}.png")
        object_uri = join(dest, "SegmentationObject", f"{name}.png")
        if class_uri in done and object_uri in done:
            counts["skipped"] += 1
            continue
        semantic = semantic_labels(row, run)
        object_map, numbered, unsure = _object_map(row, run, score_threshold, min_area)
        write_bytes(class_uri, encode_png(semantic, palette), options)
        write_bytes(object_uri, encode_png(object_map, palette), options)
        counts["written"] += 1
        counts["instances"] += numbered
        counts["unsure_instances"] += unsure
    write_bytes(uris_uri, _text(lines), options)
    write_bytes(list_uri, _text(names), options)
    return {"dest": dest, "images": len(names), "list": list_uri, **counts}


def _text(lines: Iterable[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()
