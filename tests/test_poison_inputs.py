"""Images that kill their worker process end as ``crashed_worker`` error rows, in bounded time.

The processes really die (``os._exit``) inside Ray tasks and actors; the deaths are caused by
test-only code (a task function and a ModelActor subclass defined here), never by hooks in
the production modules.
"""

from __future__ import annotations

import collections
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray import cloudpickle

from irnet_ray.data.sources import ImageRecord, synthetic_records
from irnet_ray.data.storage import StorageOptions
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.pipeline import commit_log as cl
from irnet_ray.pipeline.attempts import AttemptLedger, guarded
from irnet_ray.pipeline.resources import PoolPlan
from irnet_ray.pipeline.run import PipelineSpec, finish_output, open_output, run_pipeline
from irnet_ray.pipeline.stages import ERROR_COLUMNS, ModelActor

# Workers cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

POISON = "poison"


def _process_or_die(keys: list[str], indices: list[int]) -> list[str]:
    if any(keys[i] == POISON for i in indices):
        os._exit(1)  # a native crash or an OOM kill: the worker process is gone
    return [f"ok:{keys[i]}" for i in indices]


@ray.remote(max_retries=8)
def _guarded_task(ledger, keys: list[str]) -> list[str]:
    return guarded(ledger, 2, keys, lambda indices: _process_or_die(keys, indices),
                   lambda i, starts: f"crashed:{keys[i]}:{starts}")  # fmt: skip


@pytest.mark.timeout(180)
def test_a_worker_killing_item_becomes_crashed_after_max_crashes_and_only_it(ray_cluster):
    ledger = AttemptLedger.remote()
    keys = ["a", POISON, "b", "c"]
    out = ray.get(_guarded_task.remote(ledger, keys))
    # The batch died once, then the poison item alone died twice: given up; the others labeled.
    assert out == ["ok:a", f"crashed:{POISON}:2", "ok:b", "ok:c"]
    # A clean batch costs one begin/end and no isolation.
    assert ray.get(_guarded_task.remote(ledger, ["d", "e"])) == ["ok:d", "ok:e"]
    ray.kill(ledger)


@ray.remote(max_retries=2)
def _guarded_task_without_enough_retries(ledger, keys: list[str]) -> list[str]:
    return guarded(ledger, 5, keys, lambda indices: _process_or_die(keys, indices), lambda i, s: "crashed")


@pytest.mark.timeout(180)
def test_retries_are_finite(ray_cluster):
    ledger = AttemptLedger.remote()
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(_guarded_task_without_enough_retries.remote(ledger, [POISON]))
    ray.kill(ledger)


_ECHO = pa.schema([
    pa.field("image_id", pa.string()), pa.field("uri", pa.string()), pa.field("classes", pa.list_(pa.int64())),
    pa.field("height", pa.int64()),
])  # fmt: skip


class _EchoActor(ModelActor):
    """A model actor whose 'model' dies on the poison image (test-only)."""

    schema = pa.schema([*_ECHO, *ERROR_COLUMNS])

    def process(self, rows: list[dict]) -> list[dict]:
        if any(row["image_id"] == POISON for row in rows):
            os._exit(1)
        return [{**self.base_fields(row), "height": int(row["height"])} for row in rows]


@pytest.mark.timeout(300)
def test_poison_image_on_a_two_actor_pipeline_ends_as_one_error_row(ray_cluster, tmp_path):
    records, _ = synthetic_records(SyntheticConfig(num_images=9, image_size=(32, 32), num_classes=2))
    records = list(records[:4]) + [ImageRecord(POISON, records[4].uri, records[4].classes)] + list(records[5:])
    output, options = str(tmp_path / "out"), StorageOptions()
    job = {"format": "test-echo", "models": {}, "settings": {}, "settings_id": "s"}
    plan = PoolPlan(min_actors=2, max_actors=2, gpus_per_actor=0, cpus_per_actor=0.5, batch_size=3,
                    cpu_tasks={"decode": 0.25, "write": 0.25})  # fmt: skip
    spec = PipelineSpec(
        decode_kwargs={"options": options, "max_side": None, "min_side": 1, "max_pixels": 10**6,
                       "max_decode_bytes": 64 << 20},
        decode_batch_size=3, actor=_EchoActor, actor_kwargs={},
        write_kwargs={"output": output, "options": options, "data_schema": _ECHO, "large_columns": (), "run_id": "run"},
        rows_per_file=4,
    )  # fmt: skip
    with open_output(output, job, options, overwrite=False, run_id="run") as (_, committer):
        run_pipeline(records, committer, spec, plan, max_crashes=2)
        manifest = finish_output(output, committer, {(r.image_id, 0) for r in records}, options, dict(job))
    rows = [r for f in manifest["data_files"] for r in pq.read_table(f"{output}/{f['path']}").to_pylist()]
    errors = pq.read_table(f"{output}/{manifest['errors_file']['path']}").to_pylist()
    assert [(e["image_id"], e["stage"], e["reason"]) for e in errors] == [(POISON, "label", "crashed_worker")]
    assert "2 time(s)" in errors[0]["message"]
    counts = collections.Counter([r["image_id"] for r in rows] + [e["image_id"] for e in errors])
    assert counts == collections.Counter(r.image_id for r in records)  # every input row exactly once
    assert all(r["height"] == 32 for r in rows)
    assert cl.read_commits(output, options)  # committed through the normal commit log
