r"""Bank building and exact estimation on Ray (DESIGN §2.3).

* :func:`build_bank` — Ray tasks, one per missing shard, each computing its rows from the training images
  it needs and writing the whole shard (idempotent: re-running completes the missing shards only).
* :class:`ShardActor` — holds a contiguous range of shards in (GPU) memory, σ-free; for a broadcast query
  batch it returns one merged :class:`~lemmse_ray.kernel.Partials` over its rows.
* :func:`estimate_on_ray` — the driver: prepares query features per batch, broadcasts them through the
  object store, merges the actors' partials in a fixed order (so results do not depend on timing), finalises,
  and writes each batch to the output Zarr group before flagging it done; finished batches are skipped on
  restart.  Actors are restartable (``max_restarts``, default 3) and their calls retried
  (``max_task_retries``, default 3), so a killed actor, or one lost with its node, is recreated elsewhere and
  its partial recomputed; each batch takes exactly one partial per actor, so nothing is merged twice.  An
  error raised by the code (a damaged bank, a missing array) is not retried: the driver raises
  :class:`ActorFailed` naming the actor's shards, the bank and the original exception.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import time
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from .backends import check_kernel
from .bank import class_centers
from .classes import ClassPlan, plan_classes
from .estimate import check_inputs, check_stats, to_result
from .kernel import Partials, finalize, merge
from .ownership import check_apart, open_group
from .patches import PatchGeometry
from .problems import Problem
from .queries import key_features, keys_to, prepare_queries, queries_to, scan
from .redact import public
from .results import GRID_STATS, inputs_hash, open_results, pending_batches, record_run, write_batch, write_inputs
from .store import (Bank, BankLayout, bank_attributes, create_bank_group, fingerprint, open_bank, shard_images,
                    shard_rows_for, write_shard)
from .validation import as_images, check_noise_level

log = logging.getLogger("lemmse_ray")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3


class ActorFailed(RuntimeError):
    """A shard actor failed for good (an error in its code, or more deaths than ``max_restarts``)."""


def ensure_ray(verbose: bool = True, **init_kwargs: Any) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local Ray.

    ``verbose=False`` keeps Ray's own log lines (its start-up messages, the workers' and Ray Train's logs)
    out of the driver's output; progress bars and results are printed by the driver itself.
    """
    if not ray.is_initialized():
        if not verbose:
            init_kwargs = {"logging_level": logging.ERROR, "log_to_driver": False, **init_kwargs}
        # without RAY_ADDRESS, ray.init() would attach to whichever cluster was last started on this machine
        # (another user's, or a stale one): start a local Ray as documented instead
        init_kwargs.setdefault("address", os.environ.get("RAY_ADDRESS") or "local")
        ray.init(**init_kwargs)


@ray.remote(num_cpus=1)
def _build_shard(url: str, storage_options: dict | None, shard: int, images: np.ndarray, layout: BankLayout,
                 problem: Problem, plan: ClassPlan, centers: np.ndarray, dtype: str) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    first, last = shard_images(shard, layout)
    rows = shard_rows_for(torch.from_numpy(np.array(images[first:last])), first, shard, layout, problem, plan,
                          centers)
    write_shard(open_group(url, "r+", storage_options), shard, rows, DTYPES[dtype])
    return shard, len(rows), time.perf_counter() - t0


