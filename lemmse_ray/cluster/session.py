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
from typing import Any

import numpy as np
import ray
import torch
import zarr

from ..core.version import __version__

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


def actor_options() -> dict:
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"num_gpus": 1, "num_cpus": 0} if gpus >= 1 else {"num_cpus": 1}


def default_n_actors() -> int:
    """One actor per GPU of the cluster, else one per CPU."""
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)))


def versions() -> dict[str, str]:
    return {"lemmse_ray": __version__, "torch": torch.__version__, "ray": ray.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
