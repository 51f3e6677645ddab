"""The labeling job's output folder: job record, commit log, manifest (no Ray here).

Layout of an output folder (local path or ``s3://`` prefix)::

    _job.json            what is being labeled with what: model ids, label settings (first write)
    data/part-*.parquet  pseudo-mask rows (irnet_ray.data.output_format.LABEL_SCHEMA)
    errors/errors-*.parquet  per-image failures (ERROR_SCHEMA), written when the run finishes
    _commits/NNNNNNNN.json   one record per committed data file (its image ids, its errors,
                         its score record and stage timings); written by the driver only
    _manifest.json       written last: the files, counts, settings, models, metrics, timings

Protocol (the driver is the only committer; every write is atomic, see ``storage.write_bytes``):

1. A data file is written under a name made from the image ids it holds, then the driver
   writes the next commit record naming it. A file no commit record names is an orphan (a
   task retried or a job stopped between the two writes) and is deleted.
2. The set of committed keys (image id, occurrence) only grows; the driver refuses to commit a
   key twice, rewriting a data file without rows that are already committed (:func:`drop_rows`).
3. ``_manifest.json`` is written when every input row is committed. Readers trust only the
   files it lists; a folder without it is unfinished, whatever else it holds.
4. A rerun reads the commit records, skips committed images and labels the rest; a rerun with
   other models or label settings is refused unless it starts over (``overwrite``), which
   deletes ``_manifest.json`` first, so the folder is visibly unfinished while it is cleared.

One job writes to an output folder at a time (object stores offer no lock to enforce it): two
jobs on one folder at once could each delete the other's uncommitted files.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa

from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import content_name, read_table, write_table
from irnet_ray.data.storage import (
    StorageNotFound,
    StorageOptions,
    delete_file,
    exists,
    join,
    list_files,
    read_bytes,
    write_bytes,
)

__all__ = [
    "JOB_RECORD",
    "MANIFEST",
    "COMMITS",
    "DATA",
    "ERRORS",
    "LabelJobError",
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


class LabelJobError(RuntimeError):
    """The job cannot run or finish as asked (the message says why and what to do)."""


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
    for kind in ("cam", "irn"):
        was, now = old.get("models", {}).get(kind, {}), new["models"][kind]
        if was.get("id") != now["id"]:
            differences.append(f"{kind.upper()} model {now['uri']} ({now['id'][:19]}) is not the one used before "
                               f"({was.get('uri')}, {str(was.get('id'))[:19]})")  # fmt: skip
    if old.get("settings_id") != new["settings_id"]:
        changed = sorted(k for k in new["settings"] if old.get("settings", {}).get(k) != new["settings"][k])
        differences.append(f"label settings differ ({', '.join(changed) or 'format'})")
    return differences


def prepare_output(output: str, job: dict, options: StorageOptions, overwrite: bool) -> OutputState:
    """Check the folder against ``job`` (models + settings), start over when asked, and return
    what is committed there. Writes ``_job.json`` on a fresh folder (which also proves that the
    output is writable before any work starts)."""
    job_uri = join(output, JOB_RECORD)
    if exists(job_uri, options):
        old = _json(job_uri, options)
        if old.get("format") != of.FORMAT_NAME:
            raise LabelJobError(f"{job_uri} is not an irnet-ray labeling record; choose another output folder")
        differences = _identity_differences(old, job)
        if overwrite:
            clear_output(output, options)
        elif differences:
            raise LabelJobError(
                f"output {output} holds labels made differently: {'; '.join(differences)}. "
                "Pass --overwrite (overwrite=True) to delete them and start over, or choose another output folder"
            )
        else:
            manifest = read_manifest(output, options)
            return OutputState(job=old, commits=read_commits(output, options), previous_manifest=manifest)
    elif exists(output, options):
        files = list_files(output, options)
        if files:
            raise LabelJobError(
                f"output folder {output} is not empty and holds no irnet-ray labels ({len(files)} file(s), e.g. "
                f"{files[0]}); choose an empty or new folder"
            )
    write_bytes(job_uri, _dump(job), options)
    return OutputState(job=job)


def clear_output(output: str, options: StorageOptions) -> None:
    """Delete a label output: the manifest first (the folder then reads as unfinished), then
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
    for commit in commits:
        if commit.get("file") and not exists(join(output, commit["file"]["path"]), options):
            raise LabelJobError(
                f"output {output} is damaged: {commit['file']['path']} (commit {commit['sequence']}) is missing; "
                "pass --overwrite (overwrite=True) to start over"
            )
    return commits


def write_commit(output: str, record: dict, options: StorageOptions) -> None:
    write_bytes(join(output, COMMITS, f"{int(record['sequence']):08d}.json"), _dump(record), options)


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
    for position, commit in enumerate(commits):
        for image_id, occurrence in commit.get("withdrawn", []):
            withdrawn_at[(str(image_id), int(occurrence))] = position
    out = []
    for position, commit in enumerate(commits):
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


def drop_rows(output: str, path: str, drop: set[str], options: StorageOptions) -> dict | None:
    """Rewrite data file ``path`` without the rows of image ids in ``drop`` (and without a
    repeated id's later rows); returns the new file's ``{path, rows, bytes}`` (``None`` when no
    row is left). The old file is deleted; it was never committed."""
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
    written = write_table(join(output, DATA), content_name("part", kept), table, options)
    return {"path": f"{DATA}/{written['uri'].rsplit('/', 1)[-1]}", "rows": written["rows"], "bytes": written["bytes"]}


def write_errors_table(output: str, commits: list[dict], options: StorageOptions) -> dict:
    """All committed error rows as one Parquet file (always written, possibly with no rows)."""
    rows = sorted((e for c in commits for e in c.get("errors", [])), key=lambda e: (e["image_id"], e["occurrence"]))
    name = content_name("errors", [f"{e['image_id']}\x01{e['occurrence']}" for e in rows])
    written = write_table(join(output, ERRORS), name, of.errors_table(rows), options)
    return {"path": f"{ERRORS}/{name}", "rows": written["rows"], "bytes": written["bytes"]}


def delete_orphans(output: str, keep: Iterable[str], options: StorageOptions) -> list[str]:
    """Delete the files under ``data/`` and ``errors/`` that are not in ``keep`` (relative
    paths); returns the deleted relative paths."""
    keep = set(keep)
    deleted = []
    for folder in (DATA, ERRORS):
        for uri in _listing(join(output, folder), options):
            relative = f"{folder}/{uri.rsplit('/', 1)[-1]}"
            if relative not in keep:
                delete_file(uri, options)
                deleted.append(relative)
    return deleted


def read_manifest(output: str, options: StorageOptions) -> dict | None:
    uri = join(output, MANIFEST)
    return _json(uri, options) if exists(uri, options) else None


def write_manifest(output: str, manifest: dict, options: StorageOptions) -> None:
    manifest = {**manifest, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes(join(output, MANIFEST), _dump(manifest), options)
