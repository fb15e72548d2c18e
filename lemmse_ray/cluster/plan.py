r"""What an estimation will cost, before it runs: counts, memory and a predicted wall time.

Counts (exact): bank rows :math:`R`; *pairs*, the (query pixel, bank row) pairs the kernel evaluates: each
query pixel meets only the rows of the classes its position meets (under zero padding a border pixel meets
the rows of its own border pattern, not the whole bank), so pairs :math:`=\sum_q \sum_{c \ni q} R_c`;
the bank's stored bytes (uncompressed); and the memory each actor holds its shards' key features in.

Time (a model with measured inputs): a short calibration on the current cluster measures, where the actors
run, the kernel's pairs/s per actor (as many concurrent scans as actors, each of real query features against
:data:`CALIBRATION_ROWS` random rows of the most-queried class, with the run's statistics and top-k, for at
least :data:`CALIBRATION_SECONDS`), the store's read rate (MB/s, bank bytes as stored, key features
included; the bank's first shard, once it exists) and, on the driver, the per-batch overhead (preparing a
batch's query features and one Ray round trip).  With :math:`A` actors, batch :math:`b` of :math:`p_b` pairs
takes :math:`\max(p_b / (A\,r_\text{pairs}) + s_b,\ o)` (the driver's overhead :math:`o` overlaps the
actors' work; :math:`s_b` is the re-read of a streaming actor's shards), plus the actors' start (reading
their shards) and one overhead per output (its pipeline fills and drains).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from ..bank.features import (
    QuerySet,
    kernel_kind,
    key_bytes,
    key_features,
    keys_to,
    met_pairs,
    prepare_queries,
    queries_to,
    scan,
)
from ..bank.rows import BankArrays
from ..core.classes import ClassPlan, plan_classes
from ..core.patches import PatchGeometry
from ..core.problems import Problem
from ..core.validation import DTYPES
from ..kernels.resolver import resolve
from ..storage.bank_store import Bank, BankLayout, stored_row_bytes
from ..storage.ownership import open_group
from .actors import actor_shards
from .session import actor_options, exact_device

CALIBRATION_ROWS = 1 << 14
CALIBRATION_SECONDS = 2.0


@dataclass
class Plan:
    """Counts and predicted wall time of an estimation (see the module docstring)."""

    rows: int
    pairs: int
    bank_bytes: int
    actors: int
    actor_bytes: int  # key features of the largest actor's shards
    actor_memory: int | None  # the budget (None: each actor's default)
    streaming: bool
    batches: int
    outputs: int
    pairs_per_batch: list[int] = field(default_factory=list)
    max_batch_images: int | None = None  # streaming: the largest query batch that fits beside two shards
    calibration: dict = field(default_factory=dict)
    predicted_s: float | None = None

    def text(self) -> str:
        lines = [f"plan: {self.rows:,} bank rows, {self.bank_bytes / 1e6:,.1f} MB stored; {self.pairs:,} pairs "
                 f"(query pixels x rows met) in {self.batches} batches over {self.outputs} outputs",
                 f"      {self.actors} actors, {self.actor_bytes / 1e6:,.1f} MB of key features each "
                 f"({'streaming from the store' if self.streaming else 'resident'})"]
        if self.streaming:
            lines.append(f"      streaming: every batch re-reads each actor's shards; batches of up to "
                         f"{self.max_batch_images} query images fit beside two shards in the budget")
        if self.calibration:
            c = self.calibration
            read = "unknown (no bank yet)" if c["read_mb_s"] is None else f"{c['read_mb_s']:.3g} MB/s"
            lines.append(f"      calibration: {c['pairs_per_s']:.3g} pairs/s per actor, store read {read}, "
                         f"{c['batch_overhead_s'] * 1e3:.0f} ms per batch; predicted estimate time "
                         f"{self.predicted_s:.1f} s")
        return "\n".join(lines)


def count(problem: Problem, plan: ClassPlan, n_images: int, inputs: list[tuple[torch.Tensor, torch.Tensor | None]],
          n_actors: int, batch_images: int, shard_rows: int, dtype: torch.dtype = torch.float32,
          actor_memory: int | None = None) -> Plan:
    """The counts of estimating every ``(z, mask)`` of ``inputs`` (one output each) against the bank of
    ``n_images`` training images, with ``n_actors`` actors (the driver's split of shards) and batches of
    ``batch_images``."""
    layout = BankLayout(n_images, plan.rows_per_image(), shard_rows)
    class_rows = np.diff(layout.offsets)
    per_batch = []
    for z, mask in inputs:
        for lo in range(0, z.shape[0], batch_images):
            hi = min(z.shape[0], lo + batch_images)
            per_batch.append(met_pairs(z[lo:hi], None if mask is None else mask[lo:hi], problem, plan, class_rows))
    ranges = actor_shards(layout.n_shards, n_actors)
    largest = max(layout.shard_range(b - 1)[1] - layout.shard_range(a)[0] for a, b in ranges)
    actor_bytes = key_bytes(plan, largest, dtype)
    streaming = actor_memory is not None and actor_bytes > actor_memory
    max_batch = None
    if streaming:  # a query image: its query features (widest class) and partials (m, l, o, o2, l2, ls) per pixel
        itemsize = torch.finfo(dtype).bits // 8
        channels = plan.geometry.shape[0]
        per_image = plan.geometry.n_positions * (kernel_kind(plan).feature_width(plan) + 2 * channels + 5) * itemsize
        free = actor_memory - 2 * key_bytes(plan, shard_rows, dtype)
        max_batch = max(0, free // per_image)
    return Plan(rows=layout.n_rows, pairs=sum(per_batch), bank_bytes=layout.n_rows * stored_row_bytes(plan, dtype),
                actors=len(ranges), actor_bytes=actor_bytes, actor_memory=actor_memory,
                streaming=streaming, batches=len(per_batch), outputs=len(inputs), pairs_per_batch=per_batch,
                max_batch_images=max_batch)


def calibration_scan(problem: Problem, geometry: dict, queries: QuerySet, dtype: str, kernel: str,
                     bank_url: str | None, storage_options: dict | None, stats: tuple[str, ...] = (),
                     topk: int = 0) -> dict:
    """Where an actor runs: the kernel's pairs/s on random rows of the widest class met by ``queries``, and the
    read rate of the bank's first shard (when the bank exists)."""

    device = exact_device()
    plan = plan_classes(problem, PatchGeometry(tuple(geometry["shape"]), geometry["patch_size"],
                                               geometry["padding"], geometry["candidates"]))
    met = [c for c, cq in enumerate(queries.per_class) if cq is not None]
    c = max(met, key=lambda k: (len(queries.per_class[k].index), plan.classes[k].rank))
    gen = torch.Generator().manual_seed(0)
    n, dt = CALIBRATION_ROWS, DTYPES[dtype]
    keys = torch.zeros((n, plan.width), dtype=dt)
    keys[:, : plan.classes[c].rank] = 0.1 * torch.randn((n, plan.classes[c].rank), generator=gen, dtype=dt)
    arrays = BankArrays(keys, 0.5 * (keys * keys).sum(dim=1), torch.rand((n, geometry["shape"][0]), generator=gen,
                                                                      dtype=dt),
                        torch.full((n,), c, dtype=torch.int64), torch.zeros((n, 2), dtype=torch.int64))
    feats = keys_to(key_features(arrays, plan, np.zeros((plan.n_classes, plan.width))), device)
    only = QuerySet(queries.n, queries.channels, queries.sigma,
                    [cq if k == c else None for k, cq in enumerate(queries.per_class)])
    only = queries_to(only, device)
    choices = resolve(kernel, plan, dtype=dt, device=device, stats=stats)
    scan(feats, plan, only, stats, topk, choices)  # warm-up
    t0, scans = time.perf_counter(), 0
    while scans < 2 or time.perf_counter() - t0 < CALIBRATION_SECONDS:
        scan(feats, plan, only, stats, topk, choices)
        if device.type == "cuda":
            torch.cuda.synchronize()
        scans += 1
    seconds = time.perf_counter() - t0
    out = {"pairs_per_s": scans * len(only.per_class[c].index) * n / seconds, "read_mb_s": None}
    if bank_url is not None:
        try:
            bank = Bank(bank_url, open_group(bank_url, "r", storage_options), plan, problem, storage_options)
        except Exception:  # no bank yet: the read rate stays unknown
            return out
        if bank.n_shards and not bank.missing_shards():
            start, stop = bank.layout.shard_range(0)
            t0 = time.perf_counter()
            rows = bank.read_rows(start, stop).to(dt)
            keys_to(key_features(rows, plan, bank.centers), device)
            out["read_mb_s"] = (stop - start) * stored_row_bytes(plan, bank.dtype) / 1e6 / (time.perf_counter() - t0)
    return out


# remote versions of module functions, so that Ray pickles them by reference (cloudpickle would pickle a
# decorated function by value, with every ``torch`` submodule whose name its code mentions)
_calibrate = ray.remote(calibration_scan)


@ray.remote
def _echo(queries: QuerySet) -> int:
    return queries.n


def calibrate(problem: Problem, plan: ClassPlan, centers: np.ndarray, z: torch.Tensor, mask: torch.Tensor | None,
              sigma: float, batch_images: int, dtype: torch.dtype = torch.float32, kernel: str = "auto",
              bank_url: str | None = None, storage_options: dict | None = None, n_actors: int = 1,
              stats: tuple[str, ...] = (), topk: int = 0) -> dict:
    """Measure pairs/s per actor (the median of ``n_actors`` concurrent scans) and the store's read rate where
    actors run, and the driver's per-batch overhead on one batch of ``z`` (see the module docstring).  Needs
    Ray."""

    args = (None if mask is None else mask[:batch_images], problem, plan, centers, sigma, dtype)
    ray.get(_echo.remote(ray.put(prepare_queries(z[:batch_images], *args))))  # starts a worker: not timed
    t0 = time.perf_counter()
    queries = prepare_queries(z[:batch_images], *args)
    ray.get(_echo.remote(ray.put(queries)))
    overhead = time.perf_counter() - t0
    dname = str(dtype).replace("torch.", "")
    # as many concurrent scans as actors (what they share on a node: cores, memory bandwidth, a GPU's host)
    measured = ray.get([_calibrate.options(**actor_options()).remote(
        problem, plan.geometry.spec(), queries, dname, kernel, bank_url if i == 0 else None, storage_options,
        stats, topk)
        for i in range(n_actors)])
    rates = sorted(m["pairs_per_s"] for m in measured)
    return {"pairs_per_s": rates[len(rates) // 2], "read_mb_s": measured[0]["read_mb_s"],
            "batch_overhead_s": overhead}


def predict(plan: Plan, calibration: dict) -> float:
    """Predicted wall time (s) of the estimation counted by ``plan`` (the module docstring's model).  An unknown
    read rate (no bank yet) counts the actors' start as free."""
    rate = calibration["pairs_per_s"] * plan.actors
    read = calibration.get("read_mb_s")
    per_actor_read = plan.bank_bytes / plan.actors / (read * 1e6) if read else 0.0
    stream = per_actor_read if plan.streaming else 0.0
    overhead = calibration["batch_overhead_s"]
    batches = sum(max(p / rate + stream, overhead) for p in plan.pairs_per_batch)
    start = 0.0 if plan.streaming else per_actor_read
    return start + batches + plan.outputs * overhead


def make_plan(problem: Problem, geometry: PatchGeometry, n_images: int, centers: np.ndarray,
              inputs: list[tuple[torch.Tensor, torch.Tensor | None, float]], n_actors: int, batch_images: int,
              shard_rows: int, dtype: torch.dtype = torch.float32, actor_memory: int | None = None,
              kernel: str = "auto", bank_url: str | None = None, storage_options: dict | None = None,
              calibrated: bool = True, stats: tuple[str, ...] = (), topk: int = 0) -> Plan:
    """:func:`count` of estimating every ``(z, mask, σ)`` of ``inputs``, then (``calibrated``) the predicted
    wall time from :func:`calibrate` on the first input."""
    plan = plan_classes(problem, geometry)
    out = count(problem, plan, n_images, [(z, m) for z, m, _ in inputs], n_actors, batch_images, shard_rows, dtype,
                actor_memory)
    if calibrated and inputs:
        z, mask, sigma = inputs[0]
        out.calibration = calibrate(problem, plan, centers, z, mask, sigma, batch_images, dtype, kernel, bank_url,
                                    storage_options, out.actors, stats, topk)
        out.predicted_s = predict(out, out.calibration)
    return out
