"""Image sets as lists of :class:`ImageRecord` plus a :class:`ClassVocabulary`.

Readers (all accept local paths, ``file://`` and ``s3://`` URIs via :mod:`irnet_ray.data.storage`):

* :func:`read_manifest` - a Parquet / CSV / JSON Lines table with one row per image.
* :func:`read_image_folder` - an ImageNet-style tree ``root/<class_name>/<image files>``.
* :func:`read_voc` - the PASCAL VOC 2012 layout.
* :func:`synthetic_records` - the built-in synthetic benchmark (``synthetic://`` URIs,
  materialised by :func:`load_synthetic`).
* :func:`load_records` - one string picks and runs the right reader (syntax in its docstring).

Listing never reads images: a record whose file is missing or broken is kept, and the stage
that decodes it records a per-image error (``check_exists=True`` checks presence up front).
Mistakes in the set itself (unknown class names, missing columns, duplicate ids, an empty set,
a missing split file) raise :class:`SourceError` subclasses whose messages name the row, the
image and the fix. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import posixpath
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence
from urllib.parse import parse_qsl, urlencode

import numpy as np

from .storage import (
    StorageNotFound,
    StorageOptions,
    basename,
    exists,
    is_s3,
    join,
    list_files,
    normalize,
    parent,
    read_bytes,
)

if TYPE_CHECKING:  # synthetic.py pulls in scipy; import it only when the built-in set is used
    from .synthetic import SyntheticConfig, SyntheticSample

__all__ = [
    "VOC_CLASSES",
    "IMAGE_SUFFIXES",
    "SourceError",
    "ManifestError",
    "EmptyImageSetError",
    "UnknownClassError",
    "MissingImageError",
    "ClassVocabulary",
    "ImageRecord",
    "read_manifest",
    "read_image_folder",
    "read_voc",
    "read_voc_masks",
    "synthetic_records",
    "synthetic_uri",
    "load_synthetic",
    "parse_builtin_spec",
    "builtin_spec",
    "load_records",
    "records_table",
]

#: The 20 PASCAL VOC foreground classes in the standard order (ids 1..20; 0 is background).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

#: File name endings read as images from folder trees (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                     ".ndjson": "jsonl", ".json": "jsonl"}  # fmt: skip
_MAX_LISTED = 10
_IO_THREADS = 16


# --------------------------------------------------------------------------------------
# errors


class SourceError(ValueError):
    """The image set itself is wrong (layout, manifest contents, class names)."""


class ManifestError(SourceError):
    """A manifest (or list file / annotation) cannot be used as written."""


class EmptyImageSetError(SourceError):
    """The source holds no images."""


class MissingImageError(SourceError):
    """``check_exists=True`` found listed images whose files do not exist."""

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = tuple(missing)

    def __reduce__(self):
        return (type(self), (str(self), self.missing))


class UnknownClassError(SourceError):
    """A class name that the vocabulary does not know; ``suggestions`` holds close matches."""

    def __init__(self, message: str, name: str = "", suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.suggestions = tuple(suggestions)

    def __reduce__(self):
        return (type(self), (str(self), self.name, self.suggestions))


def _listing(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _where(row: int | None, image: str | None) -> str:
    parts = []
    if row is not None:
        parts.append(f"row {row}")
    if image:
        parts.append(f"(image {image})" if parts else f"image {image}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------
# vocabulary and records


@dataclass(frozen=True)
class ClassVocabulary:
    """Foreground class names; class id = index + 1 (0 is background)."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.names, str):
            raise ValueError("ClassVocabulary.names must be a sequence of names, not one string")
        names = tuple(self.names)
        if not names:
            raise ValueError("ClassVocabulary needs at least one class name")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"ClassVocabulary: class {i + 1} must be a non-empty string, got {name!r}")
            if name != name.strip():
                raise ValueError(f"ClassVocabulary: class name {name!r} has leading/trailing spaces")
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in seen:
                raise ValueError(f"ClassVocabulary: class {name!r} is listed twice (ids {seen[name]} and {i + 1})")
            seen[name] = i + 1
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_ids", seen)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "ClassVocabulary":
        """Vocabulary of the sorted set of ``names``."""
        return cls(tuple(sorted(set(names))))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._ids  # type: ignore[attr-defined]

    def suggestions(self, name: str, n: int = 3) -> list[str]:
        folded = [k for k in self.names if k.casefold() == str(name).casefold()]
        close = difflib.get_close_matches(str(name), self.names, n=n, cutoff=0.6)
        return list(dict.fromkeys(folded + close))[:n]

    def id_of(self, name: str, *, row: int | None = None, image: str | None = None) -> int:
        """The id (1..C) of ``name``; unknown names raise :class:`UnknownClassError`."""
        try:
            return self._ids[name]  # type: ignore[attr-defined]
        except (KeyError, TypeError):
            pass
        close = self.suggestions(name)
        where = _where(row, image)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        message = (
            f"{where + ': ' if where else ''}unknown class {name!r}{hint} "
            f"known classes: {_listing(list(self.names), 30)}"
        )
        raise UnknownClassError(message, str(name), close)

    def name_of(self, class_id: int) -> str:
        if not 1 <= int(class_id) <= len(self.names):
            raise ValueError(f"class id {class_id} out of range 1..{len(self.names)} (0 is background)")
        return self.names[int(class_id) - 1]

    def ids_of(self, names: Iterable[str], *, row: int | None = None, image: str | None = None) -> tuple[int, ...]:
        return tuple(sorted({self.id_of(n, row=row, image=image) for n in names}))

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names)})

    @classmethod
    def from_json(cls, text: str | bytes | dict | list) -> "ClassVocabulary":
        """Inverse of :meth:`to_json`; also accepts a plain JSON list of names."""
        value = json.loads(text) if isinstance(text, (str, bytes, bytearray)) else text
        if isinstance(value, dict):
            if "names" not in value:
                raise ValueError(f"class vocabulary JSON needs a 'names' list, got keys {sorted(value)}")
            value = value["names"]
        if not isinstance(value, list):
            raise ValueError("class vocabulary JSON must be a list of names or {'names': [...]}")
        return cls(tuple(value))


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set. ``classes`` are sorted unique ids (may be empty: recorded per image
    as an error by the labeling job). ``semantic_uri`` / ``instance_uri`` are ground-truth PNGs
    for evaluation only. ``source_row`` is the 1-based data row (or list-file line) it came from.
    """

    image_id: str
    uri: str
    classes: tuple[int, ...] = ()
    semantic_uri: str | None = None
    instance_uri: str | None = None
    source_row: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image_id, str) or not self.image_id:
            raise ValueError(f"ImageRecord.image_id must be a non-empty string, got {self.image_id!r}")
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"ImageRecord.uri must be a non-empty string (image {self.image_id})")
        classes = tuple(sorted({int(c) for c in self.classes}))
        if classes and classes[0] < 1:
            raise ValueError(f"ImageRecord.classes are foreground ids >= 1, got {classes} (image {self.image_id})")
        object.__setattr__(self, "classes", classes)

    def to_row(self) -> dict[str, Any]:
        """Plain dict (e.g. a Ray Data row); :meth:`from_row` inverts it."""
        row = dataclasses.asdict(self)
        row["classes"] = list(self.classes)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ImageRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in fields})


def records_table(records: Sequence[ImageRecord]):
    """Records as a ``pyarrow.Table`` (columns of :meth:`ImageRecord.to_row`)."""
    import pyarrow as pa

    schema = pa.schema([
        ("image_id", pa.string()), ("uri", pa.string()), ("classes", pa.list_(pa.int32())),
        ("semantic_uri", pa.string()), ("instance_uri", pa.string()), ("source_row", pa.int64()),
    ])  # fmt: skip
    return pa.Table.from_pylist([r.to_row() for r in records], schema=schema)


def _check_unique_ids(records: Sequence[ImageRecord], what: str, hint: str = "") -> None:
    first: dict[str, ImageRecord] = {}
    for r in records:
        other = first.setdefault(r.image_id, r)
        if other is not r:
            raise ManifestError(
                f"{what}: duplicate image id {r.image_id!r} in {_where(other.source_row, other.uri)} "
                f"and {_where(r.source_row, r.uri)}{hint}"
            )


def _parallel(fn, items: Sequence, remote: bool):
    if remote and len(items) > 1:
        with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(items))) as pool:
            return list(pool.map(fn, items))
    return [fn(i) for i in items]


def _check_exists(records: Sequence[ImageRecord], options: StorageOptions, what: str) -> None:
    remote = any(is_s3(r.uri) for r in records)
    present = _parallel(lambda r: exists(r.uri, options), list(records), remote)
    missing = [r for r, ok in zip(records, present) if not ok]
    if missing:
        ids = [r.image_id for r in missing]
        raise MissingImageError(
            f"{what}: {len(missing)} of {len(records)} listed images do not exist: {_listing(ids)} "
            f"(first missing file: {missing[0].uri})",
            ids,
        )


# --------------------------------------------------------------------------------------
# manifests


def is_manifest_spec(spec: str) -> bool:
    """Whether an image-set spec names a manifest table (``manifest:URI`` or a table file)."""
    spec = os.fspath(spec).strip()
    prefix, sep, rest = spec.partition(":")
    if sep and not rest.startswith("//") and prefix in ("manifest", "voc", "folder", "builtin"):
        return prefix == "manifest"
    return posixpath.splitext(spec.lower())[1] in _MANIFEST_FORMATS


def read_manifest(
    uri: str,
    options: StorageOptions = StorageOptions(),
    vocabulary: ClassVocabulary | None = None,
    *,
    image_column: str = "image",
    classes_column: str = "classes",
    id_column: str = "image_id",
    semantic_column: str = "semantic",
    instance_column: str = "instance",
    check_exists: bool = False,
    allow_duplicate_ids: bool = False,
) -> tuple[list[ImageRecord], ClassVocabulary]:
    """Records from a manifest table (``.parquet``, ``.csv``, ``.jsonl`` / ``.ndjson`` / ``.json``).

    Columns: ``image_column`` (path or URI; relative paths are relative to the manifest's
    folder), ``classes_column`` (a list of names, or one string with names separated by ``|``
    or ``;``, never by spaces or commas: ``traffic light`` is one class; a string holding a JSON
    list is read as that list; an empty cell is allowed), optional ``id_column`` (default: the
    image file's stem), optional ``semantic_column`` / ``instance_column`` (ground-truth PNGs
    for evaluation). A ``.json`` file may also hold one JSON array of objects.

    With ``vocabulary=None`` the vocabulary is the sorted set of names in the manifest; a given
    vocabulary also allows integer class ids (1..C) in list-valued (Parquet / JSON) class
    columns. Row numbers in messages count data rows from 1 (a CSV header is not a row).

    Read by the same reader as the labeling job's (:func:`.columnar.read_manifest_table`): one
    set of rules for training and labeling. A repeated image id is an error of the whole
    manifest, unless ``allow_duplicate_ids`` (the labeling job records such rows per image
    instead of refusing millions of good ones).
    """
    from .columnar import read_manifest_table  # it builds on this module's vocabulary and errors

    table, vocabulary = read_manifest_table(uri, options, vocabulary, image_column=image_column,
                                            classes_column=classes_column, id_column=id_column,
                                            semantic_column=semantic_column, instance_column=instance_column)  # fmt: skip
    records = [ImageRecord.from_row(row) for row in table.to_pylist()]
    if not allow_duplicate_ids:
        hint = "" if (table.schema.metadata or {}).get(b"ids") != b"file names" else (
            f" (ids come from file names; add an {id_column!r} column)")  # fmt: skip
        _check_unique_ids(records, f"manifest {uri}", hint)
    if check_exists:
        _check_exists(records, options, f"manifest {uri}")
    return records, vocabulary


# --------------------------------------------------------------------------------------
# ImageNet-style folder trees


def read_image_folder(
    uri: str,
    options: StorageOptions = StorageOptions(),
    vocabulary: ClassVocabulary | None = None,
    *,
    check_exists: bool = False,  # accepted for a uniform interface: listed files exist
    allow_duplicate_ids: bool = False,
) -> tuple[list[ImageRecord], ClassVocabulary]:
    """Records from ``root/<class_name>/<image files>`` (nested sub-folders allowed).

    Images are files ending in :data:`IMAGE_SUFFIXES` (any case); other files and anything
    whose path has a component starting with ``.`` are not images of the set. Each image gets
    the class of its top folder; its id is ``<class>/<path below the class folder, no suffix>``.
    Images directly under ``root`` raise :class:`ManifestError` (they have no class).
    """
    from .columnar import read_folder_table  # it builds on this module's vocabulary and errors

    table, vocabulary = read_folder_table(os.fspath(uri), options, vocabulary)
    records = [ImageRecord.from_row(row) for row in table.to_pylist()]
    if not allow_duplicate_ids:
        _check_unique_ids(records, f"image folder {uri}", " (same name with different suffixes)")
    return records, vocabulary


# --------------------------------------------------------------------------------------
# PASCAL VOC


def _voc_names(xml_bytes: bytes, where: str) -> list[str]:
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise ManifestError(f"{where}: invalid annotation XML ({exc})") from None
    names = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name is not None and name.strip():
            names.append(name.strip())
    return names


def _names_in(folder: str, options: StorageOptions, suffix: str) -> set[str] | None:
    """File names (without suffix) directly in ``folder`` with ``suffix``; None if no folder."""
    try:
        files = list_files(folder, options, suffixes=(suffix,))
    except StorageNotFound:
        return None
    out = set()
    for f in files:
        if parent(f).rstrip("/") == folder.rstrip("/"):
            out.add(basename(f)[: -len(suffix)])
    return out


def read_voc(
    root_uri: str,
    options: StorageOptions = StorageOptions(),
    split: str = "train",
    vocabulary: ClassVocabulary | None = None,
    *,
    check_exists: bool = False,
) -> tuple[list[ImageRecord], ClassVocabulary]:
    """Records of a PASCAL VOC 2012 split (the ``VOC2012`` folder as ``root_uri``).

    Ids come from ``ImageSets/Segmentation/{split}.txt`` (first token of each line), or, for a
    split not there, from ``ImageSets/SegmentationAug/{split}.txt`` (the augmented set of
    Hariharan et al. as DeepLab lays it out, ``train_aug``: 10,582 images, what the paper trains
    on; lines ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``); images are
    ``JPEGImages/{id}.jpg``; image-level classes are every ``<object><name>`` of
    ``Annotations/{id}.xml`` (``difficult`` and ``truncated`` objects included);
    ``SegmentationClass/{id}.png`` (else ``SegmentationClassAug/{id}.png``, class indices as
    grey levels) and ``SegmentationObject/{id}.png`` become ``semantic_uri`` / ``instance_uri``
    where present. The default vocabulary is :data:`VOC_CLASSES`.

    Missing JPEGs are not an error here (decoding records them per image) unless
    ``check_exists=True`` (:class:`MissingImageError`). Missing annotation files are an error
    (:class:`ManifestError`): without them there are no labels.
    """
    root = normalize(root_uri)
    vocabulary = vocabulary if vocabulary is not None else ClassVocabulary(VOC_CLASSES)
    split_dir = join(root, "ImageSets", "Segmentation")
    split_file = join(split_dir, f"{split}.txt")
    text = None
    for folder in (split_dir, join(root, "ImageSets", "SegmentationAug")):
        try:
            split_file = join(folder, f"{split}.txt")
            text = read_bytes(split_file, options).decode("utf-8-sig")
            break
        except StorageNotFound:
            continue
    if text is None:
        available = (_names_in(split_dir, options, ".txt") or set()) | (
            _names_in(join(root, "ImageSets", "SegmentationAug"), options, ".txt") or set())  # fmt: skip
        extra = f"; available splits: {', '.join(sorted(available))}" if available else ""
        raise ManifestError(
            f"PASCAL VOC split {split!r} not found: expected the list file {join(split_dir, f'{split}.txt')}"
            f"{extra} (layout: {root}/ImageSets/Segmentation/<split>.txt, or ImageSets/SegmentationAug/"
            "<split>.txt for train_aug, JPEGImages/, Annotations/)"
        ) from None
    entries: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        image_id = posixpath.splitext(posixpath.basename(tokens[0]))[0]  # "2007_000032" or "/JPEGImages/2007_000032.jpg"
        if image_id in seen:
            raise ManifestError(
                f"{split_file}: image id {image_id!r} is listed twice (lines {seen[image_id]} and {lineno})"
            )
        seen[image_id] = lineno
        entries.append((lineno, image_id))
    if not entries:
        raise EmptyImageSetError(f"PASCAL VOC split file {split_file} lists no images")

    ann_dir = join(root, "Annotations")
    annotated = _names_in(ann_dir, options, ".xml")
    missing_ann = [i for _, i in entries if annotated is None or i not in annotated]
    if missing_ann:
        raise ManifestError(
            f"PASCAL VOC {root}: {len(missing_ann)} of {len(entries)} images in split {split!r} have no "
            f"annotation {ann_dir}/<id>.xml (needed for the image-level classes): {_listing(missing_ann)}"
        )
    remote = is_s3(root)
    xmls = _parallel(lambda e: read_bytes(join(ann_dir, f"{e[1]}.xml"), options), entries, remote)
    semantic = _names_in(join(root, "SegmentationClass"), options, ".png") or set()
    augmented = (_names_in(join(root, "SegmentationClassAug"), options, ".png") or set()) - semantic
    instance = _names_in(join(root, "SegmentationObject"), options, ".png") or set()

    records = []
    for (lineno, image_id), xml_bytes in zip(entries, xmls):
        where = f"{ann_dir}/{image_id}.xml"
        names = _voc_names(xml_bytes, where)
        try:
            ids = vocabulary.ids_of(names)
        except UnknownClassError as exc:
            raise UnknownClassError(
                f"{split_file} line {lineno} (image {image_id}, annotation {where}): {exc}", exc.name, exc.suggestions
            ) from None
        records.append(
            ImageRecord(
                image_id,
                join(root, "JPEGImages", f"{image_id}.jpg"),
                ids,
                join(root, "SegmentationClass", f"{image_id}.png") if image_id in semantic else (
                    join(root, "SegmentationClassAug", f"{image_id}.png") if image_id in augmented else None),
                join(root, "SegmentationObject", f"{image_id}.png") if image_id in instance else None,
                lineno,
            )
        )
    if check_exists:
        jpegs = _names_in(join(root, "JPEGImages"), options, ".jpg") or set()
        missing = [r.image_id for r in records if r.image_id not in jpegs]
        if missing:
            raise MissingImageError(
                f"PASCAL VOC {root}: {len(missing)} of {len(records)} images in split {split!r} are missing "
                f"from {join(root, 'JPEGImages')}: {_listing(missing)}",
                missing,
            )
    return records, vocabulary


def read_voc_masks(
    semantic_bytes: bytes | None, instance_bytes: bytes | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """VOC ground truth from ``SegmentationClass`` / ``SegmentationObject`` PNG bytes.

    Values are the PNGs' palette indices (not colours). Semantic: (H, W) uint8 with 0 background,
    1..20 classes and 255 (object boundaries / difficult regions) kept as the ignore value.
    Instances: (H, W) int32 with 0 background, 1..K instance ids, boundary 255 mapped to 0.
    Either argument may be ``None`` (its result is then ``None``).
    """
    from .decode import ImageDecodeError, decode_png

    def indices(data: bytes, what: str) -> np.ndarray:
        try:
            return decode_png(data)
        except ImageDecodeError as exc:
            raise ImageDecodeError(exc.reason, f"VOC {what} PNG: {exc.message} (expected a palette PNG)") from None

    semantic = indices(semantic_bytes, "SegmentationClass") if semantic_bytes is not None else None
    instance = None
    if instance_bytes is not None:
        raw = indices(instance_bytes, "SegmentationObject")
        instance = raw.astype(np.int32)
        instance[raw == 255] = 0
    if semantic is not None and instance is not None and semantic.shape != instance.shape:
        raise ValueError(f"VOC masks disagree in size: semantic {semantic.shape}, instance {instance.shape}")
    return semantic, instance


# --------------------------------------------------------------------------------------
# the built-in synthetic set

_PAIR_FIELDS = ("image_size", "object_size", "mark_fraction", "num_distractors", "num_background_blobs")


def _config_query(config: "SyntheticConfig") -> str:
    from .synthetic import SyntheticConfig

    default = SyntheticConfig()
    items = []
    for f in dataclasses.fields(SyntheticConfig):
        if f.name in ("seed",):
            continue
        value = getattr(config, f.name)
        if value != getattr(default, f.name):
            items.append((f.name, "x".join(repr(v) for v in value) if f.name in _PAIR_FIELDS else repr(value)))
    return urlencode(items)


def synthetic_uri(config: "SyntheticConfig", index: int) -> str:
    """``synthetic://{seed}/{index}``, plus ``?field=value&...`` for every setting that differs
    from the default :class:`SyntheticConfig`, so the URI alone regenerates the image."""
    query = _config_query(config)
    return f"synthetic://{int(config.seed)}/{int(index)}" + (f"?{query}" if query else "")


def _coerce_config(values: dict[str, str], what: str) -> "SyntheticConfig":
    from .synthetic import SyntheticConfig

    fields = {f.name: f for f in dataclasses.fields(SyntheticConfig)}
    default = SyntheticConfig()
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in fields:
            raise ValueError(f"{what}: unknown setting {key!r}; settings: {', '.join(fields)}")
        template = getattr(default, key)
        try:
            if isinstance(template, tuple):
                items = [s for s in re.split(r"[x,:]", raw.strip()) if s]
                if len(items) == 1 and key == "image_size":
                    items = items * 2
                if len(items) != 2:
                    raise ValueError("expected two values like 128x128")
                kind = type(template[0])
                kwargs[key] = tuple(kind(float(s)) if kind is int and float(s).is_integer() else kind(s) for s in items)
            elif isinstance(template, bool):
                kwargs[key] = raw.strip().lower() in ("1", "true", "yes")
            elif isinstance(template, int):
                kwargs[key] = int(raw)
            else:
                kwargs[key] = float(raw)
        except ValueError as exc:
            raise ValueError(f"{what}: bad value {raw!r} for {key}: {exc}") from None
    try:
        return SyntheticConfig(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


@functools.lru_cache(maxsize=64)
def _parse_synthetic_uri(uri: str) -> tuple["SyntheticConfig", int]:
    m = re.fullmatch(r"synthetic://(-?\d+)/(\d+)(?:\?(.*))?", uri.strip())
    if not m:
        raise ValueError(f"not a synthetic image URI: {uri!r} (expected synthetic://<seed>/<index>[?settings])")
    seed, index, query = int(m.group(1)), int(m.group(2)), m.group(3) or ""
    values = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    if "seed" in values:
        raise ValueError(f"{uri!r}: the seed belongs in the URI's host part, not its query")
    values["seed"] = str(seed)
    return _coerce_config(values, uri), index


def load_synthetic(uri: str) -> "SyntheticSample":
    """Generate the sample a ``synthetic://`` URI names (deterministic, any worker)."""
    from .synthetic import generate_sample

    config, index = _parse_synthetic_uri(uri)
    if index >= config.num_images:
        raise ValueError(f"{uri!r}: index {index} is out of range for a set of {config.num_images} images")
    return generate_sample(config, index)


