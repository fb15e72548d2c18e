"""Ray job: `lemmse run` — see `python jobs/pipeline.py --help`.

    ray job submit --working-dir . -- python jobs/pipeline.py --dataset photos --sigmas 0.1 --out s3://bucket/run
"""
import sys

import _path  # noqa: F401
from lemmse_ray.cli import main

sys.exit(main(["run", *sys.argv[1:]]))
