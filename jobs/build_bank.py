"""Ray job: `lemmse build-bank` — see `python jobs/build_bank.py --help`.

    ray job submit --working-dir . -- python jobs/build_bank.py --dataset photos --sigmas 0.1 --out s3://bucket/run
"""
import sys

import _path  # noqa: F401
from lemmse_ray.cli import main

sys.exit(main(["build-bank", *sys.argv[1:]]))
