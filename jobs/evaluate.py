"""Ray job: `lemmse evaluate` — see `python jobs/evaluate.py --help`.

    ray job submit --working-dir . -- python jobs/evaluate.py --dataset photos --sigmas 0.1 --out s3://bucket/run
"""
import sys

import _path  # noqa: F401
from lemmse_ray.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
