"""Ray job: `lemmse study` — see `python jobs/study.py --help`.

    ray job submit --working-dir . -- python jobs/study.py agreement --size full --root cifar10=/data/cifar10 \
        --root fashion-mnist=/data/fmnist --root ffhq32=/data/ffhq32 --out s3://bucket/agreement
"""
import sys

import _path  # noqa: F401
from lemmse_ray.cli import main

sys.exit(main(["study", *sys.argv[1:]]))
