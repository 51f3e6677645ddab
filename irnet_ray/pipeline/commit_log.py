"""The output folder of a batch-inference job: job record, commit log, manifest (no Ray here).

Labeling (pseudo masks) and relation mining (IR labels) write the same kind of folder; only the
data files' columns and the job record's ``format`` differ.

Layout of an output folder (local path or ``s3://`` prefix)::

    _job.json            what is being made with what: format, model ids, settings (first write)
    data/part-*.parquet  the job's rows (labeling: irnet_ray.data.output_format.LABEL_SCHEMA)
    errors/errors-*.parquet  per-image failures (ERROR_SCHEMA), written when the run finishes
    _commits/NNNNNNNN.json   one record per committed data file (its image ids, its errors,
                         its inputs, its score record and stage timings); written by the driver only
    _commits/snapshot-NNNNNNNN.parquet  the records 0..NNNNNNNN in one Parquet file (a
                         compacted copy: a rerun reads it and the records after it)
    _lease/NNNNNNNN.json the running writer's lease (:mod:`.lease`); absent when no run writes
    _manifest.json       written last: the files, counts, settings, models, metrics, timings

Protocol (the driver is the only committer; every write is atomic, see ``storage.write_bytes``):

0. A run first takes the output's lease (:mod:`.lease`): one writing run at a time, a second
   one is refused naming the first; the lease is released when the run ends.
1. A data file is written under a name made from the image ids it holds, then the driver
   creates the next commit record naming it. Commit records are created only if absent
   (:func:`~irnet_ray.data.storage.create_exclusive`): a committer that finds its sequence
   number taken stops (:class:`CommitConflict`), it never replaces another writer's record.
2. The set of committed keys (image id, occurrence) only grows; the driver refuses to commit a
   key twice. A re-delivered file that IS a committed file (same name: same ids) is a duplicate
   and is left alone; a file with committed rows and new ones is rewritten, under another name,
   without the committed rows (:func:`drop_rows`). A file a commit names is never deleted or
   replaced by the driver (until ``overwrite`` clears the whole folder).
3. A file no commit record names is an orphan (a task retried or a job stopped between the two
   writes). Orphans are deleted when the run finishes, but only those this run delivered or
   that are older than the run's lease (:func:`delete_orphans`): never another writer's
   in-flight file.
4. ``_manifest.json`` is written when every input row is committed and every file it lists
   exists. Readers trust only the files it lists; a folder without it is unfinished, whatever
   else it holds.
5. A rerun reads the commit records, skips committed images and processes the rest; a rerun
   with other models or settings is refused unless it starts over (``overwrite``), which
   deletes ``_manifest.json`` first, so the folder is visibly unfinished while it is cleared.
6. The log compacts: every :data:`SNAPSHOT_EVERY` commits and before the manifest, the driver
   writes ``snapshot-NNNNNNNN.parquet``, a copy of records 0..NNNNNNNN (:func:`write_snapshot`).
   A reader takes the newest snapshot it can read and the JSON records after it
   (:func:`read_commit_log`): one GET instead of one per commit. The JSON records stay (they
   are the log; a snapshot is only a faster way to read it): an unreadable snapshot is skipped
   and the records it covers are read one by one.

In memory the per-image ``inputs`` of the records (image id, occurrence, URI, fingerprint: ~90%
of a record's size) are held as one Arrow table (:data:`INPUTS_SCHEMA`), not as Python lists, and
the committed keys as :class:`CommittedKeys` (16 bytes a key): the driver of a rerun over
ImageNet's 1.28M images holds no Python object per image but the ids of the records.
"""

from __future__ import annotations

import collections
import collections.abc
import hashlib
import json
import posixpath
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import content_name, read_batches, read_table, write_table
from irnet_ray.data.storage import (
    StorageError,
    StorageNotFound,
    StorageOptions,
    create_exclusive,
    delete_file,
    exists,
    file_times,
    join,
    list_files,
    read_bytes,
    resolve,
    write_bytes,
)

__all__ = [
    "JOB_RECORD",
    "MANIFEST",
    "COMMITS",
    "DATA",
    "ERRORS",
    "JobInputError",
    "CommitConflict",
    "Committer",
    "OutputState",
    "prepare_output",
    "clear_output",
    "read_commits",
    "read_commit_log",
    "write_snapshot",
    "split_inputs",
    "INPUTS_SCHEMA",
    "COMMITTED_SCHEMA",
    "committed_table",
    "CommittedKeys",
    "files_exist",
    "write_commit",
    "commit_keys",
    "effective_commits",
    "transient_errors",
    "drop_rows",
    "delete_orphans",
    "read_manifest",
    "write_manifest",
    "write_errors_table",
    "committed_files",
]

JOB_RECORD = "_job.json"
MANIFEST = "_manifest.json"
COMMITS = "_commits"
DATA = "data"
ERRORS = "errors"
_COMMIT_NAME = re.compile(r"^(\d{8})\.json$")
_SNAPSHOT_NAME = re.compile(r"^snapshot-(\d{8})\.parquet$")
#: The driver writes a snapshot of the commit log after every this many commits (and before the
#: manifest): a rerun after a crash reads at most this many JSON records one by one.
SNAPSHOT_EVERY = 1000
#: Records a row group of a snapshot holds: read a group at a time (an ImageNet log decoded
#: whole took twice its size again).
_SNAPSHOT_ROW_GROUP = 1000
#: The per-image inputs of commit records (what each committed key was made from), in memory.
INPUTS_SCHEMA = pa.schema([("sequence", pa.int64()), ("image_id", pa.string()), ("occurrence", pa.int64()),
                           ("uri", pa.string()), ("fingerprint", pa.string())])  # fmt: skip
