"""read_commits checks that every committed file exists with one listing per folder (not one
request per file): a missing committed file still fails the rerun as damaged, locally and on S3
(moto over HTTP), and a file of the same name in a sub-folder does not count."""

from __future__ import annotations

import pyarrow as pa
import pytest

from irnet_ray.data.parquet_files import write_table
from irnet_ray.data.storage import StorageOptions, delete_file, join
from irnet_ray.pipeline import commit_log as cl


def _output_with_commits(output: str, options: StorageOptions, files: int) -> list[str]:
    paths = []
    for n in range(files):
        written = write_table(join(output, cl.DATA), f"part-{n}.parquet", pa.table({"image_id": [f"i{n}"]}), options)
        paths.append(f"{cl.DATA}/part-{n}.parquet")
        cl.write_commit(output, {"sequence": n, "run_id": "t", "file": {"path": paths[-1], "rows": 1,
                                 "bytes": written["bytes"]}, "image_ids": [f"i{n}"], "errors": []}, options)  # fmt: skip
    return paths


def _check(output: str, options: StorageOptions) -> None:
    paths = _output_with_commits(output, options, 3)
    assert [c["sequence"] for c in cl.read_commits(output, options)] == [0, 1, 2]
    delete_file(join(output, paths[1]), options)
    # The same name one folder down is not the committed file.
    write_table(join(output, cl.DATA, "nested"), "part-1.parquet", pa.table({"image_id": ["i1"]}), options)
    with pytest.raises(cl.JobInputError, match=r"damaged: data/part-1\.parquet \(commit 1\) is missing"):
        cl.read_commits(output, options)


def test_missing_committed_file_is_damage_local(tmp_path):
    _check(str(tmp_path / "out"), StorageOptions())


def test_missing_committed_file_is_damage_s3(s3_server, s3_bucket):
    _check(f"s3://{s3_bucket}/out", StorageOptions(endpoint_url=s3_server))
