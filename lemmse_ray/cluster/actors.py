r"""Shard actors: Ray actors that scan query batches against a contiguous range of a bank's shards.

A :class:`ShardActor` holds each of its shards as a :class:`~lemmse_ray.PatchBank` part (the shard's images,
with the rows derived from them by the in-memory API's code: key features for the matrix product, images for
the sliding-window kernel), σ-free, or rebuilds them from the store past a memory budget; for a broadcast
query batch it prepares the query features once, scans every shard, and returns one merged
:class:`~lemmse_ray.core.partials.Partials` over its rows and the seconds it computed.  Actors are restartable
(``max_restarts``, default 3) and their calls retried (``max_task_retries``, default 3), so a killed actor,
or one lost with its node, is recreated elsewhere and its partial recomputed.  An error raised by the code (a
damaged bank, a missing array) is not retried: :func:`gather_calls` raises :class:`ActorFailed` naming the
actor's shards, the bank and the original exception.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from ..bank.memory import PatchBank, part_bytes, prepare_scan
from ..core.classes import plan_classes
from ..core.partials import Partials, merge
from ..core.patches import PatchGeometry
from ..core.problems import Problem
from ..core.validation import DTYPES
from ..kernels.resolver import check_kernel, image_class
from ..storage.bank_store import Bank, BankLayout
from ..storage.ownership import open_group
from ..storage.redact import public
from .calibration import batch_overhead, median, scan_rate
from .errors import ClusterError
from .session import (
    START_TIMEOUT_S,
    actor_options,
    await_actors,
    default_n_actors,
    exact_device,
    wait_for_units,
)

MAX_RESTARTS = 3


MAX_TASK_RETRIES = 3


class ActorFailed(ClusterError):
    """A shard actor failed for good (an error in its code, or more deaths than ``max_restarts``)."""


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
class ShardActor:
    """Scans query batches against shards ``[first, last)`` of a bank.

    *Resident* (when its parts fit in ``memory`` bytes, :func:`~lemmse_ray.bank.memory.part_bytes`): each shard's
    images are read once and held as a :class:`~lemmse_ray.PatchBank` part on the actor's device.  *Streaming*
    (past it): every query batch reads the shards from the store again and rebuilds each part, the next one in
    a background thread while the current one is scanned (at most two held).  Both modes scan a batch shard by
    shard and merge the shards' partials in shard order, so they give the same bits (the top-k breaks ties by
    row id, see :func:`lemmse_ray.core.partials.block_topk`).  ``memory=None``: see
    :func:`default_actor_memory`.

    ``kernel``: the request each batch resolves where the actor runs (its node's packages and device;
    :func:`lemmse_ray.kernels.resolver.resolve`): with ``"auto"`` a CPU actor evaluates the sliding kernel's
    class with it (float32) and the other classes by matrix product; a CUDA actor with Triton installed scans
    float32 banks with the fused Triton kernel; any other the torch kernels.
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
        layout = self.bank.layout
        self.images = layout.shard_range(last - 1)[1] - layout.shard_range(first)[0]
        self.rows = self.images * int(plan.rows_per_image().sum())
        self.memory = default_actor_memory(self.device) if memory is None else memory
        self.resident_bytes = part_bytes(plan, self.images, self.dtype, self.device)
        self.streaming = self.resident_bytes > self.memory
        self.calls = 0
        self.read_s, self.read_bytes = 0.0, 0
        self.parts, self.error = None, None
        self.sliding_class = image_class(plan, self.dtype, self.device)  # the class every part holds as images
        try:
            self.parts = None if self.streaming else [self._load_shard(shard) for shard in self.shards]
        except Exception as err:  # noqa: BLE001
            # e.g. a damaged shard: each scan raises it as that call's error, which is not retried (the bytes
            # would be the same), rather than a failed creation that Ray reports again for every queued call
            self.error = err

    def _load_shard(self, shard: int) -> PatchBank:
        """Shard ``shard`` as a bank part on this actor's device (read, checked, its rows derived)."""
        t0 = time.perf_counter()
        images = self.bank.read_images(shard)
        part = PatchBank.part(images, self.bank.problem, self.plan, self.bank.centers,
                              self.bank.layout.shard_range(shard)[0], self.bank.layout.n_images, self.dtype,
                              self.device)
        self.read_s += time.perf_counter() - t0
        self.read_bytes += images.numel() * self.bank.group["images"].dtype.itemsize
        return part

    def _shard_parts(self):
        """Each shard's part in order (streaming: read ahead one shard in a background thread)."""
        if not self.streaming:
            yield from self.parts
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self._load_shard, self.shards[0])
            for i in range(len(self.shards)):
                part = ahead.result()
                if i + 1 < len(self.shards):
                    ahead = pool.submit(self._load_shard, self.shards[i + 1])
                yield part
                del part

    def partials(self, batch: tuple[torch.Tensor, torch.Tensor | None], sigma: float, stats: tuple[str, ...],
                 topk: int) -> tuple[Partials, float]:
        """(merged partial of the query batch ``(z, mask)`` over this actor's rows, seconds this call computed)."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.calls += 1
        z, mask = batch
        prepared = prepare_scan(z, mask, sigma, self.bank.problem, self.plan, self.bank.centers, self.dtype,
                                self.device, stats, topk, self.kernel, self.sliding_class)
        total = None
        for part in self._shard_parts():
            scanned = part.scan(prepared)
            total = scanned if total is None else merge(total, scanned)
        return total.to(device="cpu"), time.perf_counter() - t0

    def calibrate(self, batch: tuple[torch.Tensor, torch.Tensor | None], sigma: float, stats: tuple[str, ...],
                  topk: int) -> dict:
        """:func:`~lemmse_ray.cluster.calibration.scan_rate` of this actor's first part against ``batch`` (a
        streaming actor loads it), with the seconds and bytes of the shard loads so far."""
        if self.error is not None:
            raise self.error
        first, last = self.bank.layout.shard_range(self.shards[0])
        part = self._load_shard(self.shards[0]) if self.streaming else self.parts[0]
        out = scan_rate(part, last - first, self.bank.problem, self.plan, self.bank.centers, batch, sigma,
                        self.dtype, self.device, stats, topk, self.kernel, self.sliding_class)
        return {**out, "read_s": self.read_s, "read_bytes": self.read_bytes}

    def echo(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> int:
        """The batch's image count: a round trip of a batch, for the driver's per-batch overhead."""
        return batch[0].shape[0]

    def describe(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "device": str(self.device), "rows": self.rows,
                "images": self.images,
                "pid": os.getpid(), "calls": self.calls, "streaming": self.streaming, "memory": self.memory,
                "resident_bytes": self.resident_bytes, "read_s": self.read_s, "read_bytes": self.read_bytes}


def default_actor_memory(device: torch.device) -> int:
    """Memory an actor may hold its shards in when none is given: 80 % of the free memory of its GPU, or half of
    the host's available memory shared among its CPUs (one CPU actor per CPU)."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(0.5 * available / max(1, os.cpu_count() or 1))


