"""`ray job submit` entrypoint: `irnet-ray label` on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/label.py \
        --images s3://bucket/set.parquet --irn s3://bucket/runs/irn/model \
        --output s3://bucket/labels/run1 --max-actors 8

Takes exactly the flags of `irnet-ray label`; all logic lives in the package. Rerunning the
same submission after a failure labels only the images that are not committed yet.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the uploaded checkout: make the package
# importable there even where it is not installed into the cluster's image.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from irnet_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
