"""Fault injection for the tests, from outside the production modules (which carry no test hooks).

* :class:`KillingLabelActor`: a labeling actor whose process dies (``os._exit``) when it reaches
  its n-th image, once (a marker file remembers it). Tests put it in place of
  ``irnet_ray.label.job.LabelActor`` with ``monkeypatch``; this module is pickled by value
  (:func:`ship_by_value`), so Ray workers need not import ``tests``.
* :func:`train_loop_failing_after` wraps the Ray Train loop: after the worker's n-th
  ``ray.train.report`` (the end of an epoch, its checkpoint reported) the worker process dies or
  raises. Tests put it in place of ``irnet_ray.train.ray_train.train_loop_per_worker``.
* :func:`train_loop_recording_parameters` wraps the Ray Train loop to record, on every worker
  after every ``ray.train.report``, a digest of the model's parameters (a probe, not a fault).
* :func:`redelivering_writer`: the pipeline's writer as retried tasks may behave, delivering
  committed rows again (alone, and inside another file with new ones). Tests put it in place
  of ``irnet_ray.pipeline.run.write_file``.
* :func:`stop_after_commits`: the driver stops (raises :class:`StopTheRun`) when it is about to
  make its n-th commit, in this process.
* Driver faults in a process of its own: ``python tests/faults.py KIND K -- <irnet-ray args>``
  runs the command line with its driver killed (SIGKILL, no clean-up) at its K-th commit of a
  data file, at the point KIND names (:data:`DRIVER_FAULTS`).
"""

from __future__ import annotations

import os
import signal
import sys
import time

#: Where a driver fault kills the driver, around its K-th commit of a data file.
DRIVER_FAULTS = {
    # The writer task wrote and delivered the Parquet file; its commit record is never created.
    "before-commit": "the data file is written, its commit record is not",
    # The record's bytes are in a temporary file next to it (local output), not yet linked.
    "during-commit": "the commit record is half written (a temporary file, not yet linked)",
    # The record exists; the driver dies before it goes on.
    "after-commit": "the commit record is written; nothing after it",
}


def ship_by_value() -> None:
    """Pickle this module's functions and classes by value: Ray workers import ``irnet_ray`` but
    not ``tests``."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------
# actors and training workers


def killing_label_actor(kill_at_image: int, marker: str):
    """A ``LabelActor`` subclass whose process dies when it starts its ``kill_at_image``-th image
    (counted from 1), once: ``marker`` is created just before."""
    from irnet_ray.label.stages import LabelActor

    class KillingLabelActor(LabelActor):
        images_started = 0

        def process(self, rows: list[dict]) -> list[dict]:
            first, last = self.images_started + 1, self.images_started + len(rows)
            self.images_started = last
            if first <= kill_at_image <= last and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)
            return super().process(rows)

    return KillingLabelActor


class StopTheRun(RuntimeError):
    """Raised by an injected fault: the run stops as if its driver were stopped."""


def train_loop_failing_after(reports: int, marker: str, *, kill: bool, delay_s: float = 0.0):
    """The Ray Train loop, failing once on every worker right after its ``reports``-th
    ``ray.train.report``: the process dies (``kill``; after ``delay_s``, so that the controller
    has polled the report, as it would have in a real crash some time later) or the loop raises
    :class:`StopTheRun`. ``marker`` (plus ``.rank<N>``) records that it happened."""
    from irnet_ray.train import ray_train

    loop = ray_train.train_loop_per_worker

    def failing_loop(config: dict) -> None:
        import ray.train

        report, made = ray.train.report, [0]
        rank_marker = f"{marker}.rank{ray.train.get_context().get_world_rank()}"

        def reporting(*args, **kwargs):
            report(*args, **kwargs)
            made[0] += 1
            if made[0] == reports and not os.path.exists(rank_marker):
                with open(rank_marker, "w") as f:
                    f.write(str(os.getpid()))
                if kill:
                    time.sleep(delay_s)
                    os._exit(1)
                raise StopTheRun(f"stopped after {reports} report(s) (injected fault)")

        ray.train.report = reporting
        try:
            loop(config)
        finally:
            ray.train.report = report

    return failing_loop


def train_loop_recording_parameters(folder: str):
    """The Ray Train loop, writing ``{folder}/epoch<E>.rank<R>`` after each report: the SHA-256 of
    the worker's model parameters (of the model ``prepare_model`` returned, unwrapped)."""
    from irnet_ray.train import ray_train

    loop = ray_train.train_loop_per_worker

    def recording_loop(config: dict) -> None:
        import hashlib

        import ray.train
        import ray.train.torch

        report, prepare, models, made = ray.train.report, ray.train.torch.prepare_model, [], [0]
        rank = ray.train.get_context().get_world_rank()

        def preparing(model, *args, **kwargs):
            models.append(prepare(model, *args, **kwargs))
            return models[-1]

        def reporting(*args, **kwargs):
            report(*args, **kwargs)
            digest = hashlib.sha256()
            # Parameters only: BatchNorm running statistics (buffers) follow each rank's own
            # batches when BN trains (DDP broadcasts rank 0's at the next forward).
            for name, value in sorted(getattr(models[-1], "module", models[-1]).named_parameters()):
                digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
            with open(os.path.join(folder, f"epoch{made[0]}.rank{rank}"), "w") as f:
                f.write(digest.hexdigest())
            made[0] += 1

        ray.train.report, ray.train.torch.prepare_model = reporting, preparing
        try:
            loop(config)
        finally:
            ray.train.report, ray.train.torch.prepare_model = report, prepare

    return recording_loop