#: The committed keys of an output with what each was made from (``reason`` null: a data row).
COMMITTED_SCHEMA = pa.schema([("image_id", pa.string()), ("occurrence", pa.int64()), ("uri", pa.string()),
                              ("fingerprint", pa.string()), ("reason", pa.string()),
                              ("path", pa.dictionary(pa.int32(), pa.string()))])  # fmt: skip
_READ_THREADS = 16
#: Folders of the output that are not the job's own record (the lease, see :mod:`.lease`).
_NOT_OUTPUT = ("_lease/",)


class JobInputError(ValueError):
    """The job cannot run or finish as asked (the message says why and what to do)."""


class CommitConflict(JobInputError):
    """A commit record this run was about to create exists: another run writes the same output."""


@dataclass
class OutputState:
    """What an output folder already holds when a run starts."""

    job: dict
    #: Commit records in commit order, without their ``inputs`` (those are in :attr:`inputs`).
    commits: list[dict] = field(default_factory=list)
    previous_manifest: dict | None = None
    inputs: pa.Table = field(default_factory=INPUTS_SCHEMA.empty_table)

    @property
    def next_sequence(self) -> int:
        return max((int(c["sequence"]) for c in self.commits), default=-1) + 1


def _json(uri: str, options: StorageOptions) -> dict:
    return json.loads(read_bytes(uri, options).decode("utf-8"))


def _json_default(value):
    if isinstance(value, IdList):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dump(value: dict) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True, allow_nan=False, default=_json_default).encode("utf-8")


class IdList(collections.abc.Sequence):
    """A commit record's ``image_ids`` as read from a snapshot: a slice of one Arrow string
    array, where a list of Python strings would cost ~100 bytes an id (1.28M ids: ~150 MB of
    the driver's memory for a rerun of ImageNet). Reads like the list it replaces."""

    __slots__ = ("array",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, array: pa.Array) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        return self.array[index].to_pylist() if isinstance(index, slice) else self.array[index].as_py()

    def __iter__(self):
        return iter(self.array.to_pylist())

    def __eq__(self, other) -> bool:
        return isinstance(other, collections.abc.Sequence) and not isinstance(other, str) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


def _identity_differences(old: dict, new: dict) -> list[str]:
    differences = []
    for kind in sorted(new["models"]):
        was, now = old.get("models", {}).get(kind, {}), new["models"][kind]
        if was.get("id") != now["id"]:
            differences.append(f"{kind.upper()} model {now['uri']} ({now['id'][:19]}) is not the one used before "
                               f"({was.get('uri')}, {str(was.get('id'))[:19]})")  # fmt: skip
    if old.get("settings_id") != new["settings_id"]:
        changed = sorted(k for k in new["settings"] if old.get("settings", {}).get(k) != new["settings"][k])
        differences.append(f"{new.get('settings_name', 'label')} settings differ ({', '.join(changed) or 'format'})")
    return differences


def prepare_output(output: str, job: dict, options: StorageOptions, overwrite: bool) -> OutputState:
    """Check the folder against ``job`` (models + settings), start over when asked, and return
    what is committed there. Writes ``_job.json`` on a fresh folder (which also proves that the
    output is writable before any work starts)."""
    job_uri = join(output, JOB_RECORD)
    if exists(job_uri, options):
        old = _json(job_uri, options)
        if old.get("format") != job["format"]:
            raise JobInputError(
                f"{job_uri} is not a record of this job ({old.get('format')!r}, expected {job['format']!r}); "
                "choose another output folder"
            )
        differences = _identity_differences(old, job)
        if overwrite:
            clear_output(output, options)
        elif differences:
            raise JobInputError(
                f"output {output} holds labels made differently: {'; '.join(differences)}. "
                "Pass --overwrite (overwrite=True) to delete them and start over, or choose another output folder"
            )
        else:
            manifest = read_manifest(output, options)
            commits, inputs = read_commit_log(output, options)
            return OutputState(job=old, commits=commits, previous_manifest=manifest, inputs=inputs)
    elif exists(output, options):
        prefix = join(output, "")
        files = [f for f in list_files(output, options)
                 if not f[len(prefix):].lstrip("/").startswith(_NOT_OUTPUT)]  # fmt: skip
        if files:
            raise JobInputError(
                f"output folder {output} is not empty and holds no {job['format']} output ({len(files)} file(s), e.g. "
                f"{files[0]}); choose an empty or new folder"
            )
    write_bytes(job_uri, _dump(job), options)
    return OutputState(job=job)


def clear_output(output: str, options: StorageOptions) -> None:
    """Delete an output: the manifest first (the folder then reads as unfinished), then
    the commit log (nothing is committed), then the data, the errors and the job record."""
    delete_file(join(output, MANIFEST), options)
    for folder in (COMMITS, DATA, ERRORS):
        for uri in _listing(join(output, folder), options):
            delete_file(uri, options)
    delete_file(join(output, JOB_RECORD), options)


