r"""The batch driver: exact estimation of query images against a stored bank with shard actors.

:func:`estimate_on_ray` validates (:func:`check_estimate`), opens the output group
(:mod:`lemmse_ray.storage.results`), and runs the driver loop (:func:`drive`): it broadcasts each batch of
estimator inputs through the object store (each actor prepares its query features, for the kernels it runs),
with up to ``max_in_flight`` batches submitted at once,
merges the actors' partials in a fixed order (so results do not depend on timing), formats them as the
in-memory API does (:func:`lemmse_ray.core.statistics.to_result`) and writes each batch to the output Zarr
group before flagging it done; finished batches are skipped on restart.  Each batch takes exactly one partial
per actor, so nothing is merged twice.  :func:`estimate_outputs` estimates several outputs of one bank with
one set of actors (:class:`SharedActors`), started once, by the first output with batches left.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import ray
import torch
import zarr
from tqdm.auto import tqdm

from ..bank.features import met_pairs
from ..bank.rows import RowSources
from ..core.partials import merge
from ..core.statistics import Result, check_stats, finalize, outputs, to_result
from ..core.validation import DTYPES, as_images, check_noise_level, check_query_mask
from ..kernels.resolver import image_class, resolve
from ..storage.bank_store import (
    Bank,
)
from ..storage.ownership import check_apart
from ..storage.redact import public
from ..storage.results import (
    inputs_hash,
    open_results,
    pending_batches,
    record_run,
    write_batch,
    write_inputs,
)
from .actors import (
    MAX_RESTARTS,
    MAX_TASK_RETRIES,
    check_actor_memory,
    check_limit,
    gather_calls,
    start_actors,
)
from .session import ensure_ray, versions

log = logging.getLogger("lemmse_ray")


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
    # the actors resolve again where they run
    resolve(kernel, bank.plan, dtype=dtype, device=None, stats=stats, images=image_class(bank.plan, dtype, None))
    for name, value in (("batch_images", batch_images), ("max_in_flight", max_in_flight)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_limit("max_restarts", max_restarts)
    check_limit("max_task_retries", max_task_retries)
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


def result_arrays(res: Result) -> dict[str, np.ndarray]:
    """The stored outputs of a result: every output of the statistics table that it holds."""
    return {o.name: getattr(res, o.name).numpy() for o in outputs() if getattr(res, o.name, None) is not None}


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
    sources = RowSources(bank.plan, bank.layout.n_images)
    busy = [0.0] * len(actors)
    in_flight: deque = deque()
    computed: list[int] = []

    def submit(b: int) -> tuple[int, list]:
        lo, hi = job.batch(b)
        ref = ray.put((job.z[lo:hi], None if job.mask is None else job.mask[lo:hi]))
        return b, [a.partials.remote(ref, job.sigma, job.stats, job.topk) for a in actors]

    def finish(b: int, refs: list) -> None:
        lo, hi = job.batch(b)
        parts = gather_calls(refs, bank)
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
                    actor_memory: int | None = None, on_start: Callable[[list], None] | None = None):
    """Estimate every pixel of ``z`` against ``bank`` with Ray actors; write and return the output group.

    Same numbers as :func:`lemmse_ray.estimate` on the bank's training images (up to float rounding of the
    merge order).  Batches already flagged done in ``out_url`` (same configuration) are not recomputed.
    ``actors``: running actors of this bank to use; an empty list is filled with the actors started here
    (only if some batch is left to compute), so that a caller can share them over several outputs; without a
    list, the actors started here are killed when it returns or fails.
    ``kernel``: kernel of the actors started here (``"auto"``, ``"torch"``, ``"sliding"``, ``"triton"``, see
    :class:`~lemmse_ray.cluster.actors.ShardActor`);
    actors passed in keep their own.  ``max_restarts``, ``max_task_retries``, ``actor_memory``: settings of the
    actors started here (see :func:`start_actors`).  ``max_in_flight``: query batches submitted to the actors
    at once (:func:`drive`; the results do not depend on it).  ``on_start``: called with the actors started
    here, before the first batch is submitted (e.g. to calibrate on them).  ``out_url`` may not be the bank,
    nor be inside it or hold it.  Nothing secret of ``metadata`` is stored
    (:func:`lemmse_ray.storage.redact.public`).  A resumed output keeps the ``batch_images`` it was created
    with.  The run's entry in the output's ``history`` holds the batches computed, the wall time, pairs/s and
    each actor's busy seconds.
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
    own: list = []  # actors started here for this output alone: killed when it returns or fails
    if todo and not actors:  # a finished output starts no actor (they would load their shards for nothing)
        ensure_ray()
        started = start_actors(bank, n_actors, job.dname, kernel, max_restarts, max_task_retries, actor_memory)
        if actors is None:
            actors = own = started
        else:
            actors.extend(started)  # the caller's (empty) list: it reuses them for its next outputs
    else:
        started = []
    try:
        if started and on_start is not None:
            on_start(started)
        run = drive(bank, job, group, actors or [], todo, max_in_flight, progress)
    finally:
        # an error's traceback would keep them (and their CPUs or GPUs) alive until it is collected
        for actor in own:
            ray.kill(actor)
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


