"""The writing run's lease on an output folder: one writer at a time, on any store.

Object stores offer no lock, but they do offer "create only if absent"
(:func:`irnet_ray.data.storage.create_exclusive`: S3 ``If-None-Match: *``, a local hard link).
The lease is built on that alone.

Layout: ``OUTPUT/_lease/NNNNNNNN.json``, one file per *generation*. The file with the highest
number is the lease; it names its holder (run id, host, pid, Ray job id, command, started) and
its last heartbeat (``heartbeat_time``, POSIX seconds of the holder's clock).

* **Acquire**: no lease file -> create generation 0 exclusively. A lease file whose holder is
  alive (heartbeat younger than ``timeout_s``) -> refused with :class:`OutputLeased` naming the
  holder. A stale one -> create the NEXT generation exclusively: of
  two takers exactly one creates it, the other is refused naming the winner. The winner then
  deletes the older generations (their holders are gone or have been told so). A lease is stale
  when its heartbeat is older than ``timeout_s``, when ``take_over`` is asked for, or at once when
  its holder ran on this very machine (same host name, boot id and pid namespace) and its
  process no longer exists: a driver killed here is not waited for.
* **Heartbeat**: a daemon thread rewrites the holder's own generation file every
  ``heartbeat_s`` seconds. Before each renewal it looks for a newer generation; if there is one
  the lease was taken over: the holder stops renewing and :meth:`Lease.check` raises
  :class:`LeaseLost` at the next commit, so a run that was presumed dead never commits again.
* **Release**: at the end of the run, failed or not (the pipeline calls it in ``finally``), the
  holder deletes its own generation file. A run killed without clean-up (SIGKILL, a lost node)
  leaves its file; it goes stale after ``timeout_s`` and the next run takes it over.

The lease does not replace the commit log's own guard: commit records are created exclusively
too, so even a writer that lost its lease without noticing cannot replace another's record.
Staleness compares the holder's clock with the reader's: hosts' clocks must agree to well within
``timeout_s`` (NTP does that; the default timeout is minutes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Any

from irnet_ray.data.storage import (
    StorageError,
    StorageNotFound,
    StorageOptions,
    create_exclusive,
    delete_file,
    file_time,
    join,
    list_files,
    read_bytes,
    write_bytes,
)

from .commit_log import JobInputError

__all__ = ["LEASE_FOLDER", "LeaseConfig", "Lease", "OutputLeased", "LeaseLost", "read_lease"]

LEASE_FOLDER = "_lease"
_GENERATION = re.compile(r"^(\d{8})\.json$")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclasses.dataclass(frozen=True)
class LeaseConfig:
    """How a run holds its output folder.

    ``heartbeat_s``: how often the running driver renews its lease. ``timeout_s``: a lease not
    renewed for this long belongs to a dead run and may be taken over (keep it many heartbeats
    long: a driver busy committing, a slow store or a clock skew must not look dead).
    ``take_over``: take the lease even from a run that looks alive (the user knows it is dead,
    e.g. its machine is gone, and does not want to wait ``timeout_s``).
    """

    heartbeat_s: float = 30.0
    timeout_s: float = 600.0
    take_over: bool = False

    def __post_init__(self) -> None:
        if float(self.heartbeat_s) <= 0:
            raise ValueError(f"lease heartbeat must be > 0 seconds, got {self.heartbeat_s}")
        if float(self.timeout_s) <= float(self.heartbeat_s):
            raise ValueError(f"lease timeout ({self.timeout_s} s) must be longer than its heartbeat "
                             f"({self.heartbeat_s} s)")  # fmt: skip


class OutputLeased(JobInputError):
    """Another run holds the output folder (the message names it and says what to do)."""


class LeaseLost(JobInputError):
    """This run's lease was taken over by another run; it must not commit anything more."""


def _stamp(seconds: float) -> str:
    return time.strftime(_TIME_FORMAT, time.gmtime(seconds))


def _generations(output: str, options: StorageOptions) -> dict[int, str]:
    try:
        uris = list_files(join(output, LEASE_FOLDER), options, suffixes=(".json",))
    except StorageNotFound:
        return {}
    found = {}
    for uri in uris:
        match = _GENERATION.match(uri.rsplit("/", 1)[-1])
        if match:
            found[int(match.group(1))] = uri
    return found


def _read(uri: str, options: StorageOptions) -> dict | None:
    try:
        return json.loads(read_bytes(uri, options).decode("utf-8"))
    except StorageNotFound:  # released or replaced between the listing and the read
        return None


def read_lease(output: str, options: StorageOptions = StorageOptions()) -> dict | None:
    """The current lease of ``output`` (the newest generation's record), ``None`` when free."""
    generations = _generations(output, options)
    for generation in sorted(generations, reverse=True):
        document = _read(generations[generation], options)
        if document is not None:
            return document
    return None


def describe(document: dict, now: float | None = None) -> str:
    """The holder of a lease in a few words, for messages."""
    now = time.time() if now is None else now
    ray_job = f", Ray job {document['ray_job_id']}" if document.get("ray_job_id") else ""
    return (f"run {document.get('run_id')} on host {document.get('host')} (pid {document.get('pid')}{ray_job}), "
            f"started {document.get('started')}, last heartbeat {document.get('heartbeat')} "
            f"({max(0.0, now - float(document.get('heartbeat_time', 0))):.0f} s ago)")  # fmt: skip


def _machine() -> dict:
    """What tells this machine and pid namespace apart from others that share its host name
    (containers): the kernel's boot id and the pid namespace's inode (Linux; ``None`` elsewhere)."""
    identity: dict[str, Any] = {"boot_id": None, "pid_namespace": None}
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            identity["boot_id"] = f.read().strip()
        identity["pid_namespace"] = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pass
    return identity


