"""Images that kill their worker process end as error rows instead of being retried forever.

A native decoder crash or an out-of-memory kill takes the whole worker process down; Ray then
re-runs the task (or restarts the actor and re-sends the batch), and by default it does so
without limit: one poison image would hang the job. :class:`AttemptLedger` (one small actor per
run, created by the driver) remembers which images were started in a process that never
finished them:

1. a stage calls ``begin`` with its batch's image keys before touching them, ``end`` after;
2. when ``begin`` reports that some of them were started before and never ended, an earlier
   attempt of this batch died: the stage goes one image at a time, each with its own
   ``begin``/``end`` ("solo" starts), so the culprit, and only it, accumulates unfinished starts;
3. an image with ``max_crashes`` unfinished solo starts is not tried again: it becomes an error
   row (reason ``crashed_worker``) and the job goes on.

A poison image thus costs at most ``max_crashes + 1`` worker deaths; Ray's retries and actor
restarts are finite as well (:func:`retry_options`), so a worker that dies for any other reason
still ends the job with an error rather than a hang.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import ray

from irnet_ray.config import DEFAULT_MAX_CRASHES

__all__ = ["AttemptLedger", "guarded", "retry_options", "DEFAULT_MAX_CRASHES"]

#: Worker deaths a stage absorbs beyond those of poison images (flaky nodes, preemption).
_SPARE_RETRIES = 3

T = TypeVar("T")


@ray.remote(num_cpus=0, max_restarts=0)
class AttemptLedger:
    """Unfinished starts per image key, for batches and for single images (module doc)."""

    def __init__(self) -> None:
        self.open: dict[str, dict[str, int]] = {"batch": {}, "solo": {}}

    def begin(self, keys: Sequence[str], kind: str) -> list[int]:
        """Count a start of each key; returns the unfinished starts each had before this one."""
        table = self.open[kind]
        before = [table.get(k, 0) for k in keys]
        for k in keys:
            table[k] = table.get(k, 0) + 1
        return before

    def end(self, keys: Sequence[str]) -> None:
        for table in self.open.values():
            for k in keys:
                table.pop(k, None)


def guarded(
    ledger,
    max_crashes: int,
    keys: Sequence[str],
    process: Callable[[list[int]], list[T]],
    crashed: Callable[[int, int], T],
) -> list[T]:
    """``process(indices)`` of every key's item, one result each, in order; an item whose
    processing killed the worker ``max_crashes`` times alone gets ``crashed(index, starts)``.
    ``ledger`` ``None``: no guard (plain call)."""
    keys = [str(k) for k in keys]
    if ledger is None or not keys:
        return process(list(range(len(keys))))
    if not any(ray.get(ledger.begin.remote(keys, "batch"))):
        results = process(list(range(len(keys))))
        ray.get(ledger.end.remote(keys))
        return results
    results: list[T] = []
    for index, key in enumerate(keys):
        (starts,) = ray.get(ledger.begin.remote([key], "solo"))
        results.extend([crashed(index, starts)] if starts >= max_crashes else process([index]))
        ray.get(ledger.end.remote([key]))  # before the next image: a crash there must not count here
    return results


def retry_options(max_crashes: int, batch_size: int, actor: bool) -> dict:
    """Finite Ray retries for a stage: enough for every image of a batch to be a poison image
    (``max_crashes + 1`` deaths each), plus a few spare ones; never unlimited."""
    budget = int(batch_size) * (int(max_crashes) + 1) + _SPARE_RETRIES
    return {"max_restarts": budget, "max_task_retries": budget} if actor else {"max_retries": budget}