def build_bank(url: str, train, problem: Problem, patch_size: int = 5, padding: str = "zeros",
               candidates: str = "all", shard_rows: int = 1 << 16, dtype: torch.dtype = torch.float32,
               storage_options: dict | None = None, overwrite: bool = False, progress: bool = True) -> Bank:
    """Build (or finish) the patch bank of ``train`` for ``problem`` at ``url`` with Ray tasks.

    Returns the opened bank.  Throughput (rows/s) is logged and stored in ``bank.build_stats``.
    """
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows must be a positive integer, got {shard_rows!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    train = as_images(train, "train")
    shape = tuple(train.shape[1:])
    problem.check_shape(shape)
    plan = plan_classes(problem, PatchGeometry(shape, patch_size, padding, candidates))
    centers = class_centers(train, problem, plan)
    layout = BankLayout(train.shape[0], plan.rows_per_image(), shard_rows)
    attrs = bank_attributes(problem, plan, layout, fingerprint(train), dtype)
    group = create_bank_group(url, attrs, centers, storage_options, overwrite)
    missing = [int(s) for s in np.flatnonzero(group["done"][...] == 0)]
    ensure_ray()
    t0 = time.perf_counter()
    rows_written = 0
    if missing:
        images = ray.put(train.numpy())
        refs = [ray.put(x) for x in (layout, problem, plan, centers)]
        dname = attrs["dtype"]
        pending = [_build_shard.remote(url, storage_options, s, images, *refs, dname) for s in missing]
        with tqdm(total=len(missing), desc="bank shards", unit="shard", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                _, rows, _ = ray.get(done[0])
                rows_written += rows
                bar.update(1)
    seconds = time.perf_counter() - t0
    bank = open_bank(url, problem, plan, storage_options)
    bank.build_stats = {"shards_written": len(missing), "rows_written": rows_written, "seconds": seconds,
                        "rows_per_s": rows_written / seconds if seconds > 0 and rows_written else 0.0}
    log.info("bank %s: %d shards written (%d rows) in %.1f s, %.0f rows/s; %d were already done", public(url),
             len(missing), rows_written, seconds, bank.build_stats["rows_per_s"], bank.n_shards - len(missing))
    return bank


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
class ShardActor:
    """Holds shards ``[first, last)`` of a bank in device memory and scans query batches against them.

    ``kernel`` (``"auto"``, ``"torch"``, ``"triton"``, :mod:`lemmse_ray.backends`): with ``"auto"`` a CUDA actor
    with Triton installed scans float32 banks with the fused Triton kernel.  Whether ``"triton"`` can run is
    checked where the actor runs (its node's packages and device), at its first scan.
    """

    def __init__(self, url: str, storage_options: dict | None, problem: Problem, geometry: dict, first: int,
                 last: int, dtype: str, kernel: str = "auto"):
        self.device = exact_device()
        # the plan is recomputed here (not passed by reference) so that a restarted actor needs nothing from
        # the driver's object store
        plan = plan_classes(problem, PatchGeometry(tuple(geometry["shape"]), geometry["patch_size"],
                                                   geometry["padding"], geometry["candidates"]))
        bank = Bank(url, open_group(url, "r", storage_options), plan, problem, storage_options)
        start, stop = bank.layout.shard_range(first)[0], bank.layout.shard_range(last - 1)[1]
        arrays = bank.read_rows(start, stop).to(DTYPES[dtype])
        self.keys = keys_to(key_features(arrays, plan, bank.centers), self.device)
        self.plan = plan
        self.kernel = kernel
        self.rows = stop - start
        self.calls = 0

    def partials(self, queries, stats: tuple[str, ...], topk: int) -> Partials:
        self.calls += 1
        part = scan(self.keys, self.plan, queries_to(queries, self.device), stats, topk, self.kernel)
        return part.to(device="cpu")

    def describe(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "device": str(self.device), "rows": self.rows,
                "pid": os.getpid(), "calls": self.calls}


def exact_device() -> torch.device:
    """CUDA when this process has a GPU (TF32 disabled: the exact path uses full float32/float64), else CPU."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("highest")
        return torch.device("cuda")
    return torch.device("cpu")


def _actor_options() -> dict:
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"num_gpus": 1, "num_cpus": 0} if gpus >= 1 else {"num_cpus": 1}


def actor_shards(n_shards: int, n_actors: int) -> list[tuple[int, int]]:
    """The contiguous shard range ``[first, last)`` of each of ``n_actors`` actors (at most one per shard)."""
    bounds = np.linspace(0, n_shards, min(n_actors, n_shards) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _check_limit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def start_actors(bank: Bank, n_actors: int | None = None, dtype: str = "float32", kernel: str = "auto",
                 max_restarts: int = MAX_RESTARTS, max_task_retries: int = MAX_TASK_RETRIES) -> list:
    """One actor per contiguous range of shards (default: one per GPU, else one per CPU, at most one per shard).

    ``kernel``: the actors' kernel (see :class:`ShardActor`).  A dead actor (killed, lost with its node) is
    restarted at most ``max_restarts`` times, and a call to it resubmitted at most ``max_task_retries`` times;
    errors raised by the actor's code are never retried.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    check_kernel(kernel, DTYPES[dtype])
    _check_limit("max_restarts", max_restarts)
    _check_limit("max_task_retries", max_task_retries)
    options = _actor_options()
    if n_actors is None:
        resources = ray.cluster_resources()
        n_actors = int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)))
    if isinstance(n_actors, bool) or not isinstance(n_actors, int) or n_actors < 1:
        raise ValueError(f"n_actors must be a positive integer, got {n_actors!r}")
    geometry = bank.plan.geometry.spec()
    return [ShardActor.options(**options, max_restarts=max_restarts, max_task_retries=max_task_retries).remote(
                bank.url, bank.storage_options, bank.problem, geometry, first, last, dtype, kernel)
            for first, last in actor_shards(bank.n_shards, n_actors)]


