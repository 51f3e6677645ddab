"""Image sets as Arrow tables, for jobs over millions of images (no Python object per row).

:mod:`.sources` turns every row into an :class:`~.sources.ImageRecord`: right for training and
small sets, but at ImageNet scale (1.28M rows) the driver would hold millions of Python objects
before any work starts. The readers here return one ``pyarrow.Table`` of :data:`IMAGE_TABLE_SCHEMA`
built with ``pyarrow.compute`` (class names -> ids, relative paths, ids from file names), and the
listings they need run in parallel, one request stream per folder.

The readers here run in one process with pyarrow: the driver's path for ``--dry-run`` (no Ray
needed) and for the training jobs. A labeling run reads the same sets with Ray Data instead
(:mod:`irnet_ray.pipeline.inputs`), block by block with the same normalising functions
(:func:`_normalize_chunk`, :func:`add_fingerprints`, :class:`FolderTree`), so that its driver
never holds every row. Here rows are normalised :data:`CHUNK_ROWS` at a time (Parquet is also
read that way), so the reader's intermediate columns stay a few MB instead of several copies of
the table (~100 bytes a row in Arrow: ~130 MB for ImageNet). ``docs/benchmarks.md``
("Labeling: planning") has the figures of both paths.

Class cells are a list column (names, or ids 1..C with a vocabulary) or a string column with
names separated by ``|`` or ``;`` (:data:`CLASS_SEPARATORS`), never by spaces or commas
(``traffic light`` is one class; ``cat|dog`` and ``cat; dog`` two), or a JSON list in a string
cell (``["cat", "traffic light"]``).

Each row also carries the image file's ``fingerprint`` (``"<size>:<mtime ns>"`` from the store's
listing, ``""`` when the store has no such file or the URI is not a file): the labeling job
records it with every committed row, so a rerun can tell that an id now names another file.
Nothing here imports Ray or torch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .sources import (
    _MANIFEST_FORMATS,
    IMAGE_SUFFIXES,
    ClassVocabulary,
    EmptyImageSetError,
    ImageRecord,
    ManifestError,
    UnknownClassError,
    _listing,
    _where,
    records_table,
)
from .storage import StorageNotFound, StorageOptions, _translating, is_s3, normalize, parent, read_bytes, resolve

__all__ = ["CLASS_SEPARATORS", "IMAGE_TABLE_SCHEMA", "read_manifest_table", "read_folder_table", "list_folders",
           "add_fingerprints", "load_table", "table_of_records"]  # fmt: skip

#: The one separator of class names in a string class cell.
#: The separators of class names in a string class cell.
CLASS_SEPARATORS = "|;"
#: Parallel listings (folders of a tree, parents of manifest images).
LIST_THREADS = 32
#: Manifest rows normalised at a time: each string step over all of ImageNet's 1.28M rows would
#: hold ~100 MB of intermediates; over 64k rows, a few MB.
CHUNK_ROWS = 65_536

IMAGE_TABLE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("classes", pa.list_(pa.int32())),
    ("semantic_uri", pa.string()), ("instance_uri", pa.string()), ("source_row", pa.int64()),
    ("fingerprint", pa.string()),
])  # fmt: skip
_LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("fingerprint", pa.string())])


def table_of_records(records: Sequence[ImageRecord]) -> pa.Table:
    """Records given as Python objects (the API's small-set path) as an image table; their
    files' fingerprints are not looked up (``""``: only the URI is compared on a rerun)."""
    table = records_table(records)
    return table.append_column("fingerprint", pa.array([""] * table.num_rows, pa.string()))


# --------------------------------------------------------------------------------------
# listings


def _list_one(folder: str, options: StorageOptions, recursive: bool) -> pa.Table:
    """Files under ``folder`` as (uri, fingerprint); an absent folder lists nothing."""
    if not (is_s3(folder) or folder.startswith("file://") or "://" not in folder):
        return _LISTING_SCHEMA.empty_table()
    fs, path = resolve(folder, options)
    with _translating(folder, options):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    prefix = "s3://" if is_s3(folder) else ("file://" if folder.startswith("file://") else "")
    uris = [prefix + i.path for i in files]
    prints = [f"{i.size}:{i.mtime_ns or 0}" for i in files]
    return pa.table({"uri": pa.array(uris, pa.string()), "fingerprint": pa.array(prints, pa.string())})


def list_folders(folders: Iterable[str], options: StorageOptions, recursive: bool = False) -> pa.Table:
    """Files of every folder as one (uri, fingerprint) table; folders listed in parallel."""
    folders = list(folders)
    if not folders:
        return _LISTING_SCHEMA.empty_table()
    with ThreadPoolExecutor(max_workers=min(LIST_THREADS, len(folders))) as pool:
        parts = list(pool.map(lambda f: _list_one(f, options, recursive), folders))
    return pa.concat_tables(parts)


def _parents(uris: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.replace_substring_regex(uris, pattern=r"/[^/]*$", replacement="")


def add_fingerprints(table: pa.Table, options: StorageOptions) -> pa.Table:
    """``table`` with its ``fingerprint`` column from listings of its images' folders (one
    listing per distinct folder, in parallel; no request per image). Worked :data:`CHUNK_ROWS`
    rows at a time: a column of 1.28M folder names would be ~100 MB."""
    chunks = [table.slice(first, CHUNK_ROWS) for first in range(0, table.num_rows, CHUNK_ROWS)]
    folders: set[str] = set()
    for chunk in chunks:
        uris = chunk.column("uri")
        local_or_s3 = pc.or_(pc.starts_with(uris, "s3://"), pc.invert(pc.match_substring(uris, "://")))
        folders.update(pc.unique(_parents(pc.filter(uris, local_or_s3))).to_pylist())
    listed = list_folders(sorted(f for f in folders if f), options)
    listed_uris, listed_prints = listed.column("uri").combine_chunks(), listed.column("fingerprint").combine_chunks()
    prints = pa.chunked_array([pc.fill_null(pc.take(listed_prints, pc.index_in(chunk.column("uri"),
                                                                               value_set=listed_uris)), "")
                               for chunk in chunks], pa.string())  # fmt: skip
    position = table.schema.get_field_index("fingerprint")
    if position < 0:
        return table.append_column("fingerprint", prints)
    return table.set_column(position, "fingerprint", prints)


# --------------------------------------------------------------------------------------
# class cells


def _class_tokens(cells: pa.ChunkedArray | pa.Array, uri: str, column: str,
                  first_row: int = 1) -> tuple[pa.Array, np.ndarray]:  # fmt: skip
    """Class cells -> (every class token, flattened: trimmed non-empty names or integers; the row of
    each, counted in the cells). ``first_row``: the manifest row of the first cell (for messages)."""
    cells = cells.combine_chunks() if isinstance(cells, pa.ChunkedArray) else cells
    if pa.types.is_null(cells.type):
        cells = pa.array([None] * len(cells), pa.string())
    if pa.types.is_string(cells.type) or pa.types.is_large_string(cells.type):
        cells = pc.utf8_trim_whitespace(pc.fill_null(cells, ""))
        if pc.any(pc.starts_with(cells, "[")).as_py():
            lists = _json_class_cells(cells, uri, column, first_row)
        else:
            lists = pc.split_pattern_regex(cells, f"[{re.escape(CLASS_SEPARATORS)}]")
    elif pa.types.is_list(cells.type) or pa.types.is_large_list(cells.type):
        lists = pc.fill_null(cells, pa.scalar([], cells.type))
    else:
        raise ManifestError(f"manifest {uri}: column {column!r} must hold lists of class names or strings like "
                            f"'cat|dog', got {cells.type}")  # fmt: skip
    flat = pc.list_flatten(lists)
    parents = np.asarray(pc.list_parent_indices(lists), dtype=np.int64)
    if pa.types.is_null(flat.type):
        flat = flat.cast(pa.string())
    if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
        flat = pc.utf8_trim_whitespace(flat)
        keep = pc.and_(pc.is_valid(flat), pc.not_equal(flat, ""))
        flat, parents = pc.filter(flat, keep), parents[np.asarray(pc.fill_null(keep, False))]
    elif not pa.types.is_integer(flat.type):
        raise ManifestError(f"manifest {uri}: column {column!r} holds {flat.type}; expected class names")
    return flat, parents


def _row_where(row: int, first_row: int | None, image: str | None, unknown: str = "") -> str:
    """Where a chunk's ``row`` is, for messages: its manifest row (when ``first_row`` is known)
    and ``image``; ``unknown`` when neither is known."""
    return _where(None if first_row is None else row + first_row, image) or unknown


def _json_class_cells(cells: pa.Array, uri: str, column: str, first_row: int | None) -> pa.Array:
    """String class cells where some hold a JSON list (``["cat", "traffic light"]``): those
    parsed, the others split at :data:`CLASS_SEPARATORS` (in Python: such manifests are rare)."""
    split = re.compile(f"[{re.escape(CLASS_SEPARATORS)}]")
    out = []
    for row, text in enumerate(cells.to_pylist()):
        if not text.startswith("["):
            out.append(split.split(text))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {uri}: {_row_where(row, first_row, None, 'a row')}: column {column!r} holds "
                                f"{text!r}, which starts "
                                f"like a JSON list but is not one ({exc.msg})") from None  # fmt: skip
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ManifestError(f"manifest {uri}: {_row_where(row, first_row, None, 'a row')}: column {column!r}: a JSON "
                                "cell must be a list of "
                                f"class names, got {text!r}")  # fmt: skip
        out.append(value)
    return pa.array(out, pa.list_(pa.string()))


def _class_lists(cells: pa.ChunkedArray, vocabulary: ClassVocabulary, uri: str, column: str,
                 images: pa.ChunkedArray, first_row: int = 1) -> pa.Array:  # fmt: skip
    """Class cells -> sorted unique class ids per row (list<int32>); ``first_row``: the number
    of the first cell's row in the manifest (for messages)."""
    flat, parents = _class_tokens(cells, uri, column, first_row)
    if pa.types.is_integer(flat.type):
        ids = np.asarray(pc.fill_null(flat, 0), dtype=np.int64)
        bad = np.flatnonzero((ids < 1) | (ids > vocabulary.num_classes))
        if len(bad):
            row = int(parents[bad[0]])
            raise UnknownClassError(f"manifest {uri}: {_row_where(row, first_row, images[row].as_py())}: class id "
                                    f"{ids[bad[0]]} out of range 1..{vocabulary.num_classes}", str(ids[bad[0]]))  # fmt: skip
    else:
        index = pc.index_in(flat, value_set=pa.array(vocabulary.names, pa.string()))
        unknown = np.flatnonzero(np.asarray(pc.is_null(index)))
        if len(unknown):
            row = int(parents[unknown[0]])
            try:
                vocabulary.id_of(flat[int(unknown[0])].as_py(), row=None if first_row is None else row + first_row,
                                 image=images[row].as_py())
            except UnknownClassError as exc:
                raise UnknownClassError(f"manifest {uri}: {exc}", exc.name, exc.suggestions) from None
        ids = np.asarray(index, dtype=np.int64) + 1
    # Sorted, unique ids per row (as ImageRecord keeps them): one sort of (row, id) pairs.
    stride = int(vocabulary.num_classes) + 2
    keys = np.unique(parents * stride + ids)
    rows, values = keys // stride, (keys % stride).astype(np.int32)
    offsets = np.searchsorted(rows, np.arange(len(cells) + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def _vocabulary_of(chunks: Iterable[tuple[int, pa.Table]], uri: str, column: str, image_column: str) -> ClassVocabulary:
    """The vocabulary of a manifest read without one: the sorted set of its class names."""
    names: set[str] = set()
    rows = 0
    for first_row, chunk in chunks:
        rows += chunk.num_rows
        flat, parents = _class_tokens(chunk.column(column), uri, column, first_row)
        if pa.types.is_integer(flat.type) and len(flat):
            row = int(parents[0])
            raise ManifestError(f"manifest {uri}: {_where(row + first_row, _text(chunk, image_column)[row].as_py())}: "
                                "class ids (numbers) need a vocabulary; pass vocabulary= or write class names")  # fmt: skip
        if not pa.types.is_integer(flat.type):
            names.update(pc.unique(flat).to_pylist())
    if not rows:
        raise EmptyImageSetError(f"manifest {uri} has no rows")
    if not names:
        raise ManifestError(f"manifest {uri}: no class names in column {column!r} of any row")
    return ClassVocabulary.from_names(names)


# --------------------------------------------------------------------------------------
# manifests


def _unreadable(uri: str, fmt: str, exc: BaseException) -> ManifestError:
    return ManifestError(f"manifest {uri}: not a readable {fmt} table ({' '.join(str(exc).split())[:300]})")


def _parse(data: bytes, fmt: str, uri: str, text_columns: Sequence[str]) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    try:
        if fmt == "csv":
            # Every named column as text: an id column like 0001 must stay "0001".
            types = {c: pa.string() for c in csv_header(data) if c in text_columns}
            return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types=types, strings_can_be_null=True))  # fmt: skip
        if data.lstrip().startswith(b"["):  # one JSON array of objects: small files; parse in Python
            items = json.loads(data)
            if not all(isinstance(item, dict) for item in items):
                raise ValueError("a JSON array manifest must hold one object per image")
            return pa.Table.from_pylist(items)
        return pajson.read_json(io.BytesIO(data))
    except (pa.ArrowInvalid, ValueError) as exc:
        if fmt == "jsonl" and not data.lstrip().startswith(b"["):
            _raise_at_bad_line(data, uri)
        raise _unreadable(uri, fmt, exc) from None


def csv_header(data: bytes) -> list[str]:
    """The column names in the first line of CSV bytes (quoted or not)."""
    line = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    return [c.strip() for c in next(csv.reader([line]), [])]


def _raise_at_bad_line(data: bytes, uri: str) -> None:
    """Name the first line of a JSON Lines manifest that is not a JSON object (pyarrow's
    message counts its own blocks)."""
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {uri}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ManifestError(f"manifest {uri}: line {number} must be a JSON object, got {type(item).__name__}")


def _manifest_chunks(uri: str, fmt: str, options: StorageOptions,
                     wanted: Sequence[str]) -> tuple[list[str], Callable[[], Iterator[tuple[int, pa.Table]]]]:  # fmt: skip
    """(the manifest's column names, a function giving an iterator of (number of the chunk's
    first row, chunk)): its rows :data:`CHUNK_ROWS` at a time, with only the ``wanted`` columns it has. Parquet is
    streamed from the store a row group at a time; CSV and JSON are parsed whole (a column's
    type is inferred from all of its cells: a CSV class column of numbers stays numeric) and
    the file's bytes dropped before the rows are sliced."""
    import pyarrow.parquet as pq

    fs, path = manifest_file(uri, options)
    if fmt == "parquet":
        try:
            with _translating(uri, options):
                reader = pq.ParquetFile(fs.open_input_file(path))
        except (pa.ArrowInvalid, ValueError) as exc:
            raise _unreadable(uri, fmt, exc) from None
        names = reader.schema_arrow.names

        def parquet_chunks() -> Iterator[tuple[int, pa.Table]]:
            first = 1
            try:
                with _translating(uri, options):
                    for batch in reader.iter_batches(batch_size=CHUNK_ROWS, columns=[c for c in wanted if c in names]):
                        yield first, pa.Table.from_batches([batch])
                        first += batch.num_rows
            except (pa.ArrowInvalid, ValueError) as exc:
                raise _unreadable(uri, fmt, exc) from None

        return names, parquet_chunks
    data = read_bytes(uri, options)
    if not data.strip():
        raise EmptyImageSetError(f"manifest {uri} is empty (no rows)")
    table = _parse(data, fmt, uri, wanted)
    del data
    names = table.column_names
    table = table.select([c for c in wanted if c in names])

    def table_chunks() -> Iterator[tuple[int, pa.Table]]:
        for first in range(0, table.num_rows, CHUNK_ROWS):
            yield first + 1, table.slice(first, CHUNK_ROWS)

    return names, table_chunks


def manifest_format(uri: str) -> str:
    """``"parquet"``, ``"csv"`` or ``"jsonl"`` from the manifest's file name; others raise."""
    fmt = _MANIFEST_FORMATS.get(posixpath.splitext(uri.lower().rstrip("/"))[1])
    if fmt is None:
        raise ManifestError(f"manifest {uri}: unsupported file type; use .parquet, .csv, .jsonl (or .json)")
    return fmt


def manifest_file(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """(file system, path) of the manifest at ``uri``, checked: a file (not absent, not a
    folder) with some bytes."""
    fs, path = resolve(uri, options)
    with _translating(uri, options):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        if info.type == pafs.FileType.Directory:
            raise IsADirectoryError(path)
    if not info.size:
        raise EmptyImageSetError(f"manifest {uri} is empty (no rows)")
    return fs, path


def check_manifest_columns(uri: str, names: Sequence[str], image_column: str, classes_column: str) -> None:
    """Raise naming the required columns ``names`` lacks (and the columns there are)."""
    missing = [c for c in (image_column, classes_column) if c not in names]
    if missing:
        raise ManifestError(f"manifest {uri}: missing required column(s) {', '.join(map(repr, missing))}; found "
                            f"columns: {', '.join(map(repr, names)) or '(none)'}; pass image_column= / "
                            "classes_column= to use other names")  # fmt: skip


def _text(table: pa.Table, column: str) -> pa.Array:
    values = table.column(column).combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.string()) if not pa.types.is_null(values.type) else pa.nulls(len(values), pa.string())
    return pc.utf8_trim_whitespace(values)


def _resolve_paths(paths: pa.Array, base: str) -> pa.Array:
    """:func:`~irnet_ray.data.storage.resolve_relative` on a column: URIs and absolute paths
    stay, others are joined onto ``base`` (``..`` is left to the store, as object keys keep it)."""
    relative = pc.and_(pc.invert(pc.match_substring(paths, "://")),
                       pc.invert(pc.starts_with(paths, "/")))  # fmt: skip
    relative = pc.and_(relative, pc.invert(pc.starts_with(paths, "~")))
    stripped = pc.replace_substring_regex(paths, pattern=r"^(\./)+", replacement="")
    joined = pc.binary_join_element_wise(pa.scalar(base.rstrip("/")), stripped, "/")
    return pc.if_else(relative, joined, paths)


def read_manifest_table(
    uri: str,
    options: StorageOptions = StorageOptions(),
    vocabulary: ClassVocabulary | None = None,
    *,
    image_column: str = "image",
    classes_column: str = "classes",
    id_column: str = "image_id",
    semantic_column: str = "semantic",
    instance_column: str = "instance",
) -> tuple[pa.Table, ClassVocabulary]:
    """The manifest at ``uri`` as an image table (columns as :func:`~.sources.read_manifest`;
    class cells as in the module doc). Repeated ids are kept (the labeling job refuses them per
    row). Mistakes of the whole table (missing columns, an empty image cell, an unknown class)
    raise as :func:`~.sources.read_manifest` does, naming the first row.

    Rows are normalised :data:`CHUNK_ROWS` at a time (:func:`_manifest_chunks`), so the reader
    holds its result, the manifest's rows (none of them for Parquet) and one chunk's
    intermediates; without a ``vocabulary`` the class column is read once more first."""
    uri = os.fspath(uri)
    fmt = manifest_format(uri)
    wanted = (image_column, id_column, classes_column, semantic_column, instance_column)
    names, chunks = _manifest_chunks(uri, fmt, options, wanted)
    check_manifest_columns(uri, names, image_column, classes_column)
    if vocabulary is None:
        vocabulary = _vocabulary_of(chunks(), uri, classes_column, image_column)
    base = parent(uri)
    out = [_normalize_chunk(chunk, first, uri, base, vocabulary, wanted) for first, chunk in chunks()]
    if not sum(part.num_rows for part in out):
        raise EmptyImageSetError(f"manifest {uri} has no rows")
    table = pa.concat_tables(out)
    # Where the ids came from, for the messages of readers that refuse repeated ids.
    return table.replace_schema_metadata({"ids": "column" if id_column in names else "file names"}), vocabulary


def _normalize_chunk(table: pa.Table, first_row: int | None, uri: str, base: str, vocabulary: ClassVocabulary,
                     columns: Sequence[str]) -> pa.Table:  # fmt: skip
    """Manifest rows ``first_row``.. (``columns``: image, id, classes, semantic, instance) as an
    image table chunk; mistakes raise naming the row (``first_row`` ``None``: a block read by Ray
    Data, whose place in the manifest is not known: mistakes name the image, ``source_row`` null)."""
    image_column, id_column, classes_column, semantic_column, instance_column = columns
    images = _text(table, image_column)
    empty = np.flatnonzero(np.asarray(pc.fill_null(pc.equal(images, ""), True)))
    if len(empty):
        raise ManifestError(f"manifest {uri}: {_row_where(int(empty[0]), first_row, None, 'a row')}: column "
                            f"{image_column!r} must hold an image path, got "
                            f"{table.column(image_column)[int(empty[0])].as_py()!r}")  # fmt: skip
    if id_column in table.column_names:
        ids = _text(table, id_column)
        blank = np.flatnonzero(np.asarray(pc.fill_null(pc.equal(ids, ""), True)))
        if len(blank):
            raise ManifestError(f"manifest {uri}: {_row_where(int(blank[0]), first_row, images[int(blank[0])].as_py())}: "
                                f"column {id_column!r} is empty")  # fmt: skip
    else:
        name = pc.replace_substring_regex(images, pattern=r"^.*/", replacement="")
        ids = pc.replace_substring_regex(name, pattern=r"(.)\.[^.]*$", replacement=r"\1")
    classes = _class_lists(table.column(classes_column), vocabulary, uri, classes_column, images, first_row)
    ground_truth = []
    for column in (semantic_column, instance_column):
        if column in table.column_names:
            paths = _text(table, column)
            paths = pc.if_else(pc.equal(paths, ""), pa.scalar(None, pa.string()), paths)
            ground_truth.append(_resolve_paths(paths, base))
        else:
            ground_truth.append(pa.nulls(table.num_rows, pa.string()))
    rows = (pa.nulls(table.num_rows, pa.int64()) if first_row is None
            else pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64)))
    return pa.Table.from_arrays(
        [ids, _resolve_paths(images, base), classes, ground_truth[0], ground_truth[1], rows,
         pa.array([""] * table.num_rows, pa.string())], schema=IMAGE_TABLE_SCHEMA,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# ImageNet-style folder trees


def read_folder_table(uri: str, options: StorageOptions = StorageOptions(),
                      vocabulary: ClassVocabulary | None = None) -> tuple[pa.Table, ClassVocabulary]:  # fmt: skip
    """``root/<class_name>/<images>`` as an image table: files ending in an image suffix (any
    case) below a class folder, nothing whose path has a component starting with ``.``; the
    class of the top folder; id ``<class>/<path below it, no suffix>``. Each class folder is
    listed in parallel, and the listing gives the files' fingerprints. Images directly under
    the root raise; so does a root that does not exist. The reader of
    :func:`~.sources.read_image_folder` too."""
    tree = folder_tree(uri, options)
    listed = list_folders(tree.class_folders(), options, recursive=True)
    listed, below = tree.images(listed)
    if listed.num_rows == 0:
        raise tree.empty_error()
    if vocabulary is None:  # the classes that have images
        vocabulary = ClassVocabulary.from_names(pc.unique(tree.class_names(below)).to_pylist())
    out = tree.rows(listed, vocabulary, below)
    return out.sort_by([("uri", "ascending")]), vocabulary


@dataclasses.dataclass(frozen=True)
class FolderTree:
    """An ImageNet-style tree whose top level was listed (:func:`folder_tree`): its class
    folders are listed separately (in threads here, in Ray tasks by the labeling job) and
    their listings turned into image rows by :meth:`rows`."""

    uri: str
    prefix: str  # "s3://", "file://" or ""
    path: str  # the root as the store names it
    classes: tuple[str, ...]

    def class_folders(self, classes: Sequence[str] | None = None) -> list[str]:
        return [self.prefix + f"{self.path.rstrip('/')}/{c}" for c in (self.classes if classes is None else classes)]

    def images(self, listed: pa.Table) -> tuple[pa.Table, pa.Array]:
        """(the image files of a listing, their paths below the root)."""
        listed = listed.combine_chunks()
        uris = listed.column("uri").combine_chunks()
        below = pc.utf8_slice_codeunits(uris, len(self.prefix) + len(self.path.rstrip("/")) + 1)
        suffixes = "|".join(s.replace(".", r"\.") for s in IMAGE_SUFFIXES)
        keep = pc.and_(pc.invert(pc.match_substring_regex(below, r"(^|/)\.")),
                       pc.match_substring_regex(below, "(?i)(" + suffixes + ")$"))  # fmt: skip
        return listed.filter(keep), pc.filter(below, keep)

    @staticmethod
    def class_names(below: pa.Array) -> pa.Array:
        return pc.replace_substring_regex(below, pattern=r"/.*$", replacement="")

    def rows(self, listed: pa.Table, vocabulary: ClassVocabulary, below: pa.Array | None = None) -> pa.Table:
        """Listed files (:func:`list_folders` of class folders) -> image rows (unsorted); a class
        folder with images whose name is not in ``vocabulary`` raises. ``below``: the listing is
        already :meth:`images`, and these are its paths below the root."""
        if below is None:
            listed, below = self.images(listed)
        names = self.class_names(below)
        for name in pc.unique(names).to_pylist():
            if name not in vocabulary:
                try:
                    vocabulary.id_of(name)
                except UnknownClassError as exc:
                    raise UnknownClassError(f"image folder {self.uri}: class folder {name!r}: {exc}", exc.name,
                                            exc.suggestions) from None  # fmt: skip
        ids = pc.cast(pc.add(pc.index_in(names, value_set=pa.array(vocabulary.names, pa.string())), 1), pa.int32())
        classes_column = pa.ListArray.from_arrays(pa.array(np.arange(listed.num_rows + 1, dtype=np.int32)), ids)
        image_ids = pc.replace_substring_regex(below, pattern=r"\.[^./]*$", replacement="")
        nulls = pa.nulls(listed.num_rows, pa.string())
        return pa.Table.from_arrays([image_ids, listed.column("uri"), classes_column, nulls, nulls,
                                     pa.nulls(listed.num_rows, pa.int64()), listed.column("fingerprint")],
                                    schema=IMAGE_TABLE_SCHEMA)  # fmt: skip

    def empty_error(self) -> EmptyImageSetError:
        return EmptyImageSetError(f"no images in {self.uri} (expected {self.uri}/<class_name>/<image> with suffix "
                                  f"{', '.join(IMAGE_SUFFIXES)})")  # fmt: skip


def folder_tree(uri: str, options: StorageOptions = StorageOptions()) -> FolderTree:
    """The top level of an ImageNet-style tree (:func:`read_folder_table`), checked: the root
    exists and no image lies directly under it."""
    root = normalize(os.fspath(uri))
    fs, path = resolve(root, options)
    with _translating(root, options):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise StorageNotFound(f"image folder not found: {uri} (no such folder)", uri)
        top = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    prefix = "s3://" if is_s3(root) else ("file://" if root.startswith("file://") else "")
    loose = [i.base_name for i in top if i.type == pafs.FileType.File and i.base_name.lower().endswith(IMAGE_SUFFIXES)
             and not i.base_name.startswith(".")]  # fmt: skip
    if loose:
        raise ManifestError(f"image folder {uri}: {len(loose)} image(s) directly under the root have no class folder: "
                            f"{_listing(sorted(loose))}; expected {uri}/<class_name>/<image>")  # fmt: skip
    classes = sorted(i.base_name for i in top if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
    return FolderTree(uri=str(uri), prefix=prefix, path=path, classes=tuple(classes))


# --------------------------------------------------------------------------------------
# dispatcher


def load_table(spec: str, options: StorageOptions = StorageOptions(), vocabulary: ClassVocabulary | None = None,
               **kwargs: Any) -> tuple[pa.Table, ClassVocabulary] | None:  # fmt: skip
    """The image table of ``spec`` for the sources that have a columnar reader (manifests:
    ``manifest:URI`` or a table file; ImageNet-style folders: ``folder:ROOT``), with the
    images' fingerprints; ``None`` for the others (built-in, VOC, bare folders), which the
    caller reads with :func:`~.sources.load_records` (small sets)."""
    source = columnar_source(spec)
    if source is None:
        return None
    kind, uri = source
    if kind == "folder":
        return read_folder_table(uri, options, vocabulary)
    table, vocabulary = read_manifest_table(uri, options, vocabulary, **kwargs)
    return add_fingerprints(table, options), vocabulary


def columnar_source(spec: str) -> tuple[str, str] | None:
    """``("folder", ROOT)`` or ``("manifest", URI)`` for the image-set specs that have a columnar
    reader (here, and by Ray Data in :mod:`irnet_ray.pipeline.inputs`); ``None`` for the others."""
    spec = os.fspath(spec).strip()
    prefix, sep, rest = spec.partition(":")
    if sep and not rest.startswith("//") and prefix in ("folder", "manifest"):
        return prefix, rest
    if posixpath.splitext(spec.lower())[1] in _MANIFEST_FORMATS and not spec.startswith(("builtin", "voc:")):
        return "manifest", spec
    return None
