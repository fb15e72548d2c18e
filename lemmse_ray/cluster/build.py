"""Building a patch bank in its Zarr store with Ray tasks (``docs/theory.md`` §8).

:func:`build_bank` plans the bank (classes, centres, shard layout), creates or reopens its group, and runs one
task per missing shard; each task computes its rows from the training images it needs and writes the whole
shard, then flags it done (idempotent: re-running completes the missing shards only).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from ..bank.rows import class_centers
from ..core.classes import ClassPlan, plan_classes
from ..core.patches import PatchGeometry
from ..core.problems import Problem
from ..core.validation import DTYPES, as_images
from ..storage.bank_store import (
    Bank,
    BankLayout,
    bank_attributes,
    create_bank_group,
    fingerprint,
    open_bank,
    shard_images,
    shard_rows_for,
    write_shard,
)
from ..storage.ownership import open_group
from ..storage.redact import public
from .session import ensure_ray

log = logging.getLogger("lemmse_ray")


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
