"""How big the actor pool is and what each part of the pipeline reserves, from the cluster.

One place answers "does the cluster have GPUs", "how many actors", "how many images per actor
call" and "would this pool hang the cluster", for every batch-inference job.

Defaults that fit the cluster (docs/operations.md, "Throughput settings"):

* ``gpus_per_actor`` ``None``: 1 when the cluster has GPUs, else 0 (CPU actors).
* ``max_actors`` ``None`` ("auto"): one actor per GPU of the cluster when actors use GPUs
  (``GPUs / gpus_per_actor``); on a CPU-only cluster as many as fit next to one decode and one
  write task (CPUs minus those, divided by ``cpus_per_actor``), at most :data:`MAX_CPU_ACTORS`
  (each CPU actor holds both models; more than a few per machine only adds memory).
* ``batch_size`` ``None``: :data:`GPU_BATCH_SIZE` images per call on a GPU (every scale of a
  size bucket goes through the backbone as one batch, which keeps a GPU busy),
  :data:`CPU_BATCH_SIZE` on a CPU (where batching buys little: cache-bound).

The sizes are read when the job starts: a pool sized ``auto`` does not grow past what the
cluster had then; on an autoscaling cluster give ``--max-actors`` (Ray Data starts actors up
to it as nodes join).
"""

from __future__ import annotations

import dataclasses
import math

import ray

__all__ = ["PoolError", "PoolPlan", "plan_pool", "cluster_gpus", "check_cpus", "GPU_BATCH_SIZE", "CPU_BATCH_SIZE", "MAX_CPU_ACTORS"]

GPU_BATCH_SIZE = 16
CPU_BATCH_SIZE = 4
MAX_CPU_ACTORS = 4


class PoolError(ValueError):
    """The pool asked for cannot run on this cluster (the message says what to change)."""


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """What the actor pool and the CPU tasks of one job reserve."""

    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    batch_size: int
    cpu_tasks: dict  # name -> CPUs of one task of each CPU stage (decode, write, CRF, ...)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_actor > 0


def cluster_gpus() -> float:
    """GPUs of the running cluster (the one GPU probe of the pipeline)."""
    return float(ray.cluster_resources().get("GPU", 0))


def _cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def check_cpus(min_actors: int, cpus_per_actor: float, cpu_tasks: dict) -> None:
    """Refuse a pool whose minimum takes every CPU: Ray Data would start the actors and then
    wait forever for CPU tasks that can never be scheduled (the 2-core trap)."""
    total = _cluster_cpus()
    needed = int(min_actors) * float(cpus_per_actor) + sum(float(c) for c in cpu_tasks.values())
    if total > 0 and needed > total:
        tasks = " and ".join(f"one {name} task ({cpus:g})" for name, cpus in cpu_tasks.items())
        flags = ", ".join(f"--{name}-cpus" for name in cpu_tasks)
        raise PoolError(
            f"{min_actors} actor(s) x {cpus_per_actor:g} CPU plus {tasks} need {needed:g} CPUs, the cluster has "
            f"{total:g}: the job would hang. Lower --min-actors, --cpus-per-actor or {flags} (fractions are fine), "
            "or add CPUs"
        )


def plan_pool(
    *,
    min_actors: int,
    max_actors: int | None,
    gpus_per_actor: float | None,
    cpus_per_actor: float,
    batch_size: int | None,
    cpu_tasks: dict,
) -> PoolPlan:
    """Resolve the ``None`` (auto) settings against the running cluster and check the CPUs."""
    gpus = float(gpus_per_actor) if gpus_per_actor is not None else (1.0 if cluster_gpus() > 0 else 0.0)
    if max_actors is None:
        if gpus > 0:
            max_actors = max(1, math.floor(cluster_gpus() / gpus + 1e-9))
        else:
            free = _cluster_cpus() - sum(float(c) for c in cpu_tasks.values())
            max_actors = min(MAX_CPU_ACTORS, max(1, math.floor(free / float(cpus_per_actor) + 1e-9)))
        max_actors = max(int(min_actors), max_actors)
    if not 1 <= int(min_actors) <= int(max_actors):
        raise PoolError(f"need 1 <= min_actors <= max_actors, got min {min_actors}, max {max_actors}")
    check_cpus(int(min_actors), float(cpus_per_actor), cpu_tasks)
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE if gpus > 0 else CPU_BATCH_SIZE
    return PoolPlan(min_actors=int(min_actors), max_actors=int(max_actors), gpus_per_actor=gpus,
                    cpus_per_actor=float(cpus_per_actor), batch_size=int(batch_size), cpu_tasks=dict(cpu_tasks))  # fmt: skip