def _listing(folder: str, options: StorageOptions, suffix: str | None = None) -> list[str]:
    try:
        return list_files(folder, options, suffixes=(suffix,) if suffix else None)
    except StorageNotFound:
        return []


def _parallel_read(uris: list[str], options: StorageOptions) -> list[dict]:
    if len(uris) <= 1:
        return [_json(u, options) for u in uris]
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(uris))) as pool:
        return list(pool.map(lambda u: _json(u, options), uris))


def read_commit_log(output: str, options: StorageOptions) -> tuple[list[dict], pa.Table]:
    """Every commit record of ``output`` in commit order, without its ``inputs``, and the inputs of
    them all as one :data:`INPUTS_SCHEMA` table: the newest readable snapshot and the JSON records
    after it (every JSON record when there is none). Raises if a committed file is gone."""
    records: dict[int, str] = {}
    snapshots: list[tuple[int, str]] = []
    for uri in _listing(join(output, COMMITS), options):
        name = uri.rsplit("/", 1)[-1]
        if match := _COMMIT_NAME.match(name):
            records[int(match.group(1))] = uri
        elif match := _SNAPSHOT_NAME.match(name):
            snapshots.append((int(match.group(1)), uri))
    commits, inputs, covered = [], INPUTS_SCHEMA.empty_table(), -1
    for last, uri in sorted(snapshots, reverse=True):
        try:
            commits, inputs = read_snapshot(uri, options)
            covered = last
            break
        except (StorageError, OSError, pa.ArrowException, ValueError, KeyError, TypeError) as exc:
            # The JSON records are the log; a snapshot only saves reading them one by one.
            warnings.warn(f"commit-log snapshot {uri} is unreadable ({type(exc).__name__}: {exc}); reading the "
                          "records it covers instead", stacklevel=2)  # fmt: skip
    newer = [uri for sequence, uri in sorted(records.items()) if sequence > covered]
    later, later_inputs = split_inputs(sorted(_parallel_read(newer, options), key=lambda c: int(c["sequence"])))
    commits += later
    inputs = pa.concat_tables([inputs, later_inputs]) if later_inputs.num_rows else inputs
    named = [c for c in commits if c.get("file")]
    if named:
        found = files_exist(output, [c["file"]["path"] for c in named], options)
        for commit, there in zip(named, found):
            if not there:
                raise JobInputError(
                    f"output {output} is damaged: {commit['file']['path']} (commit {commit['sequence']}) is missing; "
                    "pass --overwrite (overwrite=True) to start over"
                )
    return commits, inputs


def read_commits(output: str, options: StorageOptions) -> list[dict]:
    """Every commit record of ``output`` in commit order, as written (``inputs`` lists included):
    for tools and tests; jobs use :func:`read_commit_log`, which keeps the inputs columnar."""
    commits, inputs = read_commit_log(output, options)
    return attach_inputs(commits, inputs)


def split_inputs(records: Sequence[dict]) -> tuple[list[dict], pa.Table]:
    """``records`` without their ``inputs`` lists, and those lists as one :data:`INPUTS_SCHEMA` table."""
    columns: dict[str, list] = {name: [] for name in INPUTS_SCHEMA.names}
    light = []
    for position, record in enumerate(records):
        sequence = int(record.get("sequence", position))
        for image_id, occurrence, uri, fingerprint in record.get("inputs") or []:
            for name, value in zip(INPUTS_SCHEMA.names, (sequence, str(image_id), int(occurrence), uri, fingerprint)):
                columns[name].append(value)
        light.append({k: v for k, v in record.items() if k != "inputs"} if "inputs" in record else record)
    return light, pa.table(columns, schema=INPUTS_SCHEMA)


def attach_inputs(records: Sequence[dict], inputs: pa.Table) -> list[dict]:
    """The records with their ``inputs`` lists put back (as :func:`write_commit` writes them)."""
    by_sequence: dict[int, list] = collections.defaultdict(list)
    for row in inputs.to_pylist():
        by_sequence[row["sequence"]].append([row["image_id"], row["occurrence"], row["uri"], row["fingerprint"]])
    return [r if "inputs" in r else {**r, "inputs": by_sequence.get(int(r["sequence"]), [])} for r in records]


def _snapshot_table(commits: Sequence[dict], inputs: pa.Table) -> pa.Table:
    sequences = np.array([int(c["sequence"]) for c in commits], dtype=np.int64)
    if len(sequences) > 1 and not (np.diff(sequences) > 0).all():
        raise ValueError("commit records must be in commit order")
    inputs = inputs.filter(pc.is_in(inputs.column("sequence"), value_set=pa.array(sequences)))
    inputs = inputs.take(pc.sort_indices(inputs.column("sequence")))  # Arrow's sort is stable
    counts = np.bincount(np.searchsorted(sequences, inputs.column("sequence").to_numpy()), minlength=len(sequences))
    fields = INPUTS_SCHEMA.names[1:]
    struct = pa.StructArray.from_arrays([inputs.column(n).combine_chunks() for n in fields], fields=[
        INPUTS_SCHEMA.field(n) for n in fields])  # fmt: skip
    lists = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(counts)], pa.int32()), struct)
    records = [json.dumps({k: v for k, v in c.items() if k != "inputs"}, sort_keys=True, separators=(",", ":"),
                          allow_nan=False, default=_json_default) for c in commits]  # fmt: skip
    return pa.table({"sequence": sequences, "record": pa.array(records, pa.string()), "inputs": lists})


