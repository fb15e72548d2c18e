r"""Bank building and exact estimation on Ray (docs/theory.md, §8, computing it exactly at scale).

* :func:`build_bank` — Ray tasks, one per missing shard, each computing its rows from the training images
  it needs and writing the whole shard (idempotent: re-running completes the missing shards only).
* :class:`ShardActor` — holds a contiguous range of shards in (GPU) memory, σ-free, or streams them from the
  store past a memory budget; for a broadcast query batch it returns one merged
  :class:`~lemmse_ray.kernel.Partials` over its rows and the seconds it computed.
* :func:`estimate_on_ray` — validation (:func:`check_estimate`), then the driver loop (:func:`drive`): it
  prepares query features per batch, broadcasts them through the object store with up to ``max_in_flight``
  batches submitted at once, merges the actors' partials in a fixed order (so results do not depend on
  timing), formats them as the in-memory API does (:func:`lemmse_ray.estimate.to_result`) and writes each
  batch to the output Zarr group before flagging it done; finished batches are skipped on restart.  Actors are restartable (``max_restarts``, default 3) and their calls retried
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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from .backends import check_kernel
from .bank import class_centers
from .classes import ClassPlan, plan_classes
from .estimate import Result, check_stats, to_result
from .kernel import Partials, finalize, merge
from .ownership import check_apart, open_group
from .patches import PatchGeometry
from .plan import key_bytes, stored_row_bytes
from .problems import Problem
from .queries import key_features, keys_to, met_pairs, prepare_queries, queries_to, scan
from .redact import public
from .results import GRID_STATS, inputs_hash, open_results, pending_batches, record_run, write_batch, write_inputs
from .store import (Bank, BankLayout, bank_attributes, create_bank_group, fingerprint, open_bank, shard_images,
                    shard_rows_for, write_shard)
from .validation import as_images, check_noise_level, check_query_mask

log = logging.getLogger("lemmse_ray")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3


class ActorFailed(RuntimeError):
    """A shard actor failed for good (an error in its code, or more deaths than ``max_restarts``)."""


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
    """Scans query batches against shards ``[first, last)`` of a bank.

    *Resident* (when the shards' key features fit in ``memory`` bytes): they are read once and kept in device
    memory.  *Streaming* (past it): every query batch reads the shards from the store again, the next one in a
    background thread while the current one is scanned (at most two shards held).  Both modes scan a batch
    shard by shard and merge the shards' partials in shard order, so they give the same bits (the top-k
    breaks ties by row id, see :func:`lemmse_ray.kernel._block_topk`).  ``memory=None``: see
    :func:`default_actor_memory`.

    ``kernel`` (``"auto"``, ``"torch"``, ``"triton"``, :mod:`lemmse_ray.backends`): with ``"auto"`` a CUDA actor
    with Triton installed scans float32 banks with the fused Triton kernel.  Whether ``"triton"`` can run is
    checked where the actor runs (its node's packages and device), at its first scan.
    """

    def __init__(self, url: str, storage_options: dict | None, problem: Problem, geometry: dict, first: int,
                 last: int, dtype: str, kernel: str = "auto", memory: int | None = None):
        self.device = exact_device()
        # the plan is recomputed here (not passed by reference) so that a restarted actor needs nothing from
        # the driver's object store
        plan = plan_classes(problem, PatchGeometry(tuple(geometry["shape"]), geometry["patch_size"],
                                                   geometry["padding"], geometry["candidates"]))
        self.bank = Bank(url, open_group(url, "r", storage_options), plan, problem, storage_options)
        self.plan, self.kernel, self.dtype = plan, kernel, DTYPES[dtype]
        self.shards = list(range(first, last))
        start, stop = self.bank.layout.shard_range(first)[0], self.bank.layout.shard_range(last - 1)[1]
        self.rows = stop - start
        self.memory = default_actor_memory(self.device) if memory is None else memory
        self.resident_bytes = key_bytes(plan, self.rows, self.dtype)
        self.streaming = self.resident_bytes > self.memory
        self.calls = 0
        self.read_s, self.read_bytes = 0.0, 0
        self.keys, self.error = None, None
        try:
            self.keys = None if self.streaming else [self._load_shard(shard) for shard in self.shards]
        except Exception as err:  # noqa: BLE001
            # e.g. a damaged shard: each scan raises it as that call's error, which is not retried (the bytes
            # would be the same), rather than a failed creation that Ray reports again for every queued call
            self.error = err

    def _load_shard(self, shard: int) -> dict:
        return self._load(*self.bank.layout.shard_range(shard))

    def _load(self, start: int, stop: int) -> dict:
        """Key features of rows ``[start, stop)`` on this actor's device."""
        t0 = time.perf_counter()
        arrays = self.bank.read_rows(start, stop).to(self.dtype)
        keys = keys_to(key_features(arrays, self.plan, self.bank.centers), self.device)
        self.read_s += time.perf_counter() - t0
        self.read_bytes += stored_row_bytes(self.plan, self.bank.dtype) * len(arrays)
        return keys

    def _shard_keys(self):
        """Key features of each shard in order (streaming: read ahead one shard in a background thread)."""
        if not self.streaming:
            yield from self.keys
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self._load_shard, self.shards[0])
            for i in range(len(self.shards)):
                keys = ahead.result()
                if i + 1 < len(self.shards):
                    ahead = pool.submit(self._load_shard, self.shards[i + 1])
                yield keys
                del keys

    def partials(self, queries, stats: tuple[str, ...], topk: int) -> tuple[Partials, float]:
        """(merged partial of the query batch over this actor's rows, seconds this call computed)."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.calls += 1
        queries = queries_to(queries, self.device)
        total = None
        for keys in self._shard_keys():
            part = scan(keys, self.plan, queries, stats, topk, self.kernel)
            total = part if total is None else merge(total, part)
        return total.to(device="cpu"), time.perf_counter() - t0

    def calibrate(self, queries) -> dict:
        """Timings on this actor's first shard: its read from the store (seconds, stored bytes) and one scan of
        ``queries`` against it (seconds, pairs), for :mod:`lemmse_ray.plan`."""
        read_s, read_bytes = self.read_s, self.read_bytes
        keys = self._load_shard(self.shards[0])
        read = {"read_s": self.read_s - read_s, "read_bytes": self.read_bytes - read_bytes}
        self.read_s, self.read_bytes = read_s, read_bytes
        queries = queries_to(queries, self.device)
        scan(keys, self.plan, queries, (), 0, self.kernel)  # warm-up
        t0 = time.perf_counter()
        scan(keys, self.plan, queries, (), 0, self.kernel)
        pairs = sum(len(cq.index) * len(keys[c].row_ids) for c, cq in enumerate(queries.per_class)
                    if cq is not None and c in keys)
        return {**read, "scan_s": time.perf_counter() - t0, "pairs": pairs}

    def describe(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "device": str(self.device), "rows": self.rows,
                "pid": os.getpid(), "calls": self.calls, "streaming": self.streaming, "memory": self.memory,
                "resident_bytes": self.resident_bytes, "read_s": self.read_s, "read_bytes": self.read_bytes}


def default_actor_memory(device: torch.device) -> int:
    """Memory an actor may hold its shards in when none is given: 80 % of the free memory of its GPU, or half of
    the host's available memory shared among its CPUs (one CPU actor per CPU)."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(0.5 * available / max(1, os.cpu_count() or 1))


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
                 max_restarts: int = MAX_RESTARTS, max_task_retries: int = MAX_TASK_RETRIES,
                 actor_memory: int | None = None) -> list:
    """One actor per contiguous range of shards (default: one per GPU, else one per CPU, at most one per shard).

    ``kernel``: the actors' kernel (see :class:`ShardActor`).  ``actor_memory``: bytes each actor may hold its
    shards' key features in; past it the actor streams them from the store for every query batch (``None``:
    :func:`default_actor_memory`).  A dead actor (killed, lost with its node) is restarted at most
    ``max_restarts`` times, and a call to it resubmitted at most ``max_task_retries`` times; errors raised by
    the actor's code are never retried.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    check_kernel(kernel, DTYPES[dtype])
    _check_limit("max_restarts", max_restarts)
    _check_limit("max_task_retries", max_task_retries)
    check_actor_memory(actor_memory)
    options = _actor_options()
    if n_actors is None:
        n_actors = default_n_actors()
    if isinstance(n_actors, bool) or not isinstance(n_actors, int) or n_actors < 1:
        raise ValueError(f"n_actors must be a positive integer, got {n_actors!r}")
    geometry = bank.plan.geometry.spec()
    return [ShardActor.options(**options, max_restarts=max_restarts, max_task_retries=max_task_retries).remote(
                bank.url, bank.storage_options, bank.problem, geometry, first, last, dtype, kernel, actor_memory)
            for first, last in actor_shards(bank.n_shards, n_actors)]


def default_n_actors() -> int:
    """One actor per GPU of the cluster, else one per CPU."""
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)))


def check_actor_memory(actor_memory) -> None:
    if actor_memory is not None and (isinstance(actor_memory, bool) or not isinstance(actor_memory, int)
                                     or actor_memory < 0):
        raise ValueError(f"actor_memory must be a non-negative number of bytes or None, got {actor_memory!r}")


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


def gather_partials(refs: list, bank: Bank) -> list[tuple[Partials, float]]:
    """The actors' (partial, busy seconds), in order; :class:`ActorFailed` naming the shards of the first actor
    that failed."""
    parts = []
    for ref, (first, last) in zip(refs, actor_shards(bank.n_shards, len(refs))):
        try:
            parts.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            raise ActorFailed(f"actor for shards [{first}, {last}) of {public(bank.url)} failed: "
                              f"{original_error(err)}") from err
    return parts


@dataclass
class EstimateJob:
    """Validated inputs of :func:`estimate_on_ray`."""

    z: torch.Tensor
    mask: torch.Tensor | None
    x: torch.Tensor | None
    sigma: float
    stats: tuple[str, ...]
    topk: int
    dtype: torch.dtype
    batch_images: int

    @property
    def dname(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def batch(self, b: int) -> tuple[int, int]:
        """Images ``[lo, hi)`` of batch ``b``."""
        return b * self.batch_images, min(self.z.shape[0], (b + 1) * self.batch_images)

    def config(self, bank: Bank) -> dict:
        """What an output's numbers depend on (a resumed output must have the same)."""
        return {"bank_fingerprint": bank.attrs["fingerprint"], "bank_plan": bank.attrs["plan_hash"],
                "problem": bank.problem.spec(), "geometry": bank.plan.geometry.spec(), "sigma": self.sigma,
                "stats": list(self.stats), "topk": self.topk, "dtype": self.dname,
                "inputs": inputs_hash(self.z, self.mask), "n_rows": bank.n_rows}


