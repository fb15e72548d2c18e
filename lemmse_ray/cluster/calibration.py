r"""The measured inputs of the plan's time model (:mod:`lemmse_ray.cluster.plan`): rates of the current cluster.

Two ways to measure them, with one scan timer (:func:`scan_rate`):

- **Before any actor exists** (``lemmse plan``, :func:`calibrate`): as many concurrent Ray tasks as there will
  be actors, each placed as an actor is (:func:`~lemmse_ray.cluster.session.actor_options`), build a
  :class:`~lemmse_ray.PatchBank` part of one shard's worth of the bank's first training images and time its
  scan; the first one also times the load of the bank's first shard, once the bank exists.  The actors' own
  start (a new process importing torch, then loading its shards) is counted as the shard load alone.
- **On the estimate step's own actors** (:func:`~lemmse_ray.cluster.actors.calibrate_actors`), once they
  hold their shards: each times the scan of its first part, and the seconds the actors took to start and
  load are measured, not modelled.  Nothing is built twice and no other process is started.

Either way a scan is timed for at least :data:`CALIBRATION_SECONDS` (at least two scans, after one warm-up
scan), the batch preparation for a quarter of that, with the run's statistics, top-k and kernels; the rate
reported is the median over the concurrent scans.  The driver's per-batch overhead is one Ray round trip of
the first query batch.
"""
from __future__ import annotations

import time

import numpy as np
import ray
import torch

from ..bank.features import met_pairs
from ..bank.memory import PatchBank, prepare_scan
from ..core.classes import ClassPlan, plan_classes
from ..core.patches import PatchGeometry
from ..core.problems import Problem
from ..core.validation import DTYPES
from ..storage.bank_store import Bank, BankLayout
from ..storage.ownership import open_group
from .session import actor_options, exact_device

CALIBRATION_SECONDS = 0.5


def scan_rate(part: PatchBank, n_part_images: int, problem: Problem, plan: ClassPlan, centers: np.ndarray,
              batch: tuple[torch.Tensor, torch.Tensor | None], sigma: float, dtype: torch.dtype,
              device: torch.device, stats: tuple[str, ...], topk: int, kernel: str, held: int | None) -> dict:
    """``{"pairs_per_s", "prepare_s"}``: the pairs/s of ``part`` (``n_part_images`` images, holding class
    ``held`` as images) scanned against the query ``batch`` as an actor scans it, and the seconds it takes to
    prepare the batch's query features."""
    z, mask = batch
    prepared = prepare_scan(z, mask, sigma, problem, plan, centers, dtype, device, stats, topk, kernel, held)
    part.scan(prepared)  # warm-up
    t0, prepares = time.perf_counter(), 0
    while prepares < 2 or time.perf_counter() - t0 < CALIBRATION_SECONDS / 4:
        prepared = prepare_scan(z, mask, sigma, problem, plan, centers, dtype, device, stats, topk, kernel, held)
        prepares += 1
    prepare_s = (time.perf_counter() - t0) / prepares
    t0, scans = time.perf_counter(), 0
    while scans < 2 or time.perf_counter() - t0 < CALIBRATION_SECONDS:
        part.scan(prepared)
        if device.type == "cuda":
            torch.cuda.synchronize()
        scans += 1
    seconds = time.perf_counter() - t0
    rows = np.diff(BankLayout(n_part_images, plan.rows_per_image(), n_part_images).offsets)
    return {"pairs_per_s": scans * met_pairs(z, mask, problem, plan, rows) / seconds, "prepare_s": prepare_s}


def calibration_scan(problem: Problem, geometry: dict, images: torch.Tensor, n_images: int, centers: np.ndarray,
                     batch: tuple[torch.Tensor, torch.Tensor | None], sigma: float, dtype: str, kernel: str,
                     bank_url: str | None, storage_options: dict | None, stats: tuple[str, ...] = (),
                     topk: int = 0) -> dict:
    """Where an actor runs: :func:`scan_rate` of a bank part of ``images`` (one shard's worth of the bank's first
    training images, of ``n_images``), and the load rate of the bank's first shard (when the bank exists)."""
    device = exact_device()
    plan = plan_classes(problem, PatchGeometry(tuple(geometry["shape"]), geometry["patch_size"],
                                               geometry["padding"], geometry["candidates"]))
    dt = DTYPES[dtype]
    part = PatchBank.part(images, problem, plan, centers, 0, n_images, dt, device)
    held = None if part.sliding is None else part.sliding.index
    out = {**scan_rate(part, images.shape[0], problem, plan, centers, batch, sigma, dt, device, stats, topk, kernel,
                       held), "read_mb_s": None}
    if bank_url is not None:
        try:
            bank = Bank(bank_url, open_group(bank_url, "r", storage_options), plan, problem, storage_options)
        except Exception:  # no bank yet: the read rate stays unknown
            return out
        if bank.n_shards and not bank.missing_shards():
            first, last = bank.layout.shard_range(0)
            t0 = time.perf_counter()
            PatchBank.part(bank.read_images(0), problem, plan, bank.centers, 0, bank.layout.n_images, dt, device)
            stored = (last - first) * int(np.prod(plan.geometry.shape)) * bank.group["images"].dtype.itemsize
            out["read_mb_s"] = stored / 1e6 / (time.perf_counter() - t0)
    return out


# remote versions of module functions, so that Ray pickles them by reference (cloudpickle would pickle a
# decorated function by value, with every ``torch`` submodule whose name its code mentions)
_calibrate = ray.remote(calibration_scan)


@ray.remote
def _echo(batch: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    return batch[0].shape[0]


def batch_overhead(batch: tuple[torch.Tensor, torch.Tensor | None], echo=_echo.remote) -> float:
    """Seconds of one Ray round trip of ``batch`` from the driver through ``echo`` (a task by default, which
    needs a free CPU; an actor's method on a cluster its actors fill), after one untimed trip."""
    ray.get(echo(ray.put(batch)))
    t0 = time.perf_counter()
    ray.get(echo(ray.put(batch)))
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def calibrate(problem: Problem, plan: ClassPlan, centers: np.ndarray, images: torch.Tensor, n_images: int,
              z: torch.Tensor, mask: torch.Tensor | None, sigma: float, batch_images: int,
              dtype: torch.dtype = torch.float32, kernel: str = "auto", bank_url: str | None = None,
              storage_options: dict | None = None, n_actors: int = 1, stats: tuple[str, ...] = (),
              topk: int = 0) -> dict:
    """Before the actors exist: pairs/s per actor (the median of ``n_actors`` concurrent scans of a part of
    ``images``, one shard's worth of the first of the bank's ``n_images`` training images), the batch
    preparation and the store's load rate where actors run, and the driver's per-batch overhead on one batch
    of ``z`` (see the module docstring).  Needs Ray."""
    batch = (z[:batch_images], None if mask is None else mask[:batch_images])
    overhead = batch_overhead(batch)
    dname = str(dtype).replace("torch.", "")
    # as many concurrent scans as actors (what they share on a node: cores, memory bandwidth, a GPU's host)
    measured = ray.get([_calibrate.options(**actor_options()).remote(
        problem, plan.geometry.spec(), images, n_images, centers, batch, sigma, dname, kernel,
        bank_url if i == 0 else None, storage_options, stats, topk)
        for i in range(n_actors)])
    return {"pairs_per_s": median([m["pairs_per_s"] for m in measured]),
            "prepare_s": median([m["prepare_s"] for m in measured]),
            "read_mb_s": measured[0]["read_mb_s"], "batch_overhead_s": overhead}