def write_snapshot(output: str, commits: Sequence[dict], inputs: pa.Table, options: StorageOptions) -> str | None:
    """Write ``_commits/snapshot-<last sequence>.parquet``: ``commits`` (every record of the log,
    in commit order, without inputs) with their ``inputs``, one row per record. Returns its
    relative path (``None`` for an empty log). Written whole and atomically, after the records
    it copies: a reader finds either the records alone or the records and a complete snapshot."""
    if not commits:
        return None
    name = f"snapshot-{int(commits[-1]['sequence']):08d}.parquet"
    write_table(join(output, COMMITS), name, _snapshot_table(commits, inputs), options,
                row_group_size=_SNAPSHOT_ROW_GROUP)  # fmt: skip
    return f"{COMMITS}/{name}"


def read_snapshot(uri: str, options: StorageOptions) -> tuple[list[dict], pa.Table]:
    """The records (without inputs) and the inputs table of a snapshot file, read a row group
    (:data:`_SNAPSHOT_ROW_GROUP` records) at a time."""
    commits, parts = [], []
    for table in read_batches(uri, options, _SNAPSHOT_ROW_GROUP):
        records = [json.loads(text) for text in table.column("record").to_pylist()]
        if [int(c["sequence"]) for c in records] != table.column("sequence").to_pylist():
            raise ValueError("its sequence column does not match its records")
        # The group's image ids as one Arrow array, each record holding its slice.
        counts = [len(r.get("image_ids") or ()) for r in records]
        ids = pa.array([str(i) for r in records for i in r.get("image_ids") or ()], pa.string())
        for record, start, count in zip(records, np.cumsum([0] + counts[:-1]), counts):
            if "image_ids" in record:
                record["image_ids"] = IdList(ids.slice(int(start), count))
        commits += records
        lists = table.column("inputs").combine_chunks()
        flat = lists.flatten()
        sequence = pc.take(table.column("sequence").combine_chunks(), pc.list_parent_indices(lists))
        parts.append(pa.Table.from_arrays([sequence] + [flat.field(n) for n in INPUTS_SCHEMA.names[1:]],
                                          schema=INPUTS_SCHEMA))  # fmt: skip
    return commits, pa.concat_tables(parts) if parts else INPUTS_SCHEMA.empty_table()


def files_exist(output: str, paths: list[str], options: StorageOptions) -> list[bool]:
    """Whether each relative ``path`` of ``output`` exists: one listing per folder they are in
    (``data/``: one LIST request per 1,000 files on S3) instead of one HEAD request per file
    (20,000 HEADs for an output of 20,000 commits). A folder that cannot be listed (e.g. a key
    allowed GetObject but not ListBucket) falls back to one check per file, in parallel."""
    folders: dict[str, set[str] | None] = {}
    for folder in {posixpath.dirname(p) for p in paths}:
        uri = join(output, folder) if folder else output
        try:
            fs, path = resolve(uri, options)
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
            folders[folder] = {i.base_name for i in infos if i.type == pafs.FileType.File}
        except (OSError, StorageError):
            folders[folder] = None
    unlisted = [p for p in paths if folders[posixpath.dirname(p)] is None]
    checked: dict[str, bool] = {}
    if unlisted:
        with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(unlisted))) as pool:
            checked = dict(zip(unlisted, pool.map(lambda p: exists(join(output, p), options), unlisted)))
    return [checked[p] if p in checked else posixpath.basename(p) in folders[posixpath.dirname(p)] for p in paths]


def write_commit(output: str, record: dict, options: StorageOptions) -> None:
    """Create the commit record; raises :class:`CommitConflict` if its number is taken."""
    uri = join(output, COMMITS, f"{int(record['sequence']):08d}.json")
    if not create_exclusive(uri, _dump(record), options):
        try:
            other = _json(uri, options).get("run_id")
        except StorageNotFound:  # cleared by an --overwrite in the meantime
            other = "unknown"
        raise CommitConflict(
            f"commit {int(record['sequence']):08d} of {output} was already written by another run ({other}) while "
            f"run {record.get('run_id')} was writing: two runs are writing this output; this run stops, and "
            "what is committed stays (rerun once the other run has finished)"
        )


def commit_keys(record: dict) -> set[tuple[str, int]]:
    """The (image id, occurrence) keys a commit record covers: its data rows and its errors."""
    keys = {(str(i), 0) for i in record.get("image_ids", [])}
    keys.update((str(e["image_id"]), int(e["occurrence"])) for e in record.get("errors", []))
    return keys


def error_key(error: dict) -> tuple[str, int]:
    return str(error["image_id"]), int(error["occurrence"])


def effective_commits(commits: Iterable[dict]) -> list[dict]:
    """The commits as they stand: an error named in a later commit's ``withdrawn`` list (a rerun
    retrying a transient failure) no longer counts; the image is committed again by whatever
    the retry produced."""
    commits = list(commits)
    withdrawn_at: dict[tuple[str, int], int] = {}
    replaced: set[str] = set()
    for position, commit in enumerate(commits):
        for image_id, occurrence in commit.get("withdrawn", []):
            withdrawn_at[(str(image_id), int(occurrence))] = position
        if commit.get("replaces"):
            replaced.add(commit["replaces"])
    out = []
    for position, commit in enumerate(commits):
        if commit.get("file") and commit["file"]["path"] in replaced:
            # Its rows stand in the replacing commit's file (all but the withdrawn ones); the
            # replaced file stays where it is, no longer listed.
            commit = {**commit, "file": None, "image_ids": [], "scores": None}
        errors = commit.get("errors", [])
        kept = [e for e in errors if withdrawn_at.get(error_key(e), -1) <= position]
        out.append(commit if len(kept) == len(errors) else {**commit, "errors": kept})
    return out