def synthetic_records(config: "SyntheticConfig | None" = None) -> tuple[list[ImageRecord], ClassVocabulary]:
    """The built-in synthetic set as records (``uri`` = :func:`synthetic_uri`).

    Each sample is generated once to learn which classes it holds (a few ms per 128 px image);
    the ground-truth masks are available through :func:`load_synthetic`, so no ``semantic_uri``.
    """
    from .synthetic import SyntheticConfig, class_names, generate_sample

    config = config if config is not None else SyntheticConfig()
    vocabulary = ClassVocabulary(class_names(config.num_classes))
    records = []
    for index in range(int(config.num_images)):
        sample = generate_sample(config, index)
        records.append(
            ImageRecord(sample.image_id, synthetic_uri(config, index), tuple(int(c) for c in sample.classes),
                        source_row=index + 1)
        )  # fmt: skip
    return records, vocabulary


def builtin_spec(config: "SyntheticConfig") -> str:
    """The ``builtin:key=value,...`` spec of ``config`` (inverse of :func:`parse_builtin_spec`)."""
    from .synthetic import SyntheticConfig

    default, items = SyntheticConfig(), []
    for f in dataclasses.fields(SyntheticConfig):
        value = getattr(config, f.name)
        if value != getattr(default, f.name):
            items.append(f"{f.name}={'x'.join(str(v) for v in value) if f.name in _PAIR_FIELDS else value}")
    return "builtin" + (":" + ",".join(items) if items else "")


