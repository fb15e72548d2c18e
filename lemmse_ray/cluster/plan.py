r"""What an estimation will cost, before it runs: counts, memory and a predicted wall time.

Counts (exact): bank rows :math:`R`; *pairs*, the (query pixel, bank row) pairs the kernels evaluate: each
query pixel meets only the rows of the classes its position meets (under zero padding a border pixel meets
the rows of its own border pattern, not the whole bank), so pairs :math:`=\sum_q \sum_{c \ni q} R_c`;
the bank's stored bytes (uncompressed: the training images, :mod:`lemmse_ray.storage.bank_store`); and the
memory each actor holds its shards' parts in (:func:`lemmse_ray.bank.memory.part_bytes`).

Time (a model with measured inputs, :mod:`lemmse_ray.cluster.calibration`): the pairs/s per actor
:math:`r_\text{pairs}` of a :class:`~lemmse_ray.PatchBank` part as an actor holds it (the sliding kernel's
class and the others in their real proportions) scanned against the first query batch with the run's
statistics and top-k, as many scans at once as there are actors; the seconds an actor takes to prepare a
batch's query features :math:`t_\text{prep}`; the shard load rate; and, on the driver, the per-batch overhead
:math:`o` (one Ray round trip of a batch).  With :math:`A` actors, batch :math:`b` of :math:`p_b` pairs takes
:math:`\max(t_\text{prep} + p_b / (A\,r_\text{pairs}) + s_b,\ o)` (the driver's overhead overlaps the actors'
work; :math:`s_b` is the reload of a streaming actor's shards), plus the actors' start and one overhead per
output (its pipeline fills and drains).  ``lemmse plan`` calibrates before any actor exists and counts the
start as the shard load; the estimate step calibrates on its own actors, so their start (new processes
importing torch, then loading shards) is measured, not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..bank.features import met_pairs
from ..bank.memory import part_bytes
from ..core.classes import ClassPlan, plan_classes
from ..core.patches import PatchGeometry
from ..core.problems import Problem
from ..storage.bank_store import BankLayout
from .actors import actor_shards
from .calibration import calibrate

IMAGE_BYTES = 4  # a stored pixel value: float32 (data from 8-bit images; float64 where float32 would round)


@dataclass
class Plan:
    """Counts and predicted wall time of an estimation (see the module docstring)."""

    rows: int
    pairs: int
    bank_bytes: int
    actors: int
    actor_bytes: int  # the parts of the largest actor's shards
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
                 f"      {self.actors} actors, {self.actor_bytes / 1e6:,.1f} MB of bank parts each "
                 f"({'streaming from the store' if self.streaming else 'resident'})"]
        if self.streaming:
            lines.append(f"      streaming: every batch re-reads each actor's shards; batches of up to "
                         f"{self.max_batch_images} query images fit beside two shards in the budget")
        if self.calibration:
            lines.append(self.calibration_text())
        return "\n".join(lines)

    def calibration_text(self) -> str:
        """The line of :attr:`calibration` and the prediction."""
        c = self.calibration
        read = "unknown (no bank yet)" if c["read_mb_s"] is None else f"{c['read_mb_s']:.3g} MB/s"
        where = (f"on the {self.actors} actors (started, shards loaded, in {c['start_s']:.1f} s)"
                 if "start_s" in c else "before the actors start")
        return (f"      calibration {where}: {c['pairs_per_s']:.3g} pairs/s per actor, {c['prepare_s'] * 1e3:.0f} ms "
                f"to prepare a batch, shard load {read}, {c['batch_overhead_s'] * 1e3:.0f} ms per batch on the "
                f"driver; predicted estimate time {self.predicted_s:.1f} s")


def count(problem: Problem, plan: ClassPlan, n_images: int, inputs: list[tuple[torch.Tensor, torch.Tensor | None]],
          n_actors: int, batch_images: int, shard_rows: int, dtype: torch.dtype = torch.float32,
          actor_memory: int | None = None) -> Plan:
    """The counts of estimating every ``(z, mask)`` of ``inputs`` (one output each) against the bank of
    ``n_images`` training images, with ``n_actors`` actors (the driver's split of shards) and batches of
    ``batch_images``.  Memory is counted for CPU actors (which hold the sliding kernel's class as images)."""
    layout = BankLayout.of(n_images, plan.rows_per_image(), shard_rows)
    class_rows = np.diff(layout.offsets)
    per_batch = []
    for z, mask in inputs:
        for lo in range(0, z.shape[0], batch_images):
            hi = min(z.shape[0], lo + batch_images)
            per_batch.append(met_pairs(z[lo:hi], None if mask is None else mask[lo:hi], problem, plan, class_rows))
    ranges = actor_shards(layout, n_actors)
    largest = max(layout.shard_range(b - 1)[1] - layout.shard_range(a)[0] for a, b in ranges)
    actor_bytes = part_bytes(plan, largest, dtype, None)
    streaming = actor_memory is not None and actor_bytes > actor_memory
    max_batch = None
    if streaming:  # a query image: its query features (widest class) and partials (m, l, o, o2, l2, ls) per pixel
        itemsize = torch.finfo(dtype).bits // 8
        channels = plan.geometry.shape[0]
        per_image = plan.geometry.n_positions * (2 * plan.geometry.dim + 2 * channels + 6) * itemsize
        free = actor_memory - 2 * part_bytes(plan, layout.shard_images, dtype, None)
        max_batch = max(0, free // per_image)
    return Plan(rows=layout.n_rows, pairs=sum(per_batch),
                bank_bytes=n_images * int(np.prod(plan.geometry.shape)) * IMAGE_BYTES,
                actors=len(ranges), actor_bytes=actor_bytes, actor_memory=actor_memory,
                streaming=streaming, batches=len(per_batch), outputs=len(inputs), pairs_per_batch=per_batch,
                max_batch_images=max_batch)


def predict(plan: Plan, calibration: dict) -> float:
    """Predicted wall time (s) of the estimation counted by ``plan`` (the module docstring's model).

    A calibration on the estimate step's own actors (:func:`~lemmse_ray.cluster.actors.calibrate_actors`)
    counts their start and the calibration as the seconds they took (``calibration_s``); one before the actors
    exist counts their start as the load of their shards at the calibrated rate (free when the rate is unknown:
    no bank yet), without the start of their processes."""
    rate = calibration["pairs_per_s"] * plan.actors
    read = calibration.get("read_mb_s")
    per_actor_read = plan.bank_bytes / plan.actors / (read * 1e6) if read else 0.0
    stream = per_actor_read if plan.streaming else 0.0
    overhead, prepare = calibration["batch_overhead_s"], calibration.get("prepare_s", 0.0)
    batches = sum(max(prepare + p / rate + stream, overhead) for p in plan.pairs_per_batch)
    if "calibration_s" in calibration:
        start = calibration["calibration_s"]
    else:
        start = 0.0 if plan.streaming else per_actor_read
    return start + batches + plan.outputs * overhead


def make_plan(problem: Problem, geometry: PatchGeometry, train: torch.Tensor, centers: np.ndarray,
              inputs: list[tuple[torch.Tensor, torch.Tensor | None, float]], n_actors: int, batch_images: int,
              shard_rows: int, dtype: torch.dtype = torch.float32, actor_memory: int | None = None,
              kernel: str = "auto", bank_url: str | None = None, storage_options: dict | None = None,
              calibrated: bool = True, stats: tuple[str, ...] = (), topk: int = 0) -> Plan:
    """:func:`count` of estimating every ``(z, mask, σ)`` of ``inputs`` against the bank of ``train`` (float64),
    then (``calibrated``) the predicted wall time from :func:`calibrate` on the first input."""
    plan = plan_classes(problem, geometry)
    out = count(problem, plan, train.shape[0], [(z, m) for z, m, _ in inputs], n_actors, batch_images, shard_rows,
                dtype, actor_memory)
    if calibrated and inputs:
        z, mask, sigma = inputs[0]
        shard = BankLayout.of(train.shape[0], plan.rows_per_image(), shard_rows).shard_images
        out.calibration = calibrate(problem, plan, centers, train[:shard].to(torch.float64), train.shape[0], z, mask,
                                    sigma, batch_images, dtype, kernel, bank_url, storage_options, out.actors, stats,
                                    topk)
        out.predicted_s = predict(out, out.calibration)
    return out