# --------------------------------------------------------------------------------------
# the driver


def redelivering_writer():
    """A writer that delivers every batch of two or more rows three times: its first row alone,
    then all its rows in another file (the first row committed already, the others new), then
    that file again (the same file delivered twice)."""
    from irnet_ray.pipeline.stages import write_file

    def writer(table, **kwargs):
        import pyarrow as pa

        first, whole = write_file(table.slice(0, 1), **kwargs), write_file(table, **kwargs)
        return pa.concat_tables([first, whole, whole]) if table.num_rows > 1 else whole

    return writer


def stop_after_commits(monkeypatch, commits: int) -> None:
    """This process's committer raises :class:`StopTheRun` instead of making its ``commits``+1-th
    commit: the files of the stopped run's in-flight batches stay uncommitted."""
    from irnet_ray.pipeline import commit_log

    commit, made = commit_log.Committer.commit, [0]

    def stopping(self, meta: dict) -> dict:
        if made[0] >= commits:
            raise StopTheRun(f"stopped after {commits} commit(s) (injected fault)")
        made[0] += 1
        return commit(self, meta)

    monkeypatch.setattr(commit_log.Committer, "commit", stopping)


def install_driver_fault(kind: str, at: int) -> None:
    """Kill this process (SIGKILL) at its ``at``-th commit of a data file, at ``kind``."""
    from irnet_ray.data import storage
    from irnet_ray.pipeline import commit_log

    if kind not in DRIVER_FAULTS:
        raise SystemExit(f"unknown fault {kind!r}; known: {', '.join(DRIVER_FAULTS)}")
    write_commit, create_exclusive, seen = commit_log.write_commit, commit_log.create_exclusive, [0]

    def faulty_write_commit(output, record, options):
        if record.get("file"):
            seen[0] += 1
        if seen[0] == at and record.get("file"):
            if kind == "before-commit":
                _kill_self()
            if kind == "during-commit":
                commit_log.create_exclusive = half_create
        write_commit(output, record, options)
        if seen[0] == at and record.get("file") and kind == "after-commit":
            _kill_self()

    def half_create(uri, data, options=storage.StorageOptions()):
        if storage.is_s3(uri):  # an S3 put is one request: it happens or not
            _kill_self()
        storage._temporary_copy(storage._local_path(uri), data)
        _kill_self()

    commit_log.write_commit = faulty_write_commit
    assert create_exclusive is storage.create_exclusive


def main(argv: list[str]) -> int:
    """``KIND K -- <irnet-ray arguments>``: the command line with a driver fault."""
    kind, at, separator, *command = argv
    if separator != "--":
        raise SystemExit("usage: python tests/faults.py KIND K -- <irnet-ray arguments>")
    install_driver_fault(kind, int(at))
    from irnet_ray.cli import main as cli_main

    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