def original_error(err: Exception) -> str:
    """``"Type: message"`` of the exception behind a Ray error, on one line."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".replace("\n", " ")
    text = re.sub(r"\x1b\[[0-9;]*m", "", getattr(err, "error_msg", None) or str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if getattr(err, "_actor_init_failed", False) and lines:
        return lines[-1]  # the creation task's traceback ends with "Type: message"
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def gather_partials(refs: list, bank: Bank) -> list[Partials]:
    """The actors' partials, in order; :class:`ActorFailed` naming the shards of the first actor that failed."""
    parts = []
    for ref, (first, last) in zip(refs, actor_shards(bank.n_shards, len(refs))):
        try:
            parts.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            raise ActorFailed(f"actor for shards [{first}, {last}) of {public(bank.url)} failed: "
                              f"{original_error(err)}") from err
    return parts


def estimate_on_ray(bank: Bank, z, sigma: float, out_url: str, *, mask=None, x=None, batch_images: int = 8,
                    actors: list | None = None, n_actors: int | None = None, stats=("variance", "ess"),
                    topk: int = 5, dtype: torch.dtype = torch.float32, storage_options: dict | None = None,
                    metadata: dict | None = None, overwrite: bool = False, progress: bool = True,
                    kernel: str = "auto", max_restarts: int = MAX_RESTARTS,
                    max_task_retries: int = MAX_TASK_RETRIES):
    """Estimate every pixel of ``z`` against ``bank`` with Ray actors; write and return the output group.

    Same numbers as :func:`lemmse_ray.estimate` on the bank's training images (up to float rounding of the
    merge order).  Batches already flagged done in ``out_url`` (same configuration) are not recomputed.
    ``actors``: running actors of this bank to use; an empty list is filled with the actors started here
    (only if some batch is left to compute), so that a caller can share them over several outputs.
    ``kernel``: kernel of the actors started here (``"auto"``, ``"torch"``, ``"triton"``; see :class:`ShardActor`);
    actors passed in keep their own.  ``max_restarts``, ``max_task_retries``: limits of the actors started here
    (see :func:`start_actors`).  ``out_url`` may not be the bank, nor be inside it or hold it.  Nothing secret
    of ``metadata`` is stored (:func:`lemmse_ray.redact.public`).  A resumed output keeps the ``batch_images``
    it was created with.
    """
    check_apart(out_url, bank.url)
    stats = check_stats(stats, topk)
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sigma = check_noise_level(sigma, dtype)
    check_kernel(kernel, dtype)
    if isinstance(batch_images, bool) or not isinstance(batch_images, int) or batch_images < 1:
        raise ValueError(f"batch_images must be a positive integer, got {batch_images!r}")
    geometry = bank.plan.geometry
    dummy = torch.zeros((1, *geometry.shape), dtype=torch.float64)
    _, z, mask, _ = check_inputs(dummy, z, bank.problem, mask, geometry.patch_size, geometry.padding,
                                 geometry.candidates)
    if x is not None:
        x = as_images(x, "x")
        if x.shape != z.shape:
            raise ValueError(f"x must have the shape of z {tuple(z.shape)}, got {tuple(x.shape)}")
    dname = str(dtype).replace("torch.", "")
    config = {"bank_fingerprint": bank.attrs["fingerprint"], "bank_plan": bank.attrs["plan_hash"],
              "problem": bank.problem.spec(), "geometry": geometry.spec(), "sigma": sigma, "stats": list(stats),
              "topk": topk, "dtype": dname, "inputs": inputs_hash(z, mask), "n_rows": bank.n_rows}
    _check_limit("max_restarts", max_restarts)
    _check_limit("max_task_retries", max_task_retries)
    group = open_results(out_url, config, tuple(z.shape), batch_images, stats, topk, dname, storage_options,
                         overwrite)
    batch_images = group.attrs["batch_images"]  # a resumed output keeps its layout
    write_inputs(group, z.to(torch.float32), None if mask is None else mask.to(torch.float32),
                 None if x is None else x.to(torch.float32))
    group.attrs["metadata"] = public({**(metadata or {}), "versions": versions()})
    todo = pending_batches(group)
    n_batches = group.attrs["n_batches"]
    log.info("%s: %d of %d batches to compute (%d already done)", public(out_url), len(todo), n_batches,
             n_batches - len(todo))
    if todo and not actors:  # a finished output starts no actor (they would load their shards for nothing)
        ensure_ray()
        started = start_actors(bank, n_actors, dname, kernel, max_restarts, max_task_retries)
        if actors is None:
            actors = started
        else:
            actors.extend(started)  # the caller's (empty) list: it reuses them for its next outputs
    t0 = time.perf_counter()
    computed = []
    plan, centers = bank.plan, bank.centers
    for b in tqdm(todo, desc="query batches", unit="batch", disable=not progress):
        lo, hi = b * batch_images, min(z.shape[0], (b + 1) * batch_images)
        queries = prepare_queries(z[lo:hi], None if mask is None else mask[lo:hi], bank.problem, plan, centers,
                                  sigma, dtype)
        ref = ray.put(queries)
        parts = gather_partials([a.partials.remote(ref, stats, topk) for a in actors], bank)
        total = parts[0]
        for part in parts[1:]:
            total = merge(total, part)
        out = finalize(total, bank.n_rows)
        res = to_result(out, torch.zeros((0, 2), dtype=torch.int64), (hi - lo, *z.shape[1:]),
                        tuple(s for s in stats if s != "topk"))
        values = {"mean": res.mean.numpy()}
        if "variance" in stats:
            values["variance"] = res.variance.numpy()
        for name in GRID_STATS:
            if name in stats:
                values[name] = getattr(res, name).numpy()
        if "topk" in stats:
            grid = (hi - lo, *z.shape[2:], topk)
            rows = out["topk_rows"].numpy()
            src = bank.source(rows)
            found = rows >= 0
            values["topk_image"] = np.where(found, src[..., 0], -1).reshape(grid)
            values["topk_position"] = np.where(found, src[..., 1], -1).reshape(grid)
            values["topk_logits"] = out["topk_logits"].numpy().reshape(grid)
        write_batch(group, b, lo, values)
        computed.append(b)
    seconds = time.perf_counter() - t0
    pairs = sum(min(z.shape[0], (b + 1) * batch_images) - b * batch_images for b in computed) \
        * geometry.n_positions * bank.n_rows
    record_run(group, {"computed_batches": computed, "seconds": seconds, "n_actors": len(actors or []),
                       "pairs_per_s": pairs / seconds if seconds > 0 and computed else 0.0})
    log.info("%s: computed %d batches in %.1f s", public(out_url), len(computed), seconds)
    return group


def versions() -> dict[str, str]:
    import zarr

    from . import __version__
    return {"lemmse_ray": __version__, "torch": torch.__version__, "ray": ray.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
