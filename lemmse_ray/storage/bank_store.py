r"""Patch banks in Zarr v3 (docs/theory.md, §8, computing it exactly at scale).

One group per bank, addressed by URL (a local path or any fsspec URL such as ``s3://bucket/bank``):

==================  ==================  ===============================================================
array               shape               content
==================  ==================  ===============================================================
``keys``            (n, width)          whitened, centred keys (zero-padded to the largest class rank)
``half_sqnorm``     (n,)                :math:`\tfrac12\lVert\tilde k\rVert^2`
``values``          (n, C)              clean centre pixels
``class_ids``       (n,)  int32         class of each row (rows are sorted by class, image, position)
``source``          (n, 2) int64        (training image, position) of each row
``centers``         (n_classes, width)  per-class key centres (float64)
``done``            (n_shards,) uint8   1 once a shard is completely written
==================  ==================  ===============================================================

Every chunk ends with a CRC-32C checksum (the ``crc32c`` codec, inside the sharding codec; shard indexes
have theirs), and the row arrays' fill value cannot occur in a bank (NaN for floats, −1 for integers), so a
flipped byte, a truncated or missing shard object or chunk of a shard flagged done is a :class:`BankError`
naming the bank, the array and the shard, never silently read as zeros.  :func:`verify_bank` reads and checks
every shard of every row array (``class_ids`` must also follow the class offsets); :func:`clear_done` unflags
shards so that :func:`lemmse_ray.cluster.build.build_bank` rewrites them.  A repair is
:func:`lemmse_ray.cluster.build.repair_bank` (the same arguments as the first build): it compares them with
the bank's attributes (:func:`differences`), then clears the bad shards and rebuilds them.

A Zarr *shard* of ``shard_rows`` rows is the unit of work and of writing: the builder writes each shard
whole and only then sets its ``done`` flag, so a crash leaves at most unflagged shards, which a re-run
rewrites; finished shards are left alone.  Attributes hold the problem spec, patch geometry, class offsets,
ranks and a hash of the whitening matrices, shard size, a fingerprint of the training images and the format
version; opening a bank validates all of them against the request.  The bank does not depend on σ.
The group is created or reopened under its creation lock, and the builder writes each shard under its shard
lock (:mod:`lemmse_ray.storage.locks`), so processes sharing a bank create it once and build each shard once; a
half-made bank (attributes without all its arrays) is rebuilt by :func:`create_bank_group` and refused, on
one line, by the readers (:func:`check_whole`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from ..bank.rows import BankArrays, class_rows
from ..core.classes import ClassPlan
from ..core.problems import Problem
from .locks import creation_lock
from .ownership import create_group, half_made, kind_of, open_group, whole_group
from .redact import public

FORMAT_VERSION = 2  # 2: checksummed chunks, fill values that cannot occur in a bank
ARRAYS = ("keys", "half_sqnorm", "values", "class_ids", "source")
MEMBERS = (*ARRAYS, "centers", "done")
INNER_ROWS = 4096
CHECKSUMMED = (ZstdCodec(), Crc32cCodec())  # compression, then a CRC-32C of each compressed chunk


class BankError(ValueError):
    """A bank that cannot be used as it is: damaged, incomplete or of another format."""


def fingerprint(images: torch.Tensor) -> str:
    """SHA-256 of the training images (shape + float32 bytes): banks and results name their data."""
    data = images.detach().to(torch.float32).contiguous().numpy()
    digest = hashlib.sha256(json.dumps(list(data.shape)).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def plan_hash(plan: ClassPlan) -> str:
    """SHA-256 of everything that defines the classes (kind, position classes, whitening)."""
    digest = hashlib.sha256(plan.kind.encode())
    digest.update(np.ascontiguousarray(plan.position_class).tobytes())
    for cls in plan.classes:
        digest.update(cls.deterministic.tobytes())
        if cls.whitening is not None:
            digest.update(np.round(cls.whitening, 9).tobytes())
    return digest.hexdigest()

def stored_row_bytes(plan: ClassPlan, dtype: torch.dtype) -> int:
    """Bytes of one bank row as stored (uncompressed): keys, ½‖k‖², values, class id (int32), source (2 int64)."""
    itemsize = torch.finfo(dtype).bits // 8
    return (plan.width + 1 + plan.geometry.shape[0]) * itemsize + 4 + 16



@dataclass
class BankLayout:
    """Row layout of a bank: class offsets and shards."""

    n_images: int
    rows_per_image: np.ndarray  # (n_classes,)
    shard_rows: int

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows_per_image * self.n_images)])

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_rows, min(self.n_rows, (shard + 1) * self.shard_rows)


def bank_attributes(problem: Problem, plan: ClassPlan, layout: BankLayout, images_fingerprint: str,
                    dtype: torch.dtype) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "problem": problem.spec(),
        "geometry": plan.geometry.spec(),
        "kind": plan.kind,
        "keep_prob": plan.keep_prob,
        "n_images": layout.n_images,
        "n_rows": layout.n_rows,
        "width": plan.width,
        "channels": plan.geometry.shape[0],
        "class_offsets": [int(v) for v in layout.offsets],
        "class_ranks": [c.rank for c in plan.classes],
        "plan_hash": plan_hash(plan),
        "shard_rows": layout.shard_rows,
        "n_shards": layout.n_shards,
        "dtype": str(dtype).replace("torch.", ""),
        "fingerprint": images_fingerprint,
    }


def check_format(url: str, attrs: dict) -> None:
    """``BankError`` unless ``attrs`` are those of a bank of this :data:`FORMAT_VERSION`."""
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise BankError(f"bank: {url} has format version {version!r}, expected {FORMAT_VERSION} (banks of earlier "
                        "formats have no checksums); rebuild it (build_bank with overwrite=True, or "
                        "--overwrite)")


def differences(stored: dict, attrs: dict) -> list[str]:
    """The attributes in which a stored bank (``stored``) differs from the requested one (``attrs``)."""
    return sorted(k for k in attrs if stored.get(k) != attrs[k])


def create_bank_group(url: str, attrs: dict, centers: np.ndarray, storage_options: dict | None = None,
                      overwrite: bool = False) -> zarr.Group:
    """Create the bank's arrays, or reopen an identical unfinished/finished bank (to resume).

    Only a missing path, an empty folder or a bank of this project is written to (see
    :mod:`lemmse_ray.storage.ownership`).  An existing bank with different attributes is replaced only with
    ``overwrite=True``; a half-made one (its creation interrupted, or raced on an object store) is rebuilt,
    with a warning.  All of it runs under the bank's creation lock (:mod:`lemmse_ray.storage.locks`): a process
    creating the bank that another is creating waits for it, then reopens the finished group.
    """
    attrs = public(attrs)
    with creation_lock(url):
        existing = whole_group(url, "bank", MEMBERS, MEMBERS, storage_options)
        if existing is not None and not overwrite:
            old = dict(existing.attrs)
            check_format(url, old)
            diff = differences(old, attrs)
            if diff:
                raise ValueError(f"url: {url} already holds a different bank (differs in {', '.join(diff)}); "
                                 "choose another url or pass overwrite=True")
            return open_group(url, "r+", storage_options)
        return _create_bank_arrays(url, attrs, centers, storage_options)


def _create_bank_arrays(url: str, attrs: dict, centers: np.ndarray, storage_options: dict | None) -> zarr.Group:
    """A new bank group at ``url`` (under its creation lock): its arrays, then its attributes."""
    group = create_group(url, "bank", storage_options)
    n, width, channels, shard = attrs["n_rows"], attrs["width"], attrs["channels"], attrs["shard_rows"]
    inner = INNER_ROWS if shard % INNER_ROWS == 0 else shard  # inner chunks must tile the shard
    dtype = attrs["dtype"]

    def create(name, shape, dt, fill):
        group.create_array(name, shape=shape, dtype=dt, chunks=(inner, *shape[1:]), shards=(shard, *shape[1:]),
                           fill_value=fill, compressors=CHECKSUMMED)

    create("keys", (n, width), dtype, np.nan)
    create("half_sqnorm", (n,), dtype, np.nan)
    create("values", (n, channels), dtype, np.nan)
    create("class_ids", (n,), "int32", -1)
    create("source", (n, 2), "int64", -1)
    group.create_array("centers", shape=centers.shape, dtype="float64", chunks=centers.shape,
                       compressors=CHECKSUMMED)[...] = centers
    group.create_array("done", shape=(attrs["n_shards"],), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=CHECKSUMMED)
    group.attrs.update(attrs)  # last: a marked group without attributes is an interrupted creation
    return group


def read_shard(group: zarr.Group, url: str, name: str, shard: int, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of array ``name``, all in ``shard``; ``BankError`` naming the bank, array and
    shard if a chunk fails its checksum or cannot be decoded, or is missing (read as the fill value)."""
    array = group[name]
    where = f"bank {url}: array {name!r}, shard {shard} (rows {start}–{stop})"
    try:
        data = array[start:stop]
    except Exception as err:  # a checksum mismatch, a truncated shard or chunk, an undecodable chunk
        raise BankError(f"{where} is damaged ({type(err).__name__}: {err}); repair the bank") from err
    missing = np.isnan(data) if data.dtype.kind == "f" else data < 0
    if missing.any():
        first = start + int(np.flatnonzero(missing.reshape(len(data), -1).any(axis=1))[0])
        raise BankError(f"{where} has missing chunks (row {first} was never written); repair the bank")
    return data


