"""`ray job submit` entrypoint: `irnet-ray train-maskrcnn` on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_maskrcnn.py --help

Takes exactly the flags of `irnet-ray train-maskrcnn`; all logic lives in the package.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the uploaded checkout: make the package
# importable there even where it is not installed into the cluster's image.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from irnet_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-maskrcnn", *sys.argv[1:]]))
