"""The Ray session of a run: connecting to (or starting) Ray, the device an exact computation runs on, and
the resources an actor asks for.

Everything on Ray in this package goes through :func:`ensure_ray`: it attaches to the cluster named by
``RAY_ADDRESS`` (as under ``ray job submit``) or starts a local Ray, never a cluster that happens to run on
the machine.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import Any

import numpy as np
import ray
import torch
import zarr

from ..core.version import __version__
from .errors import ClusterError

log = logging.getLogger("lemmse_ray")


def ensure_ray(verbose: bool = True, **init_kwargs: Any) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local Ray.

    ``verbose=False`` keeps Ray's own log lines (its start-up messages, the workers' and Ray Train's logs, and
    its "unhandled error" reports of calls still in flight when the driver stops on an actor's error, which
    the driver reports itself in one line) out of the driver's output; progress bars and results are printed
    by the driver itself.
    """
    if not ray.is_initialized():
        if not verbose:
            init_kwargs = {"logging_level": logging.ERROR, "log_to_driver": False, **init_kwargs}
            os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        # without RAY_ADDRESS, ray.init() would attach to whichever cluster was last started on this machine
        # (another user's, or a stale one): start a local Ray as documented instead
        init_kwargs.setdefault("address", os.environ.get("RAY_ADDRESS") or "local")
        ray.init(**init_kwargs)


def exact_device() -> torch.device:
    """CUDA when this process has a GPU (TF32 disabled: the exact path uses full float32/float64), else CPU."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("highest")
        return torch.device("cuda")
    return torch.device("cpu")


#: seconds a start waits for busy units to be freed by other work (e.g. the actors of the previous bank, being killed)
START_TIMEOUT_S = 120.0
#: seconds a start waits for units that an autoscaling cluster has still to add (nodes take minutes to boot)
AUTOSCALE_TIMEOUT_S = 1800.0


def actor_unit() -> str:
    """The resource one shard actor takes: a GPU when the cluster has GPUs, else a CPU."""
    return "GPU" if ray.cluster_resources().get("GPU", 0) >= 1 else "CPU"


def actor_options() -> dict:
    return {"num_gpus": 1, "num_cpus": 0} if actor_unit() == "GPU" else {"num_cpus": 1}


def unit_capacity(unit: str) -> tuple[int, int]:
    """(units present now, units the cluster can have) of ``unit``: the second is larger only on an autoscaling
    cluster whose configuration Ray publishes (the maximum of its node groups, as Ray Train checks it)."""
    present = int(ray.cluster_resources().get(unit, 0))
    try:
        limits = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 -- an internal API: without it, the cluster is taken as fixed
        limits = {}
    return present, max(present, int(limits.get(unit, 0)))


def check_actor_count(n_actors: int, name: str = "n_actors") -> None:
    """Refuse more concurrent actors (or calibration scans) than the cluster can ever have units for
    (:func:`actor_unit`, :func:`unit_capacity`): Ray would keep the extra ones pending forever, and the run would
    wait on them.  ``name`` is the parameter as the caller knows it (``--n-actors`` for the CLI)."""
    unit = actor_unit()
    present, capacity = unit_capacity(unit)
    if n_actors > capacity:
        has = f"the {present} {unit}s of the cluster" if capacity == present else \
            f"the {capacity} {unit}s the cluster can scale to ({present} now)"
        raise ValueError(f"{name}={n_actors} exceeds {has} (each actor takes one {unit}): use {name} "
                         f"{max(capacity, 1)} or fewer, or add nodes")


def wait_for_units(n_actors: int, timeout_s: float = START_TIMEOUT_S) -> bool:
    """Wait until ``n_actors`` units are free to start that many actors, at most ``timeout_s`` for units held by
    other work (actors being killed release theirs); a run never waits forever on units that do not come.
    Returns True when the cluster has fewer units than that now and its autoscaler is to add them: the caller
    then bounds the actors' start by :data:`AUTOSCALE_TIMEOUT_S` (:func:`await_actors`)."""
    check_actor_count(n_actors)
    unit = actor_unit()
    present, _ = unit_capacity(unit)
    if n_actors > present:  # the autoscaler adds nodes for the pending actors
        return True
    deadline = time.monotonic() + timeout_s
    while (free := ray.available_resources().get(unit, 0)) < n_actors:
        if time.monotonic() >= deadline:
            raise ClusterError(f"{n_actors} actors need {n_actors} free {unit}s, but only {free:g} of the cluster's "
                               f"{present} were free after {timeout_s:g} s (held by other tasks or actors)")
        time.sleep(0.2)
    return False


def await_actors(actors: list, timeout_s: float | None = None) -> None:
    """Wait at most ``timeout_s`` (default :data:`AUTOSCALE_TIMEOUT_S`) for ``actors`` to be started (placed and
    initialised); past it they are killed and :class:`ClusterError` is raised."""
    timeout_s = AUTOSCALE_TIMEOUT_S if timeout_s is None else timeout_s
    _, pending = ray.wait([a.describe.remote() for a in actors], num_returns=len(actors), timeout=timeout_s)
    if pending:
        for actor in actors:
            ray.kill(actor)
        raise ClusterError(f"{len(pending)} of {len(actors)} actors had not started after {timeout_s:g} s (the "
                           "cluster did not add the nodes they need)")


def default_n_actors() -> int:
    """One actor per GPU of the cluster, else one per CPU."""
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)))


def versions() -> dict[str, str]:
    return {"lemmse_ray": __version__, "torch": torch.__version__, "ray": ray.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