def actor_shards(layout: BankLayout, n_actors: int) -> list[tuple[int, int]]:
    """The contiguous shard range ``[first, last)`` of each of ``n_actors`` actors (at most one per shard), with
    about equal numbers of images: range ``a`` ends at the shard boundary nearest to ``a/n_actors`` of the
    images (the last shard may be smaller than the others)."""
    n_shards = layout.n_shards
    k = min(n_actors, n_shards)
    ends = np.array([layout.shard_range(s)[1] for s in range(n_shards)])
    targets = np.arange(1, k) * layout.n_images / k
    cuts = [0]
    for target in targets:  # the nearest boundary, leaving every range at least one shard
        best = int(np.argmin(np.abs(ends - target))) + 1
        cuts.append(min(max(best, cuts[-1] + 1), n_shards - (k - len(cuts))))
    cuts.append(n_shards)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def check_limit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def start_actors(bank: Bank, n_actors: int | None = None, dtype: str = "float32", kernel: str = "auto",
                 max_restarts: int = MAX_RESTARTS, max_task_retries: int = MAX_TASK_RETRIES,
                 actor_memory: int | None = None, start_timeout_s: float = START_TIMEOUT_S) -> list:
    """One actor per contiguous range of shards (default: one per GPU, else one per CPU, at most one per shard).

    ``n_actors`` may not exceed the GPUs (GPU cluster) or CPUs the cluster has or can scale to
    (:func:`~lemmse_ray.cluster.session.check_actor_count`); the start waits at most ``start_timeout_s`` for
    busy ones to be freed, and at most :data:`~lemmse_ray.cluster.session.AUTOSCALE_TIMEOUT_S` for the nodes an
    autoscaler adds (:class:`~lemmse_ray.cluster.session.ClusterError` past either).

    ``kernel``: the actors' kernel (see :class:`ShardActor`).  ``actor_memory``: bytes each actor may hold its
    shards' parts in; past it the actor rebuilds them from the store for every query batch (``None``:
    :func:`default_actor_memory`).  A dead actor (killed, lost with its node) is restarted at most
    ``max_restarts`` times, and a call to it resubmitted at most ``max_task_retries`` times; errors raised by
    the actor's code are never retried.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    check_kernel(kernel, DTYPES[dtype])
    check_limit("max_restarts", max_restarts)
    check_limit("max_task_retries", max_task_retries)
    check_actor_memory(actor_memory)
    options = actor_options()
    if n_actors is None:
        n_actors = default_n_actors()
    if isinstance(n_actors, bool) or not isinstance(n_actors, int) or n_actors < 1:
        raise ValueError(f"n_actors must be a positive integer, got {n_actors!r}")
    ranges = actor_shards(bank.layout, n_actors)
    autoscaling = wait_for_units(len(ranges), start_timeout_s)
    geometry = bank.plan.geometry.spec()
    actors = [ShardActor.options(**options, max_restarts=max_restarts, max_task_retries=max_task_retries).remote(
                  bank.url, bank.storage_options, bank.problem, geometry, first, last, dtype, kernel, actor_memory)
              for first, last in ranges]
    if autoscaling:
        await_actors(actors)
    return actors


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


def gather_calls(refs: list, bank: Bank) -> list:
    """The results of one call per actor of ``bank`` (e.g. their (partial, busy seconds)), in actor order;
    :class:`ActorFailed` naming the shards of the first actor that failed."""
    parts = []
    for ref, (first, last) in zip(refs, actor_shards(bank.layout, len(refs))):
        try:
            parts.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            raise ActorFailed(f"actor for shards [{first}, {last}) of {public(bank.url)} failed: "
                              f"{original_error(err)}") from err
    return parts


def calibrate_actors(actors: list, bank: Bank, z: torch.Tensor, mask: torch.Tensor | None, sigma: float,
                     batch_images: int, stats: tuple[str, ...] = (), topk: int = 0) -> dict:
    """On started shard actors (:class:`ShardActor`): the seconds until every one
    holds its shards (``start_s``, measured from this call), then pairs/s per actor (the median of their
    concurrent scans of their first part against the first batch of ``z``), their batch preparation, their
    shard load rate, the driver's per-batch overhead, and the seconds the whole calibration took
    (``calibration_s``, the start included).  An actor that cannot load its shards (a damaged bank) raises
    :class:`ActorFailed` here, as its first batch would.  Needs Ray."""
    t0 = time.perf_counter()
    gather_calls([a.describe.remote() for a in actors], bank)  # queued after each actor's constructor
    start_s = time.perf_counter() - t0
    batch = (z[:batch_images], None if mask is None else mask[:batch_images])
    ref = ray.put(batch)
    refs = [a.calibrate.remote(ref, sigma, stats, topk) for a in actors]
    ray.wait(refs, num_returns=len(refs))  # every call ended, failed ones included: none left running on an error
    measured = gather_calls(refs, bank)
    overhead = batch_overhead(batch, actors[0].echo.remote)  # the actors hold the cluster's CPUs or GPUs
    read_s, read_bytes = sum(m["read_s"] for m in measured), sum(m["read_bytes"] for m in measured)
    return {"pairs_per_s": median([m["pairs_per_s"] for m in measured]),
            "prepare_s": median([m["prepare_s"] for m in measured]),
            "read_mb_s": read_bytes / 1e6 / read_s if read_s > 0 else None, "batch_overhead_s": overhead,
            "start_s": start_s, "calibration_s": time.perf_counter() - t0}