def shard_rows_for(images: torch.Tensor, image_offset: int, shard: int, layout: BankLayout, problem: Problem,
                   plan: ClassPlan, centers: np.ndarray) -> BankArrays:
    """The rows of ``shard`` computed from ``images`` = training images ``image_offset …`` that it needs."""
    start, stop = layout.shard_range(shard)
    offsets = layout.offsets
    parts = []
    for c in range(plan.n_classes):
        lo, hi = max(start, offsets[c]), min(stop, offsets[c + 1])
        if lo >= hi:
            continue
        per = int(layout.rows_per_image[c])
        first, last = (lo - offsets[c]) // per, (hi - 1 - offsets[c]) // per + 1
        rows = class_rows(images[first - image_offset: last - image_offset], first, problem, plan, centers, c)
        cut = slice(lo - offsets[c] - first * per, hi - offsets[c] - first * per)
        parts.append(BankArrays(rows.keys[cut], rows.half_sqnorm[cut], rows.values[cut], rows.class_ids[cut],
                                rows.source[cut]))
    out = BankArrays.concat(parts)
    out.start = start
    return out


def shard_images(shard: int, layout: BankLayout) -> tuple[int, int]:
    """The range of training images [first, last) whose rows fall into ``shard``."""
    start, stop = layout.shard_range(shard)
    offsets = layout.offsets
    first, last = layout.n_images, 0
    for c in range(len(layout.rows_per_image)):
        lo, hi = max(start, offsets[c]), min(stop, offsets[c + 1])
        if lo < hi:
            per = int(layout.rows_per_image[c])
            first = min(first, (lo - offsets[c]) // per)
            last = max(last, (hi - 1 - offsets[c]) // per + 1)
    return int(first), int(last)


def write_shard(group: zarr.Group, shard: int, arrays: BankArrays, dtype: torch.dtype) -> None:
    """Write one whole shard, then flag it done.

    The shard's old objects (from a crashed writer, or damaged) are deleted first: Zarr reads an existing shard
    before rewriting it, and a damaged one would fail its checksum."""
    for name in ARRAYS:
        array = group[name]
        key = f"{array.path}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}"
        sync(array.store.delete(key))
    start, stop = arrays.start, arrays.start + len(arrays)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    group["keys"][start:stop] = arrays.keys.numpy().astype(np_dtype)
    group["half_sqnorm"][start:stop] = arrays.half_sqnorm.numpy().astype(np_dtype)
    group["values"][start:stop] = arrays.values.numpy().astype(np_dtype)
    group["class_ids"][start:stop] = arrays.class_ids.numpy().astype(np.int32)
    group["source"][start:stop] = arrays.source.numpy()
    group["done"][shard] = 1


class Bank:
    """An opened, validated bank."""

    def __init__(self, url: str, group: zarr.Group, plan: ClassPlan, problem: Problem,
                 storage_options: dict | None = None):
        self.url = url
        self.group = group
        self.plan = plan
        self.problem = problem
        self.storage_options = storage_options
        self.attrs = dict(group.attrs)
        check_format(url, self.attrs)
        try:
            self.centers = group["centers"][...]
        except Exception as err:
            raise BankError(f"bank {url}: array 'centers' is damaged ({type(err).__name__}: {err}); rebuild the "
                            "bank") from err
        self.layout = BankLayout(self.attrs["n_images"], plan.rows_per_image(), self.attrs["shard_rows"])

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def n_shards(self) -> int:
        return self.layout.n_shards

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.attrs["dtype"])

    def missing_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self.group["done"][...] == 0)]

    def read_rows(self, start: int, stop: int) -> BankArrays:
        """Rows ``[start, stop)``, read shard by shard with the checks of :func:`read_shard`."""
        first, last = start // self.layout.shard_rows, -(-stop // self.layout.shard_rows)
        parts = {name: [] for name in ARRAYS}
        for shard in range(first, last):
            lo, hi = self.layout.shard_range(shard)
            for name in ARRAYS:
                parts[name].append(read_shard(self.group, self.url, name, shard, max(lo, start), min(hi, stop)))
        keys, half_sqnorm, values, class_ids, source = (np.concatenate(parts[name]) for name in ARRAYS)
        return BankArrays(torch.from_numpy(keys), torch.from_numpy(half_sqnorm), torch.from_numpy(values),
                          torch.from_numpy(class_ids.astype(np.int64)), torch.from_numpy(source), start)

    def source(self, rows: np.ndarray) -> np.ndarray:
        """(image, position) of global ``rows`` (any shape; −1 allowed) → shape + (2,)."""
        flat = np.asarray(rows).reshape(-1)
        unique, inverse = np.unique(np.clip(flat, 0, self.n_rows - 1), return_inverse=True)
        if not len(unique):
            return np.zeros((*np.shape(rows), 2), dtype=np.int64)
        try:
            table = np.asarray(self.group["source"].get_orthogonal_selection((unique, slice(None))))
        except Exception as err:
            raise BankError(f"bank {self.url}: array 'source' is damaged ({type(err).__name__}: {err}); repair "
                            "the bank") from err
        if (table < 0).any():
            row = int(unique[np.flatnonzero((table < 0).any(axis=1))[0]])
            raise BankError(f"bank {self.url}: array 'source', shard {row // self.layout.shard_rows} has missing "
                            f"chunks (row {row} was never written); repair the bank")
        return table[inverse].reshape(*np.shape(rows), 2)