def check_estimate(bank: Bank, z, sigma: float, out_url: str, mask=None, x=None, batch_images: int = 8,
                   stats=("variance", "ess"), topk: int = 5, dtype: torch.dtype = torch.float32,
                   kernel: str = "auto", max_restarts: int = MAX_RESTARTS, max_task_retries: int = MAX_TASK_RETRIES,
                   max_in_flight: int = 2, actor_memory: int | None = None) -> EstimateJob:
    """Validate the arguments of :func:`estimate_on_ray` against ``bank`` (``ValueError`` naming the bad one)."""
    check_apart(out_url, bank.url)
    stats = check_stats(stats, topk)
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sigma = check_noise_level(sigma, dtype)
    check_kernel(kernel, dtype)
    for name, value in (("batch_images", batch_images), ("max_in_flight", max_in_flight)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _check_limit("max_restarts", max_restarts)
    _check_limit("max_task_retries", max_task_retries)
    check_actor_memory(actor_memory)
    z = as_images(z, "z", check_range=False)
    shape = bank.plan.geometry.shape
    if tuple(z.shape[1:]) != tuple(shape):
        raise ValueError(f"z must hold images of the bank's shape {tuple(shape)}, got {tuple(z.shape[1:])}")
    mask = check_query_mask(mask, bank.problem, z)
    if x is not None:
        x = as_images(x, "x")
        if x.shape != z.shape:
            raise ValueError(f"x must have the shape of z {tuple(z.shape)}, got {tuple(x.shape)}")
    return EstimateJob(z, mask, x, sigma, stats, topk, dtype, batch_images)


class BankSources:
    """(training image, position) of bank rows, read from the bank's ``source`` array: indexed by a tensor of
    row ids like the in-memory table, for :func:`lemmse_ray.estimate.to_result`."""

    def __init__(self, bank: Bank):
        self.bank = bank

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.bank.source(rows.cpu().numpy()))