def transient_errors(commits: Iterable[dict]) -> list[tuple[str, int]]:
    """Keys of the standing errors whose reason may go away on a retry (:data:`TRANSIENT_REASONS`)."""
    return [error_key(e) for c in effective_commits(commits) for e in c.get("errors", [])
            if e.get("reason") in of.TRANSIENT_REASONS]  # fmt: skip


def committed_table(commits: Iterable[dict], retried: Iterable[tuple[str, int]] = (),
                    inputs: pa.Table | None = None) -> pa.Table:  # fmt: skip
    """The standing committed keys of ``commits`` (:data:`COMMITTED_SCHEMA`; withdrawn errors and
    replaced files left out) with the URI and fingerprint each was made from (null for records
    written before fingerprints existed); ``retried`` keys (transient errors a run tries again)
    are left out. ``inputs``: the records' inputs table (:func:`read_commit_log`); without it,
    the records carry their ``inputs`` lists."""
    if inputs is None:
        commits, inputs = split_inputs(list(commits))
    retried = {(str(i), int(o)) for i, o in retried}
    # Data rows as Arrow from the records' id lists (no Python object per key; the file path
    # dictionary-encoded: one string per file, not per row); error rows (few) from Python.
    id_lists, sequences, counts, paths = [], [], [], []
    errors: dict[str, list] = {"sequence": [], "image_id": [], "occurrence": [], "uri": [], "reason": []}
    for position, commit in enumerate(effective_commits(commits)):
        sequence = int(commit.get("sequence", position))
        if commit.get("image_ids"):
            id_lists.append(commit["image_ids"])
            sequences.append(sequence)
            counts.append(len(commit["image_ids"]))
            paths.append((commit.get("file") or {}).get("path"))
        for e in commit.get("errors", []):
            key = error_key(e)
            if key not in retried:
                for name, value in zip(errors, (sequence, key[0], key[1], e.get("uri"), e["reason"])):
                    errors[name].append(value)
    rows = int(sum(counts))
    id_arrays = [ids.array if isinstance(ids, IdList) else pa.array([str(i) for i in ids], pa.string())
                 for ids in id_lists]  # fmt: skip
    data = pa.table({
        "sequence": pa.array(np.repeat(np.asarray(sequences, dtype=np.int64), counts), pa.int64()),
        "image_id": pa.concat_arrays(id_arrays) if id_arrays else pa.array([], pa.string()),
        "occurrence": pa.array(np.zeros(rows, dtype=np.int64)), "error_uri": pa.nulls(rows, pa.string()),
        "reason": pa.nulls(rows, pa.string()),
    })  # fmt: skip
    failed = pa.table({
        "sequence": pa.array(errors["sequence"], pa.int64()), "image_id": pa.array(errors["image_id"], pa.string()),
        "occurrence": pa.array(errors["occurrence"], pa.int64()), "error_uri": pa.array(errors["uri"], pa.string()),
        "reason": pa.array(errors["reason"], pa.string()),
    })  # fmt: skip
    file_of_row = pa.array(np.repeat(np.arange(len(counts), dtype=np.int32), counts), pa.int32())
    paths_array = pa.array(paths, pa.string())
    # Each key with what it was made from (its record's inputs row), data rows and error rows as
    # two chunks of each column: no concatenated copy of ~100 MB columns for ImageNet.
    uri, fingerprint = [], []
    for part in (data, failed):
        at = _input_rows(part, inputs)
        uri.append(inputs.column("uri").take(at).combine_chunks())
        fingerprint.append(inputs.column("fingerprint").take(at).combine_chunks())
    uri[1] = pc.coalesce(uri[1], failed.column("error_uri"))  # errors recorded before inputs were
    columns = [pa.chunked_array([data.column(n).combine_chunks(), failed.column(n).combine_chunks()], pa.string()
                                if n in ("image_id", "reason") else pa.int64()) for n in ("image_id", "occurrence", "reason")]  # fmt: skip
    path = pa.chunked_array([pa.DictionaryArray.from_arrays(file_of_row, paths_array),
                             pa.DictionaryArray.from_arrays(pa.nulls(failed.num_rows, pa.int32()), paths_array)])  # fmt: skip
    return pa.Table.from_arrays([columns[0], columns[1], pa.chunked_array(uri, pa.string()),
                                 pa.chunked_array(fingerprint, pa.string()), columns[2], path],
                                schema=COMMITTED_SCHEMA)  # fmt: skip


#: Keys matched to their inputs rows at a time (:func:`_input_rows`).
_MATCH_ROWS = 65_536