@dataclass
class EstimateRequest:
    """One output of :func:`estimate_outputs`: the arguments of :func:`estimate_on_ray` but the bank and the
    actors (``options``: its other keywords, e.g. ``batch_images``, ``n_actors``, ``stats``, ``dtype``)."""

    z: torch.Tensor
    sigma: float
    url: str
    mask: torch.Tensor | None = None
    x: torch.Tensor | None = None
    metadata: dict | None = None
    options: dict[str, Any] = field(default_factory=dict)


class SharedActors:
    """The shard actors of one bank, shared by its estimate outputs, and what each output did with them.

    The actors are started by the first output with batches left (:func:`estimate_on_ray` fills the empty
    list), with that output's ``n_actors`` and actor settings; the outputs after it reuse them.
    ``computed[i]`` and ``busy_s[i]`` are the batches output ``i`` computed and the actors' busy seconds
    summed over them (its entry in the output's ``history``).  ``on_start``: see :func:`estimate_on_ray`.
    """

    def __init__(self, bank: Bank, on_start: Callable[[list], None] | None = None):
        self.bank = bank
        self.on_start = on_start
        self.actors: list = []
        self.computed: list[int] = []
        self.busy_s: list[float] = []

    def estimate(self, request: EstimateRequest) -> zarr.Group:
        """:func:`estimate_on_ray` of ``request`` with these actors; returns the output group."""
        group = estimate_on_ray(self.bank, request.z, request.sigma, request.url, mask=request.mask, x=request.x,
                                metadata=request.metadata, actors=self.actors, on_start=self.on_start,
                                **request.options)
        entry = group.attrs["history"][-1]
        self.computed.append(len(entry["computed_batches"]))
        self.busy_s.append(sum(entry.get("actor_busy_s", [])))
        return group

    def load_seconds(self) -> float:
        """Seconds the resident actors spent loading their shards (a streaming actor reads while it scans)."""
        if not self.actors:
            return 0.0
        return sum(d["read_s"] for d in ray.get([a.describe.remote() for a in self.actors]) if not d["streaming"])

    def release(self) -> None:
        """Kill the actors, freeing their CPUs or GPUs (for the next bank, for training)."""
        for actor in self.actors:
            ray.kill(actor)


def estimate_outputs(bank: Bank, requests: Iterable[EstimateRequest], release: bool = False,
                     on_start: Callable[[list], None] | None = None) -> SharedActors:
    """Estimate every output of ``requests`` against ``bank``, in order, with one set of shard actors
    (``on_start``: see :func:`estimate_on_ray`).

    With ``release`` the actors are killed at the end, also when an output fails; without, they live as long
    as the returned :class:`SharedActors` (e.g. to ask their :meth:`~SharedActors.load_seconds`).
    """
    shared = SharedActors(bank, on_start)
    try:
        for request in requests:
            shared.estimate(request)
    finally:
        if release:
            shared.release()
    return shared
