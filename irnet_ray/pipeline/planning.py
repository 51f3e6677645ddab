"""Which input rows a run sends, computed on Arrow columns (no Python object per input row).

Both jobs (labeling, relation mining) plan here, on image tables (:mod:`irnet_ray.data.columnar`):
refusals per row (``duplicate_id``, ``no_classes``, ``class_out_of_range``, as error rows),
committed keys removed by an anti-join (``pc.is_in``), and one more check: a committed key whose input now names another
file (another URI, or the same URI with another size or modification time) is *changed*: the
job refuses the run or, asked to, relabels it (:meth:`.commit_log.Committer.withdraw`).

Keys are (image id, occurrence), written ``"<id>\\x1f<occurrence>"`` as one string column.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from irnet_ray.data import output_format as of
from irnet_ray.data.storage import StorageNotFound, StorageOptions, exists, join

from .commit_log import COMMITS, COMMITTED_SCHEMA, committed_table, read_commit_log, transient_errors

__all__ = ["Plan", "plan_table", "read_committed", "committed_table", "key_column", "COMMITTED_SCHEMA"]

_KEY_SEPARATOR = "\x1f"
#: Rows of an image table checked for changed files at a time (:func:`plan_table`).
CHECK_ROWS = 65_536

@dataclasses.dataclass
class Plan:
    """What a run would do: ``pending`` rows (image table), ``errors`` (input refusals as error
    rows), ``skipped`` (committed and unchanged), ``changed`` (committed keys whose file changed:
    image_id, occurrence, uri (now), old_uri, fingerprint (now), old_fingerprint)."""

    pending: pa.Table
    errors: list[dict]
    skipped: int
    changed: pa.Table
    #: ``[image_id, occurrence, uri, fingerprint]`` of each error row (for its commit record).
    inputs: list = dataclasses.field(default_factory=list)

    @property
    def to_send(self) -> int:
        return self.pending.num_rows

    @property
    def rows(self) -> int:
        """Input rows: each is pending, refused, skipped or changed."""
        return self.pending.num_rows + len(self.errors) + self.skipped + self.changed.num_rows

    def send(self) -> pa.Table:
        """The rows to send through the pipeline."""
        return self.pending

    def expected(self) -> pa.Array:
        """Keys the output holds when the run is done: those of the sent rows and the refusals."""
        return pa.concat_arrays([
            key_column(self.pending.column("image_id").combine_chunks(), pa.array([0] * self.pending.num_rows, pa.int64())),
            key_column(pa.array([e["image_id"] for e in self.errors], pa.string()),
                       pa.array([e["occurrence"] for e in self.errors], pa.int64())),
        ])  # fmt: skip

    @property
    def refused(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(e["reason"] for e in self.errors).items()))


def key_column(image_ids, occurrences) -> pa.Array:
    """``"<id>\\x1f<occurrence>"`` per row."""
    occurrences = pc.cast(occurrences, pa.string())
    return pc.binary_join_element_wise(image_ids, occurrences, _KEY_SEPARATOR)


def _occurrences(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(times each row's id is listed, the row's occurrence 0..k-1 among them), vectorised."""
    codes = np.asarray(pc.dictionary_encode(ids).indices, dtype=np.int64)
    counts = np.bincount(codes)
    listed = counts[codes]
    occurrence = np.zeros(len(codes), dtype=np.int64)
    repeated = np.flatnonzero(listed > 1)
    if len(repeated):
        order = repeated[np.argsort(codes[repeated], kind="stable")]
        group = codes[order]
        starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
        position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        occurrence[order] = position
    return listed, occurrence