def _input_rows(keys: pa.Table, inputs: pa.Table) -> pa.Array:
    """For each row of ``keys`` (sequence, image_id, occurrence; in commit order), the row of
    ``inputs`` holding the same three, or null: a hash lookup (not a join, which would copy
    every column of both sides), a range of sequences at a time (keys and inputs are both in
    commit order), so the lookup's strings and hash table cover :data:`_MATCH_ROWS` keys at a
    time, not a million."""
    inputs_sequence = inputs.column("sequence").to_numpy()
    if len(inputs_sequence) > 1 and (np.diff(inputs_sequence) < 0).any():
        raise ValueError("the inputs table must be in commit order")
    keys_sequence = keys.column("sequence").to_numpy()
    parts = []
    for start in range(0, keys.num_rows, _MATCH_ROWS):
        part = keys.slice(start, _MATCH_ROWS)
        sequences = keys_sequence[start:start + _MATCH_ROWS]
        low = int(np.searchsorted(inputs_sequence, sequences.min(), "left"))
        high = int(np.searchsorted(inputs_sequence, sequences.max(), "right"))
        at = pc.index_in(_row_keys(part), value_set=_row_keys(inputs.slice(low, high - low)))
        parts.append(pc.add(pc.cast(at, pa.int64()), pa.scalar(low, pa.int64())))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.int64())


def _row_keys(table: pa.Table) -> pa.Array:
    """``"<sequence>\x1f<image id>\x1f<occurrence>"`` per row of a keys or inputs table."""
    columns = [pc.cast(table.column("sequence"), pa.string()), table.column("image_id"),
               pc.cast(table.column("occurrence"), pa.string())]  # fmt: skip
    if not table.num_rows:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(*columns, "\x1f").combine_chunks()


def _inputs_of(inputs: pa.Table, sequence: int) -> list[list]:
    """The ``inputs`` list of record ``sequence``, from the log's inputs table."""
    rows = inputs.filter(pc.equal(inputs.column("sequence"), sequence)).to_pylist()
    return [[r["image_id"], r["occurrence"], r["uri"], r["fingerprint"]] for r in rows]


def _digest(key: tuple[str, int]) -> bytes:
    return hashlib.blake2b(f"{key[0]}\x1f{int(key[1])}".encode("utf-8"), digest_size=16).digest()


class CommittedKeys:
    """A set of (image id, occurrence) keys sized for millions of images.

    The keys an output held when the run started are a sorted array of their 128-bit BLAKE2b
    digests (16 bytes a key, against ~150 for a tuple in a Python set; two keys share a digest as
    rarely as two data files share a content name); what the run commits or withdraws since is
    kept in small Python sets.
    """

    def __init__(self, keys: Iterable[tuple[str, int]] = ()) -> None:
        digests = np.array(sorted({_digest(k) for k in keys}), dtype="S16")
        self._earlier = digests if len(digests) else np.empty(0, dtype="S16")
        self._added: set[tuple[str, int]] = set()
        self._removed: set[tuple[str, int]] = set()

    def _held_before(self, key: tuple[str, int]) -> bool:
        # Searched from both sides: NumPy's byte strings drop trailing NUL bytes when read back,
        # so an element is not compared with ``==``.
        digest = np.array(_digest(key), dtype="S16")
        return bool(np.searchsorted(self._earlier, digest, "left") != np.searchsorted(self._earlier, digest, "right"))

    def __contains__(self, key) -> bool:
        key = (str(key[0]), int(key[1]))
        return key in self._added or (key not in self._removed and self._held_before(key))

    def __len__(self) -> int:
        return len(self._earlier) - len(self._removed) + sum(1 for k in self._added if not self._held_before(k))

    def add(self, key: tuple[str, int]) -> None:
        key = (str(key[0]), int(key[1]))
        self._removed.discard(key)
        self._added.add(key)

    def discard(self, key: tuple[str, int]) -> None:
        key = (str(key[0]), int(key[1]))
        self._added.discard(key)
        if self._held_before(key):
            self._removed.add(key)

    def __ior__(self, keys: Iterable[tuple[str, int]]) -> "CommittedKeys":
        for key in keys:
            self.add(key)
        return self

    def __isub__(self, keys: Iterable[tuple[str, int]]) -> "CommittedKeys":
        for key in keys:
            self.discard(key)
        return self

    def missing(self, keys: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """The ``keys`` not in the set, sorted."""
        return sorted(k for k in keys if k not in self)


def committed_files(commits: Iterable[dict]) -> list[dict]:
    return [c["file"] for c in commits if c.get("file")]


def drop_rows(output: str, path: str, drop: set[str], options: StorageOptions,
              protected: Iterable[str] = ()) -> dict | None:  # fmt: skip
    """Rewrite data file ``path`` without the rows of image ids in ``drop`` (and without a
    repeated id's later rows); returns the new file's ``{path, rows, bytes}`` (``None`` when no
    row is left). The old file is deleted (it was never committed). ``protected``: the committed
    files' paths, which are neither deleted nor written here, whatever the names come out as."""
    protected = set(protected)
    if path in protected:
        raise ValueError(f"{path} is committed: it is never rewritten")
    table = read_table(join(output, path), options)
    ids = table.column("image_id").to_pylist()
    seen: set[str] = set()
    keep = []
    for index, image_id in enumerate(ids):
        keep.append(image_id not in drop and image_id not in seen)
        seen.add(image_id)
    table = table.filter(pa.array(keep, pa.bool_()))
    delete_file(join(output, path), options)
    if table.num_rows == 0:
        return None
    kept = table.column("image_id").to_pylist()
    name = content_name("part", kept)
    if f"{DATA}/{name}" in protected:  # only if the kept ids were committed, which the caller excludes
        raise ValueError(f"{DATA}/{name} is committed: it is never rewritten")
    written = write_table(join(output, DATA), name, table, options)
    return {"path": f"{DATA}/{written['uri'].rsplit('/', 1)[-1]}", "rows": written["rows"], "bytes": written["bytes"]}


def copy_without(output: str, path: str, drop: set[str], options: StorageOptions) -> dict | None:
    """A copy of committed data file ``path`` without the rows of ``drop`` (under the name of
    the ids it keeps); the committed file is left as it is. ``None`` when no row is left."""
    table = read_table(join(output, path), options)
    table = table.filter(pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(drop), pa.string()))))
    if table.num_rows == 0:
        return None
    name = content_name("part", table.column("image_id").to_pylist())
    written = write_table(join(output, DATA), name, table, options)
    return {"path": f"{DATA}/{written['uri'].rsplit('/', 1)[-1]}", "rows": written["rows"], "bytes": written["bytes"]}


