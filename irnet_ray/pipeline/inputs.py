"""Image sets read by Ray Data and planned block by block: the driver never holds every row.

:func:`read_image_dataset` reads a manifest with Ray Data's own readers (``read_parquet``,
``read_csv``, ``read_json``), or lists an ImageNet-style tree in Ray tasks (a few class folders
per task), and normalises every block exactly as the driver-side readers do
(:func:`~irnet_ray.data.columnar._normalize_chunk`, :func:`~irnet_ray.data.columnar.add_fingerprints`,
:meth:`~irnet_ray.data.columnar.FolderTree.rows`). A mistake of the listing (an unknown class, an
empty image cell, a missing column) raises in its block and comes back to the caller as the
reader's own exception.

:func:`plan_dataset` plans the blocks against the output's committed keys with
:func:`~.planning.plan_table` itself, in two passes over the materialised blocks (held by the
object store, which spills them to disk when they do not fit):

1. each row's 64-bit id hash comes to the driver (8 bytes a row: 10 MB for ImageNet-1k); a hash
   seen more than once marks its rows as *repeat candidates*;
2. each block is planned against the committed keys of its own ids. Rows that are plainly
   pending stay in the blocks; refusals come back as error rows; skipped rows are dropped
   (counted); repeat candidates and committed rows whose file changed come to the driver and are
   planned there together (a repeated id needs all its rows in one place; a hash collision of
   two distinct ids is planned as two unique rows, so collisions cost nothing but a detour).

The driver then holds the hashes, the committed table (the commit log, which it reads anyway)
and the few rows that are not plainly pending. After the run, :meth:`StreamPlan.missing` checks
that every pending key was committed in one more pass over the pending blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from irnet_ray.data import columnar
from irnet_ray.data.columnar import (
    IMAGE_TABLE_SCHEMA,
    FolderTree,
    add_fingerprints,
    folder_tree,
    list_folders,
    load_table,
    table_of_records,
)
from irnet_ray.data.sources import (
    ClassVocabulary,
    EmptyImageSetError,
    ImageRecord,
    ManifestError,
    UnknownClassError,
    is_manifest_spec,
    load_records,
)
from irnet_ray.data.storage import (
    StorageAccessDenied,
    StorageError,
    StorageNotFound,
    StorageOptions,
    StorageUnreachable,
    _translating,
    parent,
)

from .planning import Plan, key_column, plan_table

__all__ = ["HASH_COLUMN", "INPUT_MODES", "ImageSet", "StreamPlan", "id_hashes", "open_image_set", "plan_dataset",
           "read_image_dataset", "reads_with_ray", "reraise_input_error"]  # fmt: skip

HASH_COLUMN = "_id_hash"
_PLAN = "_plan"  # "pending", "refused" (with _detail: the error row and its input) or "driver"
_DETAIL = "_detail"
_PLANNED_SCHEMA = IMAGE_TABLE_SCHEMA.append(pa.field(HASH_COLUMN, pa.uint64())).append(
    pa.field(_PLAN, pa.string())).append(pa.field(_DETAIL, pa.string()))  # fmt: skip
#: Class folders listed by one task.
FOLDERS_PER_TASK = 8
#: The image set's own mistakes: raised from a block as themselves (see :func:`reraise_input_error`).
INPUT_ERRORS = (ManifestError, UnknownClassError, EmptyImageSetError, StorageError)


# --------------------------------------------------------------------------------------
# id hashes


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit polynomial hash of each string (uint64), vectorised over the Arrow buffers.
    Equal strings hash equal; distinct strings rarely collide (a collision only sends both rows
    to the driver's exact planning)."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    ids = ids.cast(pa.large_string())
    if len(ids) == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset : ids.offset + len(ids) + 1]
    data = ids.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    starts = offsets[:-1] - offsets[0]
    position = np.arange(len(raw), dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(int(lengths.max(initial=0)) + 1, 0x100000001B3, dtype=np.uint64))
        terms = (raw.astype(np.uint64) + np.uint64(1)) * powers[position]
        sums = np.zeros(len(ids), np.uint64)
        nonempty = lengths > 0
        if nonempty.any():
            sums[nonempty] = np.add.reduceat(terms, starts[nonempty])
        return sums ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def _with_hash(table: pa.Table) -> pa.Table:
    return table.append_column(HASH_COLUMN, pa.array(id_hashes(table.column("image_id")), pa.uint64()))


# --------------------------------------------------------------------------------------
# reading


def read_image_dataset(spec: str, options: StorageOptions, vocabulary: ClassVocabulary, **columns: str):
    """The image set ``spec`` as a Ray Dataset of image-table rows (plus :data:`HASH_COLUMN`),
    for the sources that have a columnar reader (manifests, ``folder:`` trees; see
    :func:`~irnet_ray.data.columnar.load_table`); ``None`` for the others. Checks that need no
    rows (the file exists, its columns, the tree's top level) raise here; the rows' own mistakes
    raise when the dataset runs."""
    source = columnar.columnar_source(spec)
    if source is None:
        return None
    kind, uri = source
    if kind == "folder":
        return _folder_dataset(folder_tree(uri, options), options, vocabulary)
    return _manifest_dataset(uri, options, vocabulary, **columns)


def _folder_dataset(tree: FolderTree, options: StorageOptions, vocabulary: ClassVocabulary):
    if not tree.classes:
        raise tree.empty_error()
    tasks = -(-len(tree.classes) // FOLDERS_PER_TASK)
    folders = ray.data.from_items([{"folder": c} for c in tree.classes], override_num_blocks=tasks)
    return folders.map_batches(_list_class_folders, batch_size=FOLDERS_PER_TASK, batch_format="pyarrow",
                               fn_kwargs={"tree": tree, "options": options, "vocabulary": vocabulary})  # fmt: skip


def _list_class_folders(batch: pa.Table, tree: FolderTree, options: StorageOptions,
                        vocabulary: ClassVocabulary) -> pa.Table:  # fmt: skip
    listed = list_folders(tree.class_folders(batch.column("folder").to_pylist()), options, recursive=True)
    return _with_hash(tree.rows(listed, vocabulary))


def _manifest_dataset(uri: str, options: StorageOptions, vocabulary: ClassVocabulary, *, image_column: str = "image",
                      classes_column: str = "classes", id_column: str = "image_id", semantic_column: str = "semantic",
                      instance_column: str = "instance"):  # fmt: skip
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    uri = os.fspath(uri)
    fmt = columnar.manifest_format(uri)
    wanted = (image_column, id_column, classes_column, semantic_column, instance_column)
    fs, path = columnar.manifest_file(uri, options)
    with _translating(uri, options):
        if fmt == "parquet":
            try:
                names = pq.read_schema(fs.open_input_file(path)).names
            except (pa.ArrowInvalid, ValueError) as exc:
                raise columnar._unreadable(uri, fmt, exc) from None
            # Only the wanted columns are read: Ray Data pushes the selection down into the reader.
            raw = ray.data.read_parquet(path, filesystem=fs).select_columns([c for c in wanted if c in names])
        elif fmt == "csv":
            with fs.open_input_stream(path) as stream:
                head = stream.read(1 << 16)
            names = columnar.csv_header(head)
            # Every named column as text (as the driver's reader reads them): an id like 0001 stays "0001".
            types = {c: pa.string() for c in names if c in wanted}
            raw = ray.data.read_csv(path, filesystem=fs, convert_options=pacsv.ConvertOptions(
                column_types=types, strings_can_be_null=True))  # fmt: skip
        else:
            names = None  # JSON rows may each name other keys: checked per block
            raw = ray.data.read_json(path, filesystem=fs, file_extensions=None)
    if names is not None:
        columnar.check_manifest_columns(uri, names, image_column, classes_column)
    kwargs = {"uri": uri, "fmt": fmt, "base": parent(uri), "vocabulary": vocabulary, "columns": wanted,
              "options": options}  # fmt: skip
    return raw.map_batches(_normalize_block, batch_size=columnar.CHUNK_ROWS, batch_format="pyarrow", fn_kwargs=kwargs)


def _normalize_block(batch: pa.Table, uri: str, fmt: str, base: str, vocabulary: ClassVocabulary,
                     columns: tuple[str, ...], options: StorageOptions) -> pa.Table:  # fmt: skip
    columnar.check_manifest_columns(uri, batch.column_names, columns[0], columns[2])
    table = columnar._normalize_chunk(batch.select([c for c in columns if c in batch.column_names]), None, uri, base,
                                      vocabulary, columns)  # fmt: skip
    return _with_hash(add_fingerprints(table, options))


def reraise_input_error(exc: BaseException) -> None:
    """Raise the image set's own mistake (:data:`INPUT_ERRORS`) behind a failed Ray Data run as
    itself (a user mistake: its one-line message, not a stack trace); return when there is none
    (the caller re-raises the failure). Ray carries a task's exception to the driver as text
    (Ray Data wraps it in a ``UserCodeException`` whose cause does not travel), so the mistake is
    found by its class name at the start of a line of that text."""
    current, seen = exc, 0
    while current is not None and seen < 8:
        if isinstance(current, INPUT_ERRORS) and not isinstance(current, ray.exceptions.RayError):
            raise current
        current, seen = getattr(current, "cause", None) or current.__cause__, seen + 1
    kinds = {kind.__name__: kind for kind in _INPUT_ERROR_CLASSES}
    for match in _ERROR_LINE.finditer(str(exc)):
        kind = kinds.get(match.group(1))
        if kind is not None:
            raise kind(match.group(2).strip()) from None


_INPUT_ERROR_CLASSES = (UnknownClassError, ManifestError, EmptyImageSetError, StorageNotFound, StorageAccessDenied,
                        StorageUnreachable, StorageError)  # fmt: skip
_ERROR_LINE = re.compile(r"^(?:[\w.]*\.)?(\w+): (.+)$", re.MULTILINE)


# --------------------------------------------------------------------------------------
# planning


@dataclasses.dataclass
class StreamPlan:
    """What a run does, planned by :func:`plan_dataset`: ``pending`` (a Dataset: rows of the
    blocks to send), ``rows`` (input rows), ``block_errors`` / ``block_inputs`` (refusals found
    in the blocks), ``block_skipped``, and ``local``: the :class:`~.planning.Plan` of the rows
    planned in the driver (repeats, changed files), with its ``driver_rows``."""

    pending: Any
    pending_rows: int
    rows: int
    block_errors: list[dict]
    block_inputs: list
    block_skipped: int
    driver_rows: pa.Table
    local: Plan

    @property
    def errors(self) -> list[dict]:
        return self.block_errors + self.local.errors

    @property
    def inputs(self) -> list:
        return self.block_inputs + self.local.inputs

    @property
    def skipped(self) -> int:
        return self.block_skipped + self.local.skipped

    @property
    def changed(self) -> pa.Table:
        return self.local.changed

    @property
    def to_send(self) -> int:
        return self.pending_rows + self.local.pending.num_rows

    @property
    def refused(self) -> dict[str, int]:
        return Plan(pending=IMAGE_TABLE_SCHEMA.empty_table(), errors=self.errors, skipped=0,
                    changed=self.changed).refused  # fmt: skip

    def replan(self, committed: pa.Table, num_classes: int, run_id: str) -> None:
        """Plan the driver's rows again (after changed keys were withdrawn from ``committed``)."""
        self.local = plan_table(self.driver_rows, _committed_of(committed, self.driver_rows), num_classes, run_id)

    def send(self):
        """Every row to send: the blocks' pending rows and the driver's, as one Dataset."""
        ds = self.pending.drop_columns([HASH_COLUMN, _PLAN, _DETAIL])
        if self.local.pending.num_rows:
            ds = ds.union(ray.data.from_arrow(self.local.pending.select(IMAGE_TABLE_SCHEMA.names)))
        return ds

    def expected(self):
        """What :func:`~.run.finish_output` checks: a function of the committed table giving the
        expected keys missing from it (:meth:`missing`; the keys are not all in the driver)."""
        return self.missing

    def expected_in_driver(self) -> pa.Array:
        """Keys of the rows planned in the driver (sent or refused) and of the blocks' refusals."""
        errors = self.errors
        return pa.concat_arrays([
            key_column(self.local.pending.column("image_id").combine_chunks(),
                       pa.array([0] * self.local.pending.num_rows, pa.int64())),
            key_column(pa.array([e["image_id"] for e in errors], pa.string()),
                       pa.array([e["occurrence"] for e in errors], pa.int64())),
        ])  # fmt: skip

    def missing(self, committed: pa.Table) -> pa.Array:
        """Keys that should have been committed and are not (``committed``: the output's
        committed table after the run): the driver's keys checked here, the blocks' pending keys
        in a pass over their blocks."""
        done = key_column(committed.column("image_id"), committed.column("occurrence"))
        expected = self.expected_in_driver()
        lost = [pc.filter(expected, pc.invert(pc.is_in(expected, value_set=done)))]
        done_ref = ray.put(done)
        blocks = self.pending.select_columns(["image_id"]).map_batches(
            _missing_keys, batch_format="pyarrow", fn_kwargs={"done": done_ref})  # fmt: skip
        for batch in blocks.iter_batches(batch_size=None, batch_format="pyarrow"):
            lost.append(batch.column("key").combine_chunks())
        return pa.concat_arrays([a.cast(pa.string()) for a in lost])


def _missing_keys(batch: pa.Table, done) -> pa.Table:
    done = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    keys = key_column(batch.column("image_id"), pa.array(np.zeros(batch.num_rows, np.int64)))
    return pa.table({"key": pc.filter(keys, pc.invert(pc.is_in(keys, value_set=done)))})


def _committed_of(committed: pa.Table, rows: pa.Table) -> pa.Table:
    """The committed keys of ``rows``' ids (the only ones their plan looks at)."""
    if not rows.num_rows or not committed.num_rows:
        return committed.slice(0, 0)
    return committed.filter(pc.is_in(committed.column("image_id"), value_set=rows.column("image_id").combine_chunks()))


def plan_dataset(images, committed: pa.Table, num_classes: int, run_id: str, empty_message: str) -> StreamPlan:
    """Plan ``images`` (:func:`read_image_dataset`) against the ``committed`` keys
    (:func:`~.planning.committed_table`) as :func:`~.planning.plan_table` plans a table, without
    every row in the driver (module doc). ``empty_message``: the error when the set has no rows."""
    images = images.materialize()
    hashes = [np.asarray(b.column(HASH_COLUMN)) for b in _batches(images.select_columns([HASH_COLUMN]))]
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    rows = len(hashes)
    if not rows:
        raise EmptyImageSetError(empty_message)
    values, counts = np.unique(hashes, return_counts=True)
    repeats = values[counts > 1]
    del hashes, values, counts
    committed = committed.select(["image_id", "occurrence", "uri", "fingerprint"])
    planned = images.map_batches(_plan_block, batch_format="pyarrow", batch_size=None,
                                 fn_kwargs={"repeats": repeats, "committed": ray.put(committed),
                                            "num_classes": int(num_classes), "run_id": run_id})  # fmt: skip
    planned = planned.materialize()
    sent = planned.count()
    others = planned.filter(expr=col(_PLAN) != "pending")
    side = [b for b in _batches(others)]
    side = pa.concat_tables(side).cast(_PLANNED_SCHEMA) if side else _PLANNED_SCHEMA.empty_table()
    refused = side.filter(pc.equal(side.column(_PLAN), "refused"))
    driver_rows = side.filter(pc.equal(side.column(_PLAN), "driver")).select(IMAGE_TABLE_SCHEMA.names)
    details = [json.loads(d) for d in refused.column(_DETAIL).to_pylist()]
    local = plan_table(driver_rows, _committed_of(committed, driver_rows), num_classes, run_id)
    pending = planned.filter(expr=col(_PLAN) == "pending")
    return StreamPlan(pending=pending, pending_rows=sent - side.num_rows, rows=rows,
                      block_errors=[d["error"] for d in details], block_inputs=[d["input"] for d in details],
                      block_skipped=rows - sent, driver_rows=driver_rows, local=local)  # fmt: skip


def _batches(ds) -> Iterator[pa.Table]:
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if batch.num_rows:
            yield batch


def _plan_block(batch: pa.Table, repeats: np.ndarray, committed, num_classes: int, run_id: str) -> pa.Table:
    committed = ray.get(committed) if isinstance(committed, ray.ObjectRef) else committed
    batch = batch.cast(IMAGE_TABLE_SCHEMA.append(pa.field(HASH_COLUMN, pa.uint64())))
    to_driver = np.isin(np.asarray(batch.column(HASH_COLUMN)), repeats)
    rest = batch.filter(pa.array(~to_driver)) if to_driver.any() else batch
    plan = plan_table(rest, _committed_of(committed, rest), num_classes, run_id)
    changed = pc.is_in(rest.column("image_id"), value_set=plan.changed.column("image_id").combine_chunks())
    parts = [_tagged(plan.pending, "pending"), _tagged(batch.filter(pa.array(to_driver)), "driver"),
             _tagged(rest.filter(changed), "driver")]  # fmt: skip
    if plan.errors:
        by_id = {e["image_id"]: (e, i) for e, i in zip(plan.errors, plan.inputs)}
        refused = rest.filter(pc.is_in(rest.column("image_id"), value_set=pa.array(list(by_id), pa.string())))
        details = [json.dumps({"error": by_id[i][0], "input": by_id[i][1]}) for i in refused.column("image_id").to_pylist()]
        parts.append(_tagged(refused, "refused", details))
    return pa.concat_tables(parts)


def _tagged(rows: pa.Table, plan: str, details: list[str] | None = None) -> pa.Table:
    rows = rows.select(IMAGE_TABLE_SCHEMA.names + [HASH_COLUMN])
    rows = rows.append_column(_PLAN, pa.array([plan] * rows.num_rows, pa.string()))
    return rows.append_column(_DETAIL, pa.array(details or [None] * rows.num_rows, pa.string()))


# --------------------------------------------------------------------------------------
# a job's image set


#: Where a job reads and plans its image set (``inputs=``): see :func:`reads_with_ray`.
INPUT_MODES = ("auto", "ray", "driver")


def reads_with_ray(images, inputs: str, dry_run: bool = False) -> bool:
    """Whether an image-set spec is read and planned by Ray Data: ``"ray"``, or ``"auto"`` for a
    run (not a dry run, which needs no Ray); never for records given as objects. Only manifests
    and ``folder:`` trees have a Ray Data reader; :func:`open_image_set` reads the others in the
    driver whatever this says."""
    if inputs not in INPUT_MODES:
        raise ValueError(f"inputs must be one of {', '.join(INPUT_MODES)}, got {inputs!r}")
    if not isinstance(images, str) or inputs == "driver":
        return False
    return inputs == "ray" or not dry_run


@dataclasses.dataclass
class ImageSet:
    """A job's image set, held where it is planned: ``table`` (an image table in the driver) or
    ``dataset`` (Ray Data blocks, :func:`read_image_dataset`)."""

    table: pa.Table | None = None
    dataset: Any = None
    empty_message: str = "the image set is empty"

    def plan(self, committed: pa.Table, num_classes: int, run_id: str) -> "Plan | StreamPlan":
        """The set planned against the ``committed`` keys (:func:`~.planning.plan_table` or
        :func:`plan_dataset`; the set's mistakes found in Ray tasks raised as themselves)."""
        if self.dataset is None:
            return plan_table(self.table, committed, num_classes, run_id)
        try:
            return plan_dataset(self.dataset, committed, num_classes, run_id, self.empty_message)
        except EmptyImageSetError:
            raise
        except Exception as exc:
            reraise_input_error(exc)
            raise

    def replan(self, plan: "Plan | StreamPlan", committed: pa.Table, num_classes: int, run_id: str) -> "Plan | StreamPlan":
        """``plan`` after keys were withdrawn from ``committed`` (changed files relabeled)."""
        if isinstance(plan, StreamPlan):
            plan.replan(committed, num_classes, run_id)
            return plan
        return plan_table(self.table, committed, num_classes, run_id)


def open_image_set(images, vocabulary: ClassVocabulary, options: StorageOptions, *, columns=None,
                   with_ray: bool = False, empty_message: str = "the image set is empty") -> ImageSet:  # fmt: skip
    """``images`` (an image-set spec, or :class:`~irnet_ray.data.sources.ImageRecord` objects)
    ready to plan. ``with_ray`` (:func:`reads_with_ray`; Ray must be running): manifests and
    ``folder:`` trees are read by Ray Data. Otherwise, and for the other sources (built-in, VOC,
    records), the set is an image table in the driver: columnar for manifests and trees (no Python
    object per row, fingerprints from listings), from records for the rest (small sets).
    ``columns``: the manifest reader's column arguments (``image_column=`` etc.)."""
    columns = dict(columns or {})
    if isinstance(images, str):
        if columns and not is_manifest_spec(images):
            raise ValueError(f"column names ({', '.join(columns)}) apply to manifest tables; {images!r} is not one")
        if with_ray:
            dataset = read_image_dataset(images, options, vocabulary, **columns)
            if dataset is not None:
                return ImageSet(dataset=dataset, empty_message=empty_message)
        loaded = load_table(images, options, vocabulary, **columns)
        if loaded is not None:
            if loaded[0].num_rows == 0:
                raise EmptyImageSetError(empty_message)
            return ImageSet(table=loaded[0], empty_message=empty_message)
    # Not a manifest or a folder tree (column names were refused above): records, small sets.
    return ImageSet(table=table_of_records(_records(images, vocabulary, options, empty_message)),
                    empty_message=empty_message)  # fmt: skip


def _records(images, vocabulary: ClassVocabulary, options: StorageOptions, empty_message: str) -> list[ImageRecord]:
    if isinstance(images, str):
        # A repeated image id becomes a per-image error (duplicate_id) instead of refusing the
        # whole set, where the source can list one (manifests, folder trees). Sources whose ids
        # are unique by construction (built-in, VOC) take no such option: a TypeError raised
        # before any reading, and a real one raises again on the plain call.
        try:
            records, _ = load_records(images, options, vocabulary=vocabulary, allow_duplicate_ids=True)
        except TypeError:
            records, _ = load_records(images, options, vocabulary=vocabulary)
    else:
        records = list(images)
        if not all(isinstance(r, ImageRecord) for r in records):
            raise TypeError("images must be an image-set spec (str) or a sequence of ImageRecord")
    if not records:
        raise EmptyImageSetError(empty_message)
    return records
