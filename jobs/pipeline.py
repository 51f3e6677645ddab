"""`ray job submit` entrypoint: `irnet-ray pipeline` (train-cam -> mine-relations -> train-irn ->
label [-> export]) on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pipeline.py \
        --images voc:s3://bucket/VOC2012 --storage s3://bucket/irnet/runs \
        --output s3://bucket/irnet/labels --export-coco s3://bucket/irnet/coco.json \
        --train-cam-args='--weights IMAGENET1K_V1 --num-workers 4' --label-args='--max-actors 8'

Takes exactly the flags of `irnet-ray pipeline`; all logic lives in the package. Resubmitting
the same job after a failure resumes: every finished stage returns at once.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the uploaded checkout: make the package
# importable there even where it is not installed into the cluster's image.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from irnet_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