def write_errors_table(output: str, commits: list[dict], options: StorageOptions) -> dict:
    """All committed error rows as one Parquet file (always written, possibly with no rows)."""
    rows = sorted((e for c in commits for e in c.get("errors", [])), key=lambda e: (e["image_id"], e["occurrence"]))
    name = content_name("errors", [f"{e['image_id']}\x01{e['occurrence']}" for e in rows])
    written = write_table(join(output, ERRORS), name, of.errors_table(rows), options)
    return {"path": f"{ERRORS}/{name}", "rows": written["rows"], "bytes": written["bytes"]}


def delete_orphans(output: str, keep: Iterable[str], options: StorageOptions, started: float | None = None,
                   written: Iterable[str] = ()) -> list[str]:  # fmt: skip
    """Delete the files under ``data/`` and ``errors/`` that are not in ``keep`` (relative
    paths) and were either ``written`` by this run or last modified before ``started`` (the
    run's start in the store's clock; ``None``: any age). A file another writer wrote during
    this run is left alone: it is not this run's to judge. Returns the deleted relative paths."""
    keep, written = set(keep), set(written)
    deleted = []
    for folder in (DATA, ERRORS):
        try:
            times = file_times(join(output, folder), options)
        except StorageNotFound:
            times = {}
        for uri, modified in sorted(times.items()):
            relative = f"{folder}/{uri.rsplit('/', 1)[-1]}"
            if relative in keep:
                continue
            if relative in written or started is None or modified < started:
                delete_file(uri, options)
                deleted.append(relative)
    return deleted


def read_manifest(output: str, options: StorageOptions) -> dict | None:
    uri = join(output, MANIFEST)
    return _json(uri, options) if exists(uri, options) else None


