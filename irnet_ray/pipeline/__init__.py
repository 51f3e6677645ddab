"""The one batch-inference pipeline that relation mining and labeling are defined on.

    records -> decode tasks (CPU) -> model actor pool (GPU when there is one; one batched model
    call per batch) -> [a CPU stage] -> Parquet writer tasks -> the driver's commit log

* :mod:`.resources`: pool size, GPUs, CPU reservations and batch size, from the cluster;
* :mod:`.stages`: the decode stage, the model-actor base class, the writer;
* :mod:`.commit_log`: the output folder's protocol (job record, commits, errors, manifest);
* :mod:`.run`: the driver (plan, stream, commit, finish).

Jobs on it: :mod:`irnet_ray.label` (pseudo masks), :mod:`irnet_ray.mining` (IR labels).
"""
