"""Checking and repairing a bank, shard by shard.

:func:`verify_bank` reads every shard of every row array (each chunk's CRC-32C is checked on decoding, missing
chunks show up as fill values that cannot occur in a bank, and ``class_ids`` must follow the class offsets);
:func:`clear_done` unflags shards so that :func:`lemmse_ray.distributed.build_bank` rewrites them.  A repair is::

    bad = [row["shard"] for row in verify_bank(url) if row["done"] and row["status"] != "ok"]
    clear_done(url, bad)
    build_bank(url, train, problem, ...)  # the same arguments as the first build
"""
from __future__ import annotations

import numpy as np
import zarr

from .ownership import kind_of, open_group
from .store import ARRAYS, BankError, check_format, read_shard


def _open(url: str, mode: str, storage_options: dict | None) -> zarr.Group:
    try:
        group = open_group(url, mode, storage_options)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        raise ValueError(f"url: no bank at {url}") from None
    if kind_of(group) != "bank" or "format_version" not in group.attrs:
        raise ValueError(f"url: {url} is not a (finished creating) lemmse_ray bank")
    check_format(url, dict(group.attrs))
    return group


def _check_shard(group: zarr.Group, url: str, shard: int, start: int, stop: int, offsets: np.ndarray) -> str:
    problems = []
    for name in ARRAYS:
        try:
            data = read_shard(group, url, name, shard, start, stop)
        except BankError as err:
            problems.append(str(err))
            continue
        if name == "class_ids":
            expected = np.searchsorted(offsets, np.arange(start, stop), side="right") - 1
            if not np.array_equal(data, expected):
                problems.append(f"bank {url}: array 'class_ids', shard {shard}: rows out of their class ranges")
    return "; ".join(problems) or "ok"


def verify_bank(url: str, storage_options: dict | None = None) -> list[dict]:
    """Read and check every shard of every array of the bank at ``url``.

    One row per shard: ``{"shard", "first_row", "last_row" (exclusive), "done" (bool), "status"}`` with status
    ``"ok"``, ``"not built"`` (not flagged done: the builder will write it) or the problems found, each naming
    the bank, the array and the shard.  ``ValueError`` if ``url`` holds no bank of this format.
    """
    group = _open(url, "r", storage_options)
    attrs = dict(group.attrs)
    n_rows, shard_rows = attrs["n_rows"], attrs["shard_rows"]
    offsets = np.asarray(attrs["class_offsets"])
    try:
        done = group["done"][...]
    except Exception as err:
        raise BankError(f"bank {url}: array 'done' is damaged ({type(err).__name__}: {err}); rebuild the "
                        "bank") from err
    rows = []
    for shard in range(attrs["n_shards"]):
        start, stop = shard * shard_rows, min(n_rows, (shard + 1) * shard_rows)
        flagged = bool(done[shard])
        status = _check_shard(group, url, shard, start, stop, offsets) if flagged else "not built"
        rows.append({"shard": shard, "first_row": start, "last_row": stop, "done": flagged, "status": status})
    return rows


def clear_done(url: str, shards, storage_options: dict | None = None) -> None:
    """Unflag ``shards`` of the bank at ``url``: the next ``build_bank`` with the same arguments rewrites them.

    ``ValueError`` naming ``shards`` unless they are shard indices of this bank.
    """
    group = _open(url, "r+", storage_options)
    n_shards = group.attrs["n_shards"]
    shards = list(shards)
    bad = [s for s in shards if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < n_shards]
    if bad:
        raise ValueError(f"shards must be shard indices in [0, {n_shards}) of {url}, got {bad!r}")
    for shard in shards:
        group["done"][int(shard)] = 0
