"""The output folder of a batch-inference job: job record, commit log, manifest (no Ray here).

Labeling (pseudo masks) and relation mining (IR labels) write the same kind of folder; only the
data files' columns and the job record's ``format`` differ.

Layout of an output folder (local path or ``s3://`` prefix)::

    _job.json            what is being made with what: format, model ids, settings (first write)
    data/part-*.parquet  the job's rows (labeling: irnet_ray.data.output_format.LABEL_SCHEMA)
    errors/errors-*.parquet  per-image failures (ERROR_SCHEMA), written when the run finishes
    _commits/NNNNNNNN.json   one record per committed data file (its image ids, its errors,
                         its score record and stage timings); written by the driver only
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
"""

from __future__ import annotations

import collections
import json
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import content_name, read_table, write_table
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
    "plan_records",
    "OutputState",
    "prepare_output",
    "clear_output",
    "read_commits",
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
    commits: list[dict] = field(default_factory=list)
    previous_manifest: dict | None = None

    @property
    def next_sequence(self) -> int:
        return max((int(c["sequence"]) for c in self.commits), default=-1) + 1


def _json(uri: str, options: StorageOptions) -> dict:
    return json.loads(read_bytes(uri, options).decode("utf-8"))


def _dump(value: dict) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")


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
            return OutputState(job=old, commits=read_commits(output, options), previous_manifest=manifest)
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


def read_commits(output: str, options: StorageOptions) -> list[dict]:
    """Every commit record of ``output``, in commit order; raises if a committed file is gone."""
    uris = [u for u in _listing(join(output, COMMITS), options, ".json") if _COMMIT_NAME.match(u.rsplit("/", 1)[-1])]
    commits = sorted(_parallel_read(uris, options), key=lambda c: int(c["sequence"]))
    named = [c for c in commits if c.get("file")]
    if named:
        found = _files_exist(output, [c["file"]["path"] for c in named], options)
        for commit, there in zip(named, found):
            if not there:
                raise JobInputError(
                    f"output {output} is damaged: {commit['file']['path']} (commit {commit['sequence']}) is missing; "
                    "pass --overwrite (overwrite=True) to start over"
                )
    return commits


def _files_exist(output: str, paths: list[str], options: StorageOptions) -> list[bool]:
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
# the driver's side: which input rows to send, and committing what comes back


def plan_records(records: Sequence, committed: set, num_classes: int, run_id: str):
    """``(pending records, error rows found in the listing, number already committed)``.

    A repeated image id, an image without classes and a class id outside the models' classes
    are refused per row (reasons ``duplicate_id``, ``no_classes``, ``class_out_of_range``).
    """
    pending, errors, skipped = [], [], 0
    listed = collections.Counter(r.image_id for r in records)
    occurrences: collections.Counter = collections.Counter()
    for record in records:
        occurrence = occurrences[record.image_id]
        occurrences[record.image_id] += 1
        if (record.image_id, occurrence) in committed:
            skipped += 1
            continue
        reason = message = None
        if listed[record.image_id] > 1:
            # Output rows are keyed by image id and no row can be told to be the right one
            # (first-wins would depend on row order): every row of a repeated id is refused.
            reason = "duplicate_id"
            message = f"image id {record.image_id!r} is listed {listed[record.image_id]} times (this is row {occurrence + 1} of them)"
        elif not record.classes:
            reason, message = "no_classes", "the image has no image-level classes: nothing to localise"
        elif max(record.classes) > num_classes:
            reason = "class_out_of_range"
            message = f"class id {max(record.classes)} is outside the models' classes 1..{num_classes}"
        if reason is None:
            pending.append(record)
        else:
            errors.append(of.error_row(image_id=record.image_id, uri=record.uri, classes=record.classes, stage="input",
                                       reason=reason, message=message, run_id=run_id, occurrence=occurrence))  # fmt: skip
    return pending, errors, skipped


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
        self.commits = list(state.commits)
        self.sequence = state.next_sequence
        self.processed = self.errors = self.repaired = self.duplicates = 0
        #: Paths of every data file delivered to this committer (committed, repaired or not).
        self.delivered: set[str] = set()
        #: Paths of the committed data files: never deleted or rewritten.
        self.committed_paths = {f["path"] for f in committed_files(self.commits)}
        #: Whether a local output may be written from several nodes (set by ``pipeline.run.open_output``).
        self.allow_local_output_on_cluster = False
        # Transient failures of earlier runs are tried again: withdrawn first (a commit of its
        # own), so a rerun stopped half-way still knows they are not done.
        self.retried = transient_errors(self.commits)
        if self.retried:
            self._write({"file": None, "image_ids": [], "errors": [], "withdrawn": [list(k) for k in self.retried]})
        self.committed: set[tuple[str, int]] = set()
        for commit in effective_commits(self.commits):
            self.committed |= commit_keys(commit)

    def _write(self, fields: dict) -> dict:
        if self.lease is not None:
            self.lease.check()
        record = {"sequence": self.sequence, "run_id": self.run_id,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "time": time.time(), **fields}  # fmt: skip
        write_commit(self.output, record, self.options)
        self.sequence += 1
        self.commits.append(record)
        if record.get("file"):
            self.committed_paths.add(record["file"]["path"])
        return record

    @property
    def standing(self) -> list[dict]:
        """The commits with withdrawn errors left out (what the output holds)."""
        return effective_commits(self.commits)

    def commit(self, meta: dict) -> dict:
        file, ids = meta.get("file"), [str(i) for i in meta.get("image_ids", [])]
        if file:
            self.delivered.add(file["path"])
        if file and file["path"] in self.committed_paths:
            # A retried writer task delivered a committed file again (file names are hashes of
            # the ids they hold: same name, same ids). Nothing new: the file stays as committed.
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
        for commit in effective_commits(self.commits):
            withdrawn_errors += [error_key(e) for e in commit.get("errors", []) if error_key(e) in keys]
            drop = {i for i in commit.get("image_ids", []) if (str(i), 0) in keys}
            if not drop or not commit.get("file"):
                continue
            kept = [i for i in commit["image_ids"] if i not in drop]
            file = copy_without(self.output, commit["file"]["path"], drop, self.options) if kept else None
            if file:
                self.delivered.add(file["path"])
            self._write({"file": file, "image_ids": kept if file else [], "errors": [],
                         "withdrawn": [[i, 0] for i in sorted(drop)], "replaces": commit["file"]["path"],
                         "inputs": [x for x in commit.get("inputs", []) if (str(x[0]), int(x[1])) not in keys],
                         "timings": {}, "timed_images": 0})  # fmt: skip
            made += 1
        if withdrawn_errors:
            self._write({"file": None, "image_ids": [], "errors": [], "withdrawn": [list(k) for k in withdrawn_errors]})
            made += 1
        self.committed -= keys
        return made
