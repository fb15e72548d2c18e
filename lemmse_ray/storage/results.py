r"""Estimation outputs in Zarr v3, written batch by batch so that a killed job resumes, and read back whole.

Arrays (B query images): one per output of :data:`lemmse_ray.core.statistics.STATISTICS` that was asked for,
(B, *grid) (``mean``, ``variance``: (B, C, H, W); ``ess``, ``max_weight``, ``entropy``, ``log_evidence``:
(B, H, W); ``topk_image``, ``topk_position``, ``topk_logits``: (B, H, W, k)); the inputs ``z``, ``mask``
(random masks) and clean images ``x`` when known; ``done`` (n_batches,) flags.  A batch's arrays
are written first and its flag last, so a half-written batch is never taken as finished and is simply
recomputed (the numbers are deterministic).  The batch layout (``batch_images``) is part of the output: a
resumed run keeps the stored one.  Chunks are checksummed (CRC-32C) and unwritten floats read as NaN, never
as plausible zeros.  Only a missing path, an empty folder or an estimate output of this project is written to
(:mod:`lemmse_ray.storage.ownership`), and nothing secret is stored (:mod:`lemmse_ray.storage.redact`).  Attributes hold the
configuration (bank fingerprint and class hash, σ, statistics, dtype, a hash of the inputs), provenance
metadata, and a ``history`` of which batches each run computed.  :class:`EstimateArrays` reads a finished group
(or an in-memory :class:`~lemmse_ray.core.statistics.Result`) back.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import zarr
from zarr.errors import ContainsArrayError

from ..core.statistics import FLOAT, INT64, OUTPUTS, PER_TOPK, Result, output_fields, outputs
from ..core.validation import as_float64, as_int64, check_shape
from .bank_store import CHECKSUMMED
from .locks import creation_lock
from .ownership import ARRAYS, create_group, open_group, whole_group
from .redact import public

log = logging.getLogger("lemmse_ray")
#: The arrays an estimate group may hold: every output of the statistics table, the inputs, the done flags.
MEMBERS = (*(o.name for o in OUTPUTS), "z", "mask", "x", "done")


def inputs_hash(z: torch.Tensor, mask: torch.Tensor | None) -> str:
    digest = hashlib.sha256(z.detach().to(torch.float64).contiguous().numpy().tobytes())
    if mask is not None:
        digest.update(mask.detach().to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


ALWAYS = ("mean", "done")  # arrays of every estimate group (groups from before the ``arrays`` record hold these)


def open_results(url: str, config: dict[str, Any], shape: tuple[int, int, int, int], batch_images: int,
                 stats: tuple[str, ...], topk: int, dtype: str, storage_options: dict | None = None,
                 overwrite: bool = False) -> zarr.Group:
    """Create the output group, or reopen one with the same ``config`` to resume.

    A finished or partial output with another configuration is replaced only with ``overwrite=True``.  A
    resumed output keeps its stored batch layout (logged when ``batch_images`` differs): read it back from
    ``group.attrs["batch_images"]``.  It all runs under the group's creation lock
    (:mod:`lemmse_ray.storage.locks`): a process opening a group that another is creating waits for it, then
    reopens the finished group; a half-made group (an array it was created with missing, or no attributes) is
    rebuilt, with a warning.
    """
    with creation_lock(url):
        return _open_or_create(url, config, shape, batch_images, stats, topk, dtype, storage_options, overwrite)


def _open_or_create(url: str, config: dict[str, Any], shape: tuple[int, int, int, int], batch_images: int,
                    stats: tuple[str, ...], topk: int, dtype: str, storage_options: dict | None,
                    overwrite: bool) -> zarr.Group:
    """:func:`open_results`, under the group's creation lock."""
    config = public(config)
    existing = whole_group(url, "estimate", MEMBERS, ALWAYS, storage_options)
    if existing is not None and not overwrite:
        old = dict(existing.attrs["config"])
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(f"out: {url} already holds results of another run (differs in {', '.join(diff)}); "
                             "choose another output or pass overwrite=True")
        stored = existing.attrs["batch_images"]
        if stored != batch_images:
            log.info("%s: resuming with the stored batch layout batch_images=%d (requested %d; pass overwrite "
                     "to recompute everything with the new one)", public(url), stored, batch_images)
        return open_group(url, "r+", storage_options)
    group = create_group(url, "estimate", storage_options)
    batch, channels, height, width = shape
    n_batches = -(-batch // batch_images)

    def create(name, tail, dt):
        fill = np.nan if np.dtype(dt).kind == "f" else -1
        group.create_array(name, shape=(batch, *tail), dtype=dt, chunks=(batch_images, *tail), fill_value=fill,
                           compressors=CHECKSUMMED)

    for o in outputs(stats):
        create(o.name, o.shape(channels, height, width, topk), dtype if o.dtype == FLOAT else "int64")
    group.create_array("done", shape=(n_batches,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=CHECKSUMMED)
    group.attrs.update({"config": config, "batch_images": batch_images, "n_batches": n_batches, "history": [],
                        ARRAYS: sorted(group.array_keys())})  # last: the group is whole once they are written
    return group


def write_inputs(group: zarr.Group, z: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor | None) -> None:
    """Store the estimator inputs (and masks, clean images) once.  Another process resuming the same output may
    create one first: its inputs are the same (the inputs' hash is part of the configuration), so it is kept."""
    for name, value in (("z", z), ("mask", mask), ("x", x)):
        if value is None or name in group:
            continue
        arr = value.detach().cpu().numpy()
        try:
            created = group.create_array(name, shape=arr.shape, dtype=arr.dtype,
                                         chunks=(min(len(arr), 64), *arr.shape[1:]), compressors=CHECKSUMMED)
        except ContainsArrayError:
            continue
        created[...] = arr


def write_batch(group: zarr.Group, batch: int, start: int, values: dict[str, np.ndarray]) -> None:
    """Write one batch of outputs, then flag it done (the flag is the commit).

    ``ValueError`` unless ``values`` cover exactly batch ``batch`` of the stored layout."""
    size, n_images = group.attrs["batch_images"], group["mean"].shape[0]
    expected = (batch * size, min(n_images, (batch + 1) * size))
    for name, array in values.items():
        if (start, start + len(array)) != expected:
            raise ValueError(f"batch {batch} covers images [{expected[0]}, {expected[1]}), "
                             f"got {name} for [{start}, {start + len(array)})")
    for name, array in values.items():
        group[name][start: start + len(array)] = array
    group["done"][batch] = 1


def pending_batches(group: zarr.Group) -> list[int]:
    return [int(b) for b in np.flatnonzero(group["done"][...] == 0)]


def record_run(group: zarr.Group, entry: dict) -> None:
    history = list(group.attrs.get("history", []))
    history.append(public(entry))
    group.attrs["history"] = history


@dataclass
@output_fields("np.ndarray | None")
class EstimateArrays:
    """The arrays of one estimate output, float64 but the int64 outputs; outputs not stored are ``None``.

    ``x``, ``z``, ``mean``: (B, C, H, W); ``mask``: (B, 1, H, W); ``n_rows``: the number of bank rows
    :math:`N_\\text{rows}`; and one field per output of :data:`lemmse_ray.core.statistics.STATISTICS`, after
    ``mean``, on its grid: ``variance`` (B, C, H, W); ``ess``, ``max_weight``, ``entropy``, ``log_evidence``
    (B, H, W); ``topk_image``, ``topk_position`` (row·W + col, int64), ``topk_logits`` (B, H, W, k).
    """

    x: np.ndarray
    z: np.ndarray
    mean: np.ndarray
    mask: np.ndarray | None = None
    n_rows: int | None = None

    def __post_init__(self) -> None:
        self.x = as_float64(self.x, "x")
        if self.x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {self.x.shape}")
        batch, channels, height, width = self.x.shape
        self.z = check_shape(as_float64(self.z, "z"), self.x.shape, "z")
        self.mean = check_shape(as_float64(self.mean, "mean"), self.x.shape, "mean")
        if self.mask is not None:
            self.mask = check_shape(as_float64(self.mask, "mask"), (batch, 1, height, width), "mask")
        per_topk = {}
        for o in OUTPUTS[1:]:
            value = getattr(self, o.name)
            if value is None:
                continue
            value = as_int64(value, o.name) if o.dtype == INT64 else as_float64(value, o.name)
            if o.grid == PER_TOPK:
                if value.ndim != 4 or value.shape[:3] != (batch, height, width):
                    raise ValueError(f"{o.name} must have shape {(batch, height, width)} + (k,), got {value.shape}")
                per_topk[o.name] = value.shape
            else:
                check_shape(value, (batch, *o.shape(channels, height, width, 0)), o.name)
            setattr(self, o.name, value)
        if len(set(per_topk.values())) > 1:
            raise ValueError(f"{', '.join(per_topk)} must have one shape (B, H, W, k), got "
                             + ", ".join(f"{name} {shape}" for name, shape in per_topk.items()))
        if self.n_rows is not None and (int(self.n_rows) != self.n_rows or self.n_rows < 1):
            raise ValueError(f"n_rows must be a positive integer, got {self.n_rows!r}")

    @classmethod
    def from_group(cls, group: zarr.Group, stats: Iterable[str] | None = None) -> "EstimateArrays":
        """Read an estimate group written by this module; every batch must be finished.

        ``stats``: the statistics whose outputs to read (default: every one stored); ``x``, ``z``, ``mean`` and
        the masks (when stored) are always read.
        """
        if "done" in group and not bool(np.all(group["done"][...] == 1)):
            raise ValueError("group: the estimate output has unfinished batches; run the estimation to the end")
        for name in ("x", "z", "mean"):
            if name not in group:
                raise ValueError(f"group: the estimate output holds no {name!r} array")
        wanted = OUTPUTS[1:] if stats is None else [o for o in OUTPUTS[1:] if o in outputs(stats)]
        names = ("x", "z", "mean", "mask", *(o.name for o in wanted))
        arrays = {name: np.asarray(group[name][...]) for name in names if name in group}
        return cls(**arrays, n_rows=dict(group.attrs.get("config", {})).get("n_rows"))

    @classmethod
    def from_result(cls, result: Result, z: Any, x: Any, mask: Any = None) -> "EstimateArrays":
        """Arrays of an in-memory :func:`lemmse_ray.estimate` result for inputs ``z`` of clean images ``x``."""
        return cls(x=x, z=z, mean=result.mean, mask=mask, n_rows=result.info.get("n_rows"),
                   **{o.name: getattr(result, o.name) for o in OUTPUTS[1:]})

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.x.shape)

    def require(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) is None:
                raise ValueError(f"estimates: the statistic {name!r} was not stored; add it to stats")
