"""Ray job: `lemmse train` — see `python jobs/train.py --help`.

    ray job submit --working-dir . -- python jobs/train.py --dataset photos --sigmas 0.1 --out s3://bucket/run
"""
import sys

import _path  # noqa: F401
from lemmse_ray.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
