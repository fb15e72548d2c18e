"""Ray job: `lemmse estimate` — see `python jobs/estimate.py --help`.

    ray job submit --working-dir . -- python jobs/estimate.py --dataset photos --sigmas 0.1 --out s3://bucket/run
"""
import sys

import _path  # noqa: F401
from lemmse_ray.cli import main

sys.exit(main(["estimate", *sys.argv[1:]]))