def parse_builtin_spec(spec: str) -> "SyntheticConfig":
    """``builtin`` / ``builtin:num_images=64,seed=0,image_size=96x96`` -> SyntheticConfig.

    Settings are :class:`~irnet_ray.data.synthetic.SyntheticConfig` fields separated by ``,``;
    pairs are written ``AxB`` (``image_size=96`` means ``96x96``).
    """
    m = re.fullmatch(r"\s*(?:builtin|synthetic)(?::(.*))?\s*", spec, re.DOTALL)
    if not m:
        raise ValueError(f"not a built-in data set spec: {spec!r} (expected builtin:key=value,...)")
    body = (m.group(1) or "").strip()
    values: dict[str, str] = {}
    if body:
        for item in body.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"built-in data set spec {spec!r}: expected key=value, got {item.strip()!r}")
            values[key.strip()] = value.strip()
    return _coerce_config(values, f"built-in data set spec {spec!r}")


# --------------------------------------------------------------------------------------
# dispatcher


def load_records(
    spec: str,
    options: StorageOptions = StorageOptions(),
    vocabulary: ClassVocabulary | None = None,
    **kwargs: Any,
) -> tuple[list[ImageRecord], ClassVocabulary]:
    """Records of the image set named by ``spec``:

    * ``builtin`` or ``builtin:num_images=64,seed=0,image_size=96x96`` - the synthetic set
      (:func:`parse_builtin_spec`; ``vocabulary`` must be ``None`` or match its classes);
    * ``voc:<root>`` - PASCAL VOC (``split=`` and ``check_exists=`` go to :func:`read_voc`);
    * ``manifest:<uri>`` or a ``.parquet`` / ``.csv`` / ``.jsonl`` / ``.ndjson`` / ``.json`` file
      - :func:`read_manifest` (column names etc. as keyword arguments);
    * ``folder:<root>`` - :func:`read_image_folder`;
    * any other path or URI: a folder holding ``JPEGImages`` and ``ImageSets`` is read as VOC,
      anything else as an ImageNet-style folder tree.
    """
    spec = os.fspath(spec).strip()
    if not spec:
        raise ValueError("image set spec is empty")
    if re.match(r"^(builtin|synthetic)(:(?!//)|$)", spec):
        if kwargs:
            raise TypeError(f"the built-in data set takes no options, got {', '.join(kwargs)}")
        records, vocab = synthetic_records(parse_builtin_spec(spec))
        if vocabulary is not None and vocabulary != vocab:
            raise ValueError(
                f"vocabulary {list(vocabulary.names)} does not match the built-in set's classes {list(vocab.names)}"
            )
        return records, vocab
    if spec.startswith("synthetic://"):
        raise ValueError(
            f"{spec!r} names one synthetic image; for the built-in set write builtin or builtin:key=value,..."
        )
    prefix, sep, rest = spec.partition(":")
    if sep and not rest.startswith("//") and prefix in ("voc", "manifest", "folder"):
        if not rest:
            raise ValueError(f"image set spec {spec!r} needs a path after '{prefix}:'")
        if prefix == "voc":
            root, _, query = rest.partition("?")
            settings = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
            unknown = sorted(set(settings) - {"split"})
            if unknown:
                raise ValueError(f"image set spec {spec!r}: unknown setting(s) {', '.join(unknown)}; "
                                 "write voc:ROOT or voc:ROOT?split=NAME (e.g. train_aug)")  # fmt: skip
            if "split" in settings:
                kwargs = {**kwargs, "split": settings["split"]}
            return read_voc(root, options, vocabulary=vocabulary, **kwargs)
        if prefix == "manifest":
            return read_manifest(rest, options, vocabulary, **kwargs)
        return read_image_folder(rest, options, vocabulary, **kwargs)
    if posixpath.splitext(spec.lower())[1] in _MANIFEST_FORMATS:
        return read_manifest(spec, options, vocabulary, **kwargs)
    if not exists(spec, options):
        raise StorageNotFound(f"image set not found: {spec} (no such file or folder)", spec)
    if exists(join(spec, "JPEGImages"), options) and exists(join(spec, "ImageSets"), options):
        return read_voc(spec, options, vocabulary=vocabulary, **kwargs)
    return read_image_folder(spec, options, vocabulary, **kwargs)