OUTPUTS = ("mean", "variance", *GRID_STATS, "topk_image", "topk_position", "topk_logits")


def result_arrays(res: Result) -> dict[str, np.ndarray]:
    """The stored outputs of a result (the statistics it holds)."""
    return {name: getattr(res, name).numpy() for name in OUTPUTS if getattr(res, name) is not None}


@dataclass
class DriverStats:
    """What one driver loop did: batches computed, its wall time and each actor's busy seconds."""

    computed: list[int]
    seconds: float
    busy: list[float]

    @property
    def busy_fraction(self) -> float:
        """Mean over actors of (busy seconds / wall seconds)."""
        if not self.busy or self.seconds <= 0:
            return 0.0
        return sum(self.busy) / (len(self.busy) * self.seconds)


def drive(bank: Bank, job: EstimateJob, group, actors: list, todo: list[int], max_in_flight: int = 2,
          progress: bool = True) -> DriverStats:
    """Compute and write batches ``todo`` with ``actors``, keeping up to ``max_in_flight`` batches submitted.

    While the actors scan batch b (each actor runs its calls in submission order), the driver prepares and
    submits batch b+1 and merges and writes batch b−1.  The actors' partials of a batch are merged in actor
    order whatever order they arrive in, so every ``max_in_flight`` gives the same bits.
    """
    plan, centers, sources = bank.plan, bank.centers, BankSources(bank)
    busy = [0.0] * len(actors)
    in_flight: deque = deque()
    computed: list[int] = []

    def submit(b: int) -> tuple[int, list]:
        lo, hi = job.batch(b)
        queries = prepare_queries(job.z[lo:hi], None if job.mask is None else job.mask[lo:hi], bank.problem, plan,
                                  centers, job.sigma, job.dtype)
        ref = ray.put(queries)
        return b, [a.partials.remote(ref, job.stats, job.topk) for a in actors]

    def finish(b: int, refs: list) -> None:
        lo, hi = job.batch(b)
        parts = gather_partials(refs, bank)
        total = parts[0][0]
        for i, (part, seconds) in enumerate(parts):
            busy[i] += seconds
            if i:
                total = merge(total, part)
        res = to_result(finalize(total, bank.n_rows), sources, (hi - lo, *job.z.shape[1:]), job.stats)
        write_batch(group, b, lo, result_arrays(res))
        computed.append(b)
        bar.update(1)

    t0 = time.perf_counter()
    with tqdm(total=len(todo), desc="query batches", unit="batch", disable=not progress) as bar:
        for b in todo:
            in_flight.append(submit(b))
            if len(in_flight) >= max_in_flight:
                finish(*in_flight.popleft())
        while in_flight:
            finish(*in_flight.popleft())
    return DriverStats(computed, time.perf_counter() - t0, busy)


