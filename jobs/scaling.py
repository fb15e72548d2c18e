"""Ray job: `lemmse scaling` — strong and weak scaling of the estimate step; see `python jobs/scaling.py --help`.

On a cluster (``RAY_ADDRESS`` set, or under ``ray job submit``) it measures that cluster; ``--simulate-nodes N``
first starts a local ``ray.cluster_utils.Cluster`` of N nodes sharing this machine's cores.

    ray job submit --working-dir . -- python jobs/scaling.py --dataset photos --out s3://bucket/run
    python jobs/scaling.py --simulate-nodes 2 --n-train 64 --n-queries 2 --out results/scaling
"""
import atexit
import sys

import _path  # noqa: F401
from lemmse_ray.cli import main

argv = sys.argv[1:]
if "--simulate-nodes" in argv:
    import ray
    from ray.cluster_utils import Cluster

    at = argv.index("--simulate-nodes")
    nodes = int(argv[at + 1])
    del argv[at: at + 2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    atexit.register(cluster.shutdown)
    atexit.register(ray.shutdown)  # runs first
sys.exit(main(["scaling", *argv]))