def _gone_from_here(holder: dict) -> bool:
    """Whether ``holder`` ran on this machine, in this pid namespace, and its process is gone.
    Unknown identities (non-Linux, old records) answer ``False``: the timeout decides then."""
    here = _machine()
    if holder.get("host") != socket.gethostname() or here["boot_id"] is None:
        return False
    if holder.get("boot_id") != here["boot_id"] or holder.get("pid_namespace") != here["pid_namespace"]:
        return False
    pid = int(holder.get("pid") or 0)
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        return False
    return False


def _ray_job_id() -> str | None:
    """The Ray job id of this driver, when Ray is initialised (``ray job submit`` entrypoints)."""
    ray = sys.modules.get("ray")  # never import Ray just for this
    try:
        if ray is not None and ray.is_initialized():
            return str(ray.get_runtime_context().get_job_id())
    except Exception:  # noqa: BLE001 - informative only
        return None
    return None


class Lease:
    """A held lease (see the module doc); create with :meth:`acquire`, end with :meth:`release`."""

    def __init__(self, output: str, options: StorageOptions, config: LeaseConfig, generation: int, document: dict):
        self.output, self.options, self.config = output, options, config
        self.generation, self.document = generation, document
        self.uri = join(output, LEASE_FOLDER, f"{generation:08d}.json")
        #: When the lease was created, in the store's clock (files older than this are from
        #: earlier runs; see ``commit_log.delete_orphans``).
        self.created = file_time(self.uri, options) or float(document["started_time"])
        self.lost: dict | None = None  # the taker's lease record, once taken over
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{document['run_id']}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- acquire

    @classmethod
    def acquire(cls, output: str, options: StorageOptions, run_id: str, config: LeaseConfig = LeaseConfig(),
                command: str | None = None) -> "Lease":  # fmt: skip
        """Take the lease of ``output`` or raise :class:`OutputLeased` naming the holder."""
        now = time.time()
        document: dict[str, Any] = {
            "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), **_machine(),
            "ray_job_id": _ray_job_id(),
            "command": command if command is not None else " ".join(sys.argv),
            "started": _stamp(now), "started_time": now, "heartbeat": _stamp(now), "heartbeat_time": now,
            "heartbeat_s": float(config.heartbeat_s), "timeout_s": float(config.timeout_s),
        }  # fmt: skip
        generations = _generations(output, options)
        newest = max(generations, default=None)
        if newest is not None:
            holder = _read(generations[newest], options)
            if holder is not None:
                age = now - float(holder.get("heartbeat_time", 0))
                if age < float(config.timeout_s) and not config.take_over and not _gone_from_here(holder):
                    raise OutputLeased(
                        f"output {output} is being written by {describe(holder, now)}; wait for it to finish, or, "
                        f"if it is dead, rerun after its lease times out ({config.timeout_s:g} s without heartbeat) "
                        "or pass --take-over-lease"
                    )
                document["took_over"] = {k: holder.get(k) for k in ("run_id", "host", "pid", "heartbeat")}
        generation = 0 if newest is None else newest + 1
        document["generation"] = generation
        uri = join(output, LEASE_FOLDER, f"{generation:08d}.json")
        if not create_exclusive(uri, json.dumps(document, indent=1, sort_keys=True).encode("utf-8"), options):
            winner = _read(uri, options) or {}
            raise OutputLeased(f"output {output} was just taken by {describe(winner)}; only one run may write it "
                               "at a time")  # fmt: skip
        for older, older_uri in generations.items():
            if older < generation:
                delete_file(older_uri, options)
        return cls(output, options, config, generation, document)

    # ---------------------------------------------------------------- holding

    def _newer(self) -> dict | None:
        """The record of a newer generation (a run that took this lease over), if any."""
        generations = _generations(self.output, self.options)
        for generation in sorted((g for g in generations if g > self.generation), reverse=True):
            document = _read(generations[generation], self.options)
            if document is not None:
                return document
        return None

    def renew(self) -> None:
        """Write a new heartbeat (unless the lease was taken over: then remember who took it)."""
        with self._lock:
            if self.lost is not None or self._stop.is_set():
                return
            taker = self._newer()
            if taker is not None:
                self.lost = taker
                return
            now = time.time()
            self.document.update(heartbeat=_stamp(now), heartbeat_time=now)
            if self.document.get("ray_job_id") is None:
                self.document["ray_job_id"] = _ray_job_id()  # Ray may have started after the lease
            write_bytes(self.uri, json.dumps(self.document, indent=1, sort_keys=True).encode("utf-8"), self.options)
            self._renewed = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(float(self.config.heartbeat_s)):
            try:
                self.renew()
            except StorageError:  # a store hiccup: try again at the next beat; check() watches the age
                pass

    def check(self) -> None:
        """Raise :class:`LeaseLost` when this run may no longer write: the lease was taken over,
        or it could not be renewed for ``timeout_s`` (another run may have taken it since)."""
        if self.lost is None:
            if time.monotonic() - self._renewed >= float(self.config.timeout_s):
                self.renew()  # one direct try (raises if the store is still unreachable)
            else:
                self.lost = self._newer()
        if self.lost is not None:
            raise LeaseLost(f"run {self.document['run_id']} lost its lease on {self.output} to "
                            f"{describe(self.lost)}; this run stops without committing more")  # fmt: skip

    def release(self) -> None:
        """Stop the heartbeat and delete this run's lease file (not a newer holder's)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=float(self.options.request_timeout) * int(self.options.max_attempts))
        with self._lock:
            delete_file(self.uri, self.options)