def estimate_on_ray(bank: Bank, z, sigma: float, out_url: str, *, mask=None, x=None, batch_images: int = 8,
                    actors: list | None = None, n_actors: int | None = None, stats=("variance", "ess"),
                    topk: int = 5, dtype: torch.dtype = torch.float32, storage_options: dict | None = None,
                    metadata: dict | None = None, overwrite: bool = False, progress: bool = True,
                    kernel: str = "auto", max_restarts: int = MAX_RESTARTS,
                    max_task_retries: int = MAX_TASK_RETRIES, max_in_flight: int = 2,
                    actor_memory: int | None = None):
    """Estimate every pixel of ``z`` against ``bank`` with Ray actors; write and return the output group.

    Same numbers as :func:`lemmse_ray.estimate` on the bank's training images (up to float rounding of the
    merge order).  Batches already flagged done in ``out_url`` (same configuration) are not recomputed.
    ``actors``: running actors of this bank to use; an empty list is filled with the actors started here
    (only if some batch is left to compute), so that a caller can share them over several outputs.
    ``kernel``: kernel of the actors started here (``"auto"``, ``"torch"``, ``"triton"``; see :class:`ShardActor`);
    actors passed in keep their own.  ``max_restarts``, ``max_task_retries``, ``actor_memory``: settings of the
    actors started here (see :func:`start_actors`).  ``max_in_flight``: query batches submitted to the actors
    at once (:func:`drive`; the results do not depend on it).  ``out_url`` may not be the bank, nor be inside it
    or hold it.  Nothing secret of ``metadata`` is stored (:func:`lemmse_ray.redact.public`).  A resumed output
    keeps the ``batch_images`` it was created with.  The run's entry in the output's ``history`` holds the
    batches computed, the wall time, pairs/s and each actor's busy seconds.
    """
    job = check_estimate(bank, z, sigma, out_url, mask, x, batch_images, stats, topk, dtype, kernel, max_restarts,
                         max_task_retries, max_in_flight, actor_memory)
    group = open_results(out_url, job.config(bank), tuple(job.z.shape), batch_images, job.stats, job.topk,
                         job.dname, storage_options, overwrite)
    job.batch_images = group.attrs["batch_images"]  # a resumed output keeps its layout
    write_inputs(group, job.z.to(torch.float32), None if job.mask is None else job.mask.to(torch.float32),
                 None if job.x is None else job.x.to(torch.float32))
    group.attrs["metadata"] = public({**(metadata or {}), "versions": versions()})
    todo = pending_batches(group)
    n_batches = group.attrs["n_batches"]
    log.info("%s: %d of %d batches to compute (%d already done)", public(out_url), len(todo), n_batches,
             n_batches - len(todo))
    if todo and not actors:  # a finished output starts no actor (they would load their shards for nothing)
        ensure_ray()
        started = start_actors(bank, n_actors, job.dname, kernel, max_restarts, max_task_retries, actor_memory)
        if actors is None:
            actors = started
        else:
            actors.extend(started)  # the caller's (empty) list: it reuses them for its next outputs
    run = drive(bank, job, group, actors or [], todo, max_in_flight, progress)
    pairs = sum(met_pairs(job.z[lo:hi], None if job.mask is None else job.mask[lo:hi], bank.problem, bank.plan,
                          class_rows(bank)) for lo, hi in map(job.batch, run.computed))
    record_run(group, {"computed_batches": run.computed, "seconds": run.seconds, "n_actors": len(actors or []),
                       "pairs": pairs, "pairs_per_s": pairs / run.seconds if run.seconds > 0 and pairs else 0.0,
                       "max_in_flight": max_in_flight, "actor_busy_s": run.busy,
                       "busy_fraction": run.busy_fraction})
    log.info("%s: computed %d batches in %.1f s (actors busy %.0f %% of it)", public(out_url), len(run.computed),
             run.seconds, 100 * run.busy_fraction)
    return group


def class_rows(bank: Bank) -> np.ndarray:
    """(n_classes,) rows of each class in ``bank``."""
    return np.diff(bank.layout.offsets)


def versions() -> dict[str, str]:
    import zarr

    from . import __version__
    return {"lemmse_ray": __version__, "torch": torch.__version__, "ray": ray.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