def plan_table(table: pa.Table, committed: pa.Table, num_classes: int, run_id: str) -> Plan:
    """The plan of image table ``table`` against the ``committed`` keys (:func:`committed_table`).
    Changed keys are reported in :attr:`Plan.changed` and neither skipped nor pending: the job
    decides (refuse, or withdraw them and call this again)."""
    ids = table.column("image_id").combine_chunks()
    listed, occurrence = _occurrences(ids)
    keys = key_column(ids, pa.array(occurrence))
    committed_keys = key_column(committed.column("image_id"), committed.column("occurrence"))
    # One hash lookup gives both whether a row is committed and which committed row it is.
    at = pc.index_in(keys, value_set=committed_keys)
    done_mask = pc.is_valid(at)
    done = np.asarray(done_mask, dtype=bool)

    schema = pa.schema([("image_id", pa.string()), ("occurrence", pa.int64()), ("uri", pa.string()),
                        ("old_uri", pa.string()), ("fingerprint", pa.string()), ("old_fingerprint", pa.string())])  # fmt: skip
    # Committed rows whose file changed, looked for CHECK_ROWS rows at a time: a rerun of ImageNet
    # would otherwise copy its URIs and fingerprints (~200 MB) to compare them.
    parts = []
    for start in range(0, table.num_rows, CHECK_ROWS):
        part = slice(start, start + CHECK_ROWS)
        if not done[part].any():
            continue
        mask = pa.array(done[part])
        rows = pc.filter(at.slice(part.start, CHECK_ROWS), mask)
        uri = pc.filter(table.column("uri").slice(part.start, CHECK_ROWS), mask)
        now_print = pc.filter(table.column("fingerprint").slice(part.start, CHECK_ROWS), mask)
        old_uri, old_print = committed.column("uri").take(rows), committed.column("fingerprint").take(rows)
        other_file = pc.not_equal(uri, old_uri)
        both_known = pc.and_(pc.not_equal(pc.fill_null(old_print, ""), ""), pc.not_equal(now_print, ""))
        other_print = pc.and_(both_known, pc.not_equal(now_print, pc.fill_null(old_print, "")))
        is_changed = pc.fill_null(pc.and_(pc.is_valid(old_uri), pc.or_(other_file, other_print)), False)
        if pc.any(is_changed).as_py():
            now = pa.table({"image_id": pc.filter(ids.slice(part.start, CHECK_ROWS), mask),
                            "occurrence": pa.array(occurrence[part][done[part]]), "uri": uri, "old_uri": old_uri,
                            "fingerprint": now_print, "old_fingerprint": old_print})  # fmt: skip
            parts.append(now.filter(is_changed).cast(schema))
    changed = pa.concat_tables(parts).sort_by([("image_id", "ascending")]) if parts else schema.empty_table()

    # Refusals of the rows that are not committed.
    classes = table.column("classes")
    lengths = np.asarray(pc.fill_null(pc.list_value_length(classes), 0), dtype=np.int64)
    values = np.asarray(pc.fill_null(pc.list_flatten(classes), 0), dtype=np.int64)
    ends = np.cumsum(lengths)
    highest = np.where(lengths > 0, values[np.maximum(ends - 1, 0)] if len(values) else 0, 0)
    reasons = np.full(table.num_rows, 0, dtype=np.int8)  # 0 pending, 1 duplicate, 2 no classes, 3 out of range
    reasons[highest > int(num_classes)] = 3
    reasons[lengths == 0] = 2
    reasons[listed > 1] = 1
    open_rows = ~done
    errors, inputs = [], []
    for row in np.flatnonzero(open_rows & (reasons > 0)):
        row = int(row)
        image_id = ids[row].as_py()
        if reasons[row] == 1:
            reason = "duplicate_id"
            message = f"image id {image_id!r} is listed {listed[row]} times (this is row {occurrence[row] + 1} of them)"
        elif reasons[row] == 2:
            reason, message = "no_classes", "the image has no image-level classes: nothing to localise"
        else:
            reason = "class_out_of_range"
            message = f"class id {highest[row]} is outside the models' classes 1..{num_classes}"
        error = of.error_row(image_id=image_id, uri=table.column("uri")[row].as_py(),
                             classes=table.column("classes")[row].as_py() or [], stage="input", reason=reason,
                             message=message, run_id=run_id, occurrence=int(occurrence[row]))  # fmt: skip
        errors.append(error)
        inputs.append([image_id, int(occurrence[row]), error["uri"], table.column("fingerprint")[row].as_py() or ""])
    send = open_rows & (reasons == 0)
    pending = table if send.all() else table.filter(pa.array(send))  # a fresh run sends every row: no copy
    changed_count = changed.num_rows
    return Plan(pending=pending, errors=errors, skipped=int(done.sum()) - changed_count, changed=changed, inputs=inputs)


def read_committed(output: str, options: StorageOptions) -> tuple[pa.Table, int]:
    """(``output``'s committed keys (:func:`committed_table`), transient errors a run would
    retry), read without writing anything: what a dry run plans against."""
    try:
        commits, inputs = read_commit_log(output, options) if exists(join(output, COMMITS), options) else ([], None)
    except StorageNotFound:
        commits, inputs = [], None
    retried = transient_errors(commits)
    committed = committed_table(commits, retried, inputs)
    del commits, inputs  # the log's records are not needed to plan: free them first (ImageNet: ~250 MB)
    pa.default_memory_pool().release_unused()  # and hand the freed pages back before planning allocates again
    return committed, len(retried)
