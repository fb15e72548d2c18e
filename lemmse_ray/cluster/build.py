"""Building a patch bank in its Zarr store with Ray tasks (``docs/theory.md`` §8), and repairing one.

:func:`build_bank` plans the bank (classes, centres, shard layout), creates or reopens its group, and runs one
task per missing shard; each task writes the shard's training images whole (a bank stores images, see
:mod:`lemmse_ray.storage.bank_store`), then its digest, then flags it done (idempotent: re-running completes the missing shards only).  A task holds its
shard's lock (:mod:`lemmse_ray.storage.locks`) and skips a shard that another process finished meanwhile, so
two processes building one bank (two studies sharing ``--work``) share its shards: none is computed twice on a
local path.  :func:`repair_bank` rebuilds the damaged shards of a bank from the images it was built from, and
refuses other images before it changes anything.
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
    BankError,
    BankLayout,
    bank_attributes,
    clear_done,
    create_bank_group,
    differences,
    fingerprint,
    open_bank,
    storage_dtype,
    verify_bank,
    write_shard,
)
from ..storage.locks import shard_lock
from ..storage.ownership import open_group
from ..storage.redact import public
from .session import ensure_ray

log = logging.getLogger("lemmse_ray")


def build_shard(url: str, storage_options: dict | None, shard: int, images: np.ndarray, layout: BankLayout,
                attrs: dict) -> int:
    """Write shard ``shard`` of the bank at ``url`` (of attributes ``attrs``) from ``images``, the training
    images; returns the images written, 0 when another process finished the shard first.

    Under the shard's lock, so that two processes building the bank compute each shard once (the second
    waits for the first, then finds the shard done); ``BankError`` if the group at ``url`` is no longer this
    bank (replaced by another process since this build created or reopened it)."""
    with shard_lock(url, shard):
        group = open_group(url, "r+", storage_options)
        diff = differences(dict(group.attrs), attrs)
        if diff:
            raise BankError(f"bank: {url} was replaced by another process during this build (it now differs in "
                            f"{', '.join(diff)}); shard {shard} is not written")
        if group["done"][shard]:
            return 0
        first, last = layout.shard_range(shard)
        write_shard(group, shard, layout, torch.from_numpy(np.array(images[first:last])))
    return last - first


_build_shard = ray.remote(num_cpus=1)(build_shard)


def bank_request(train: torch.Tensor, problem: Problem, patch_size: int, padding: str, candidates: str,
                 shard_rows: int, dtype: torch.dtype) -> tuple[ClassPlan, np.ndarray, BankLayout, dict]:
    """(class plan, class centres, shard layout, attributes) of the bank of ``train`` for ``problem``: what
    :func:`build_bank` would write, checked (``ValueError`` naming the bad argument)."""
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows must be a positive integer, got {shard_rows!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    shape = tuple(train.shape[1:])
    problem.check_shape(shape)
    plan = plan_classes(problem, PatchGeometry(shape, patch_size, padding, candidates))
    centers = class_centers(train, problem, plan)
    layout = BankLayout.of(train.shape[0], plan.rows_per_image(), shard_rows)
    return plan, centers, layout, bank_attributes(problem, plan, layout, fingerprint(train), dtype,
                                                  storage_dtype(train))


def build_bank(url: str, train, problem: Problem, patch_size: int = 5, padding: str = "zeros",
               candidates: str = "all", shard_rows: int = 1 << 16, dtype: torch.dtype = torch.float32,
               storage_options: dict | None = None, overwrite: bool = False, progress: bool = True) -> Bank:
    """Build (or finish) the patch bank of ``train`` for ``problem`` at ``url`` with Ray tasks.

    ``shard_rows``: bank rows per shard (the unit of work of the actors), rounded down to whole images.
    Returns the opened bank.  Throughput (rows/s: the rows the written images hold) is logged and stored in
    ``bank.build_stats`` (``shards_written`` counts the shards this call wrote, not those another process
    finished meanwhile).
    """
    train = as_images(train, "train")
    plan, centers, layout, attrs = bank_request(train, problem, patch_size, padding, candidates, shard_rows, dtype)
    group = create_bank_group(url, attrs, centers, tuple(train.shape[1:]), storage_options, overwrite)
    missing = [int(s) for s in np.flatnonzero(group["done"][...] == 0)]
    ensure_ray()
    t0 = time.perf_counter()
    rows_written = written = 0
    if missing:
        images = ray.put(train.numpy())
        stored = public(attrs)
        pending = [_build_shard.remote(url, storage_options, s, images, layout, stored) for s in missing]
        with tqdm(total=len(missing), desc="bank shards", unit="shard", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                images_written = ray.get(done[0])
                rows_written += images_written * int(layout.rows_per_image.sum())
                written += images_written > 0
                bar.update(1)
    seconds = time.perf_counter() - t0
    bank = open_bank(url, problem, plan, storage_options)
    bank.build_stats = {"shards_written": written, "rows_written": rows_written, "seconds": seconds,
                        "rows_per_s": rows_written / seconds if seconds > 0 and rows_written else 0.0}
    log.info("bank %s: %d shards written (%d rows) in %.1f s, %.0f rows/s; %d were already done, %d finished by "
             "another process meanwhile", public(url), written, rows_written, seconds,
             bank.build_stats["rows_per_s"], bank.n_shards - len(missing), len(missing) - written)
    return bank


def repair_bank(url: str, train, problem: Problem, patch_size: int = 5, padding: str = "zeros",
                candidates: str = "all", shard_rows: int = 1 << 16, dtype: torch.dtype = torch.float32,
                storage_options: dict | None = None, progress: bool = True,
                bad: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Rebuild the bad shards of the bank at ``url`` (damaged, or never finished) from ``train``, the images it
    was built from, with the arguments it was built with.  Returns (the bad shards, those still bad after).
    ``bad``: the bad shards when the caller has just verified the bank (:func:`verify_bank`), else found here.

    A repair restores the bank that is there: it first checks that these arguments describe it — the
    fingerprint of the training images, the problem, the patch geometry, the classes, the shard size and
    dtype — and a difference is a ``ValueError`` naming it, before any done flag is cleared.  It never
    replaces the bank (there is no ``overwrite``): rebuilt from other images it would be a new bank under a
    repair's name, and a typo in the images would cost the bank; replacing one is :func:`build_bank` with
    ``overwrite=True`` (``lemmse build-bank --overwrite``).
    """
    train = as_images(train, "train")
    attrs = bank_request(train, problem, patch_size, padding, candidates, shard_rows, dtype)[3]
    if bad is None:
        bad = [row["shard"] for row in verify_bank(url, storage_options) if row["status"] != "ok"]
    stored = dict(open_group(url, "r", storage_options).attrs)
    diff = differences(stored, public(attrs))
    if "fingerprint" in diff:
        raise ValueError(f"train: the bank at {url} was built from other training images (fingerprint "
                         f"{stored.get('fingerprint', '?')[:12]}…, these images {attrs['fingerprint'][:12]}…; it "
                         f"differs in {', '.join(diff)}): repair it with the images it was built from (the same "
                         "dataset, n_train, subset and seed); nothing was changed")
    if diff:
        raise ValueError(f"bank: the bank at {url} was built with other settings (it differs in {', '.join(diff)}): "
                         "repair it with the settings it was built with; nothing was changed")
    if bad:
        clear_done(url, bad, storage_options)
        build_bank(url, train, problem, patch_size, padding, candidates, shard_rows, dtype, storage_options,
                   progress=progress)
    still = [row["shard"] for row in verify_bank(url, storage_options) if row["status"] != "ok"]
    return bad, still