def write_manifest(output: str, manifest: dict, options: StorageOptions) -> None:
    manifest = {**manifest, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes(join(output, MANIFEST), _dump(manifest), options)


# --------------------------------------------------------------------------------------
# the driver's side: committing what comes back (which input rows to send: :mod:`.planning`)


#: ``summarize(meta, committed image ids) -> extra fields`` of a job's commit records (labeling
#: adds its scores and stage timings).
Summarize = Callable[[dict, list], dict]


class Committer:
    """The driver's commit log: refuses to commit a key twice, repairs files that would, never
    touches a committed file.

    ``lease`` (:class:`~irnet_ray.pipeline.lease.Lease`): checked before every commit, so a run
    whose lease was taken over stops. ``started``: the run's start in the store's clock (default:
    the lease's creation, else now); with :attr:`delivered` it decides which orphans are this
    run's to delete (:func:`delete_orphans`).
    """

    def __init__(self, output: str, state: OutputState, options: StorageOptions, run_id: str,
                 summarize: Summarize | None = None, *, lease=None, started: float | None = None) -> None:  # fmt: skip
        self.output, self.options, self.run_id, self.lease = output, options, run_id, lease
        self.started = started if started is not None else (lease.created if lease is not None else time.time())
        self.summarize = summarize or (lambda meta, ids: {})
        #: The log's records in commit order, without their inputs (see :attr:`inputs`).
        self.commits = list(state.commits)
        self._inputs = [state.inputs]
        self.sequence = state.next_sequence
        self.processed = self.errors = self.repaired = self.duplicates = 0
        #: Paths of every data file delivered to this committer (committed, repaired or not).
        self.delivered: set[str] = set()
        #: Paths of the committed data files: never deleted or rewritten.
        self.committed_paths = {f["path"] for f in committed_files(self.commits)}
        #: Whether a local output may be written from several nodes (set by ``pipeline.run.open_output``).
        self.allow_local_output_on_cluster = False
        #: The sequence number the newest snapshot covers (:func:`write_snapshot`).
        self.snapshot_sequence = -1
        # Transient failures of earlier runs are tried again: withdrawn first (a commit of its
        # own), so a rerun stopped half-way still knows they are not done.
        self.retried = transient_errors(self.commits)
        if self.retried:
            self._write({"file": None, "image_ids": [], "errors": [], "withdrawn": [list(k) for k in self.retried]})
        self.committed = CommittedKeys(k for commit in effective_commits(self.commits) for k in commit_keys(commit))

    @property
    def inputs(self) -> pa.Table:
        """The inputs of every record of the log (:data:`INPUTS_SCHEMA`)."""
        if len(self._inputs) > 1:
            self._inputs = [pa.concat_tables(self._inputs).combine_chunks()]
        return self._inputs[0]

    def committed_table(self, retried: Iterable[tuple[str, int]] = ()) -> pa.Table:
        """The standing committed keys (:func:`committed_table`)."""
        return committed_table(self.standing, retried, self.inputs)

    def snapshot(self) -> str | None:
        """Write a snapshot of the log as it stands (:func:`write_snapshot`); nothing when the newest
        one is current. Returns the snapshot's relative path."""
        if not self.commits or int(self.commits[-1]["sequence"]) == self.snapshot_sequence:
            return None
        if self.lease is not None:
            self.lease.check()
        path = write_snapshot(self.output, self.commits, self.inputs, self.options)
        self.snapshot_sequence = int(self.commits[-1]["sequence"])
        return path

    def _write(self, fields: dict) -> dict:
        if self.lease is not None:
            self.lease.check()
        record = {"sequence": self.sequence, "run_id": self.run_id,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "time": time.time(), **fields}  # fmt: skip
        write_commit(self.output, record, self.options)
        self.sequence += 1
        [light], inputs = split_inputs([record])
        self.commits.append(light)
        if inputs.num_rows:
            self._inputs.append(inputs)
        if record.get("file"):
            self.committed_paths.add(record["file"]["path"])
        if self.sequence % SNAPSHOT_EVERY == 0:
            self.snapshot()
        return record

    @property
    def standing(self) -> list[dict]:
        """The commits with withdrawn errors left out (what the output holds)."""
        return effective_commits(self.commits)

    def commit(self, meta: dict) -> dict:
        file, ids = meta.get("file"), [str(i) for i in meta.get("image_ids", [])]
        if file:
            self.delivered.add(file["path"])
        if file and (file["path"] in self.committed_paths or (ids and all((i, 0) in self.committed for i in ids))):
            # A duplicate: a retried writer task delivered a committed file again (file names are
            # hashes of the ids they hold: same name, same ids), or a file whose rows are all
            # committed in other files (one repaired before, which may be gone). Nothing new; the
            # committed files stay as they are, an uncommitted one is left as an orphan.
            file, ids = None, []
            self.duplicates += 1
        counts = collections.Counter(ids)
        again = {i for i in ids if (i, 0) in self.committed or counts[i] > 1}
        if again and file:
            # A retried task delivered rows that are committed already with new ones: the file is
            # rewritten (under the name of the new ids, never a committed one) without them.
            file = drop_rows(self.output, file["path"], {i for i in again if (i, 0) in self.committed}, self.options,
                             protected=self.committed_paths)  # fmt: skip
            self.repaired += 1
            ids = [i for i in dict.fromkeys(ids) if (i, 0) not in self.committed]
            if file is None:
                ids = []
        new_keys = {(i, 0) for i in ids}
        inputs = {(str(i), int(o)): [str(i), int(o), u, f] for i, o, u, f in meta.get("inputs", [])}
        errors = []
        for e in meta.get("errors", []):
            key = (str(e["image_id"]), int(e["occurrence"]))
            if key not in self.committed and key not in new_keys:
                errors.append(e)
                new_keys.add(key)
        record = self._write({"file": file, "image_ids": ids, "errors": errors, **self.summarize(meta, ids),
                              "inputs": [inputs[k] for k in sorted(new_keys) if k in inputs]})
        self.committed |= new_keys
        self.processed += len(ids)
        self.errors += len(errors)
        return record

    def withdraw(self, keys: Iterable[tuple[str, int]]) -> int:
        """Withdraw committed keys (their input changed; the run labels them again), each through
        a commit: an error row by a ``withdrawn`` list (as transient retries are); a data row by
        a commit that ``replaces`` its committed file with a copy without it (the committed file
        is never deleted or rewritten; it is just no longer listed). Returns the commits made.
        The replacing commit carries no score record: the kept images' scores leave the
        output's metrics (they would count the withdrawn images otherwise)."""
        keys = {(str(i), int(o)) for i, o in keys}
        made = 0
        withdrawn_errors = []
        inputs = self.inputs
        for commit in effective_commits(self.commits):
            withdrawn_errors += [error_key(e) for e in commit.get("errors", []) if error_key(e) in keys]
            drop = {i for i in commit.get("image_ids", []) if (str(i), 0) in keys}
            if not drop or not commit.get("file"):
                continue
            kept = [i for i in commit["image_ids"] if i not in drop]
            kept_ids = set(kept)
            file = copy_without(self.output, commit["file"]["path"], drop, self.options) if kept else None
            if file:
                self.delivered.add(file["path"])
            self._write({"file": file, "image_ids": kept if file else [], "errors": [],
                         "withdrawn": [[i, 0] for i in sorted(drop)], "replaces": commit["file"]["path"],
                         "inputs": [x for x in _inputs_of(inputs, int(commit["sequence"])) if x[1] == 0 and x[0] in kept_ids],
                         "timings": {}, "timed_images": 0})  # fmt: skip
            made += 1
        if withdrawn_errors:
            self._write({"file": None, "image_ids": [], "errors": [], "withdrawn": [list(k) for k in withdrawn_errors]})
            made += 1
        self.committed -= keys
        return made