def open_bank(url: str, problem: Problem, plan: ClassPlan, storage_options: dict | None = None,
              fingerprint_of: str | None = None, require_complete: bool = True) -> Bank:
    """Open the bank at ``url`` and check it matches ``problem`` and ``plan`` (geometry and classes).

    Raises ``ValueError`` naming what differs: a missing bank, another format version, another problem,
    patch size, padding or candidate set, other classes, other training data (``fingerprint_of``), or
    unfinished shards.
    """
    try:
        group = open_group(url, "r", storage_options)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        raise ValueError(f"bank: no bank at {url}") from None
    if kind_of(group) != "bank":
        raise ValueError(f"bank: {url} is not a lemmse_ray bank")
    check_whole(url, group)
    attrs = dict(group.attrs)
    check_format(url, attrs)
    if attrs["problem"] != problem.spec():
        raise ValueError(f"problem: the bank at {url} was built for {attrs['problem']}, not {problem.spec()}")
    for key, value in plan.geometry.spec().items():
        if attrs["geometry"].get(key) != value:
            raise ValueError(f"{key}: the bank at {url} has {key}={attrs['geometry'].get(key)!r}, requested {value!r}")
    if attrs["plan_hash"] != plan_hash(plan):
        raise ValueError(f"bank: the classes/whitening of {url} differ from this problem's")
    if fingerprint_of is not None and attrs["fingerprint"] != fingerprint_of:
        raise ValueError(f"train: the bank at {url} was built from other training images")
    bank = Bank(url, group, plan, problem, storage_options)
    if require_complete and (missing := bank.missing_shards()):
        raise ValueError(f"bank: {url} is incomplete ({len(missing)} of {bank.n_shards} shards missing); "
                         "re-run the bank builder to finish it")
    return bank


def check_whole(url: str, group: zarr.Group) -> None:
    """``BankError`` if the bank ``group`` at ``url`` is half-made (:func:`lemmse_ray.storage.ownership.half_made`):
    opened for reading, it cannot be rebuilt here, and it must not end in a ``KeyError`` later."""
    why = half_made(group, "bank", MEMBERS)
    if why:
        raise BankError(f"bank: {url} is half-made ({why}); build it again (build_bank, or lemmse build-bank, "
                        "rebuilds it)")


def _open_checked(url: str, mode: str, storage_options: dict | None) -> zarr.Group:
    try:
        group = open_group(url, mode, storage_options)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        raise ValueError(f"url: no bank at {url}") from None
    if kind_of(group) != "bank":
        raise ValueError(f"url: {url} is not a lemmse_ray bank")
    check_whole(url, group)
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
    group = _open_checked(url, "r", storage_options)
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
    group = _open_checked(url, "r+", storage_options)
    n_shards = group.attrs["n_shards"]
    shards = list(shards)
    bad = [s for s in shards if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < n_shards]
    if bad:
        raise ValueError(f"shards must be shard indices in [0, {n_shards}) of {url}, got {bad!r}")
    for shard in shards:
        group["done"][int(shard)] = 0
