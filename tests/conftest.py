"""Shared fixtures and environment. One local Ray cluster per test session (started only if a test needs it).

The session cluster is a ``ray.cluster_utils.Cluster`` head (2 CPUs, loopback only, fast node-failure
detection) so that multi-node tests can add and remove nodes without starting a second Ray.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process binds to 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Triton kernels run in Triton's interpreter on CPU tensors.  Triton reads this when a kernel is decorated
# (``@triton.jit``, i.e. when lemmse_ray.kernels.triton_kernel is imported): conftest.py is imported before any test
# module, so every import of the kernel in the session sees it.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "node_ip_address": "127.0.0.1",
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                           "health_check_initial_delay_ms": 0}})
    ray.init(address=cluster.address, include_dashboard=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
