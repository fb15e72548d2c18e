r"""Patch banks in Zarr v3 (docs/theory.md, §8, computing it exactly at scale): the training images, sharded.

A bank row is a pair (training image :math:`i`, position :math:`j`): its key :math:`W_c\,\Pi_j BAx_i` and its
value :math:`x_i[:, j]` are functions of the image :math:`x_i` alone.  A bank therefore stores the training images
— once each, instead of the :math:`P^2` copies of every pixel that patch rows hold — and the rows are derived
where they are scanned (:class:`lemmse_ray.PatchBank` over a shard's images, in the actors of
:mod:`lemmse_ray.cluster.actors`), with the same code as the in-memory API.  One group per bank, addressed by
URL (a local path or any fsspec URL such as ``s3://bucket/bank``):

==================  ======================  ===========================================================
array               shape                   content
==================  ======================  ===========================================================
``images``          (N, C, H, W)            the training images: float32 where that is lossless, else float64
``centers``         (n_classes, width)      per-class key centres (float64), from the first images
``digests``         (n_shards, 32) uint8    SHA-256 of each shard's images (float32 bytes), set with it
``done``            (n_shards,) uint8       1 once a shard is completely written
==================  ======================  ===========================================================

A *shard* holds whole images (``shard_images`` of them: the requested ``shard_rows`` rows rounded down to
whole images, at least one) and is one Zarr chunk; it is the unit of work and of writing.  Every chunk ends
with a CRC-32C checksum (the ``crc32c`` codec), the images' fill value (NaN) cannot occur in a bank (images
are finite), and a reader recomputes each shard's SHA-256 against ``digests``: a flipped byte, a truncated or
missing chunk of a shard flagged done, or a chunk replaced by other valid bytes is a :class:`BankError`
naming the bank, the array and the shard, never silently read.  :func:`verify_bank` reads and checks every
shard; :func:`clear_done` unflags shards so that :func:`lemmse_ray.cluster.build.build_bank` rewrites them.
A repair is :func:`lemmse_ray.cluster.build.repair_bank` (the same arguments as the first build): it compares
them with the bank's attributes (:func:`differences`), then clears the bad shards and rebuilds them.

The builder writes each shard whole and only then sets its digest and ``done`` flag, so a crash leaves at
most unflagged shards, which a re-run rewrites; finished shards are left alone.  Attributes hold the problem
spec, patch geometry, class offsets (rows are numbered class-major: class, image, position, as in memory),
ranks and a hash of the whitening matrices, the shard size, a fingerprint of the training images and the
format version; opening a bank validates all of them against the request.  The bank does not depend on σ.
Banks of format 2 (patch rows) are refused with a hint to rebuild.  The group is created or reopened under
its creation lock, and the builder writes each shard under its shard lock (:mod:`lemmse_ray.storage.locks`),
so processes sharing a bank create it once and build each shard once; a half-made bank (attributes without
all its arrays) is rebuilt by :func:`create_bank_group` and refused, on one line, by the readers
(:func:`check_whole`).
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

from ..core.classes import ClassPlan
from ..core.problems import Problem
from .locks import creation_lock
from .ownership import (
    create_group,
    half_made,
    kind_of,
    open_group,
    owned_group,
    whole_group,
)
from .redact import public

FORMAT_VERSION = 3  # 3: the training images, sharded by whole images (2: patch rows with checksums)
MEMBERS = ("images", "centers", "digests", "done")
FORMER_MEMBERS = ("keys", "half_sqnorm", "values", "class_ids", "source")  # format 2's patch rows: ours to replace
CHECKSUMMED = (ZstdCodec(), Crc32cCodec())  # compression, then a CRC-32C of each compressed chunk


class BankError(ValueError):
    """A bank that cannot be used as it is: damaged, incomplete or of another format."""


def image_bytes(images: torch.Tensor) -> bytes:
    """The float32 bytes of images (C-contiguous): what fingerprints and shard digests hash."""
    return images.detach().to(torch.float32).contiguous().numpy().tobytes()


def fingerprint(images: torch.Tensor) -> str:
    """SHA-256 of the training images (shape + float32 bytes): banks and results name their data."""
    digest = hashlib.sha256(json.dumps(list(images.shape)).encode())
    digest.update(image_bytes(images))
    return digest.hexdigest()


def shard_digest(images: torch.Tensor) -> np.ndarray:
    """(32,) uint8 SHA-256 of a shard's images (float32 bytes)."""
    return np.frombuffer(hashlib.sha256(image_bytes(images)).digest(), dtype=np.uint8)


def plan_hash(plan: ClassPlan) -> str:
    """SHA-256 of everything that defines the classes (kind, position classes, whitening)."""
    digest = hashlib.sha256(plan.kind.encode())
    digest.update(np.ascontiguousarray(plan.position_class).tobytes())
    for cls in plan.classes:
        digest.update(cls.deterministic.tobytes())
        if cls.whitening is not None:
            digest.update(np.round(cls.whitening, 9).tobytes())
    return digest.hexdigest()


def storage_dtype(images: torch.Tensor) -> str:
    """``"float32"`` when the images survive a round trip through float32 exactly (8-bit data / 255 does), else
    ``"float64"``: a bank stores the very values the in-memory API would be given."""
    return "float32" if torch.equal(images.to(torch.float32).to(images.dtype), images) else "float64"


@dataclass
class BankLayout:
    """Layout of a bank: rows numbered class-major (class, image, position) and shards of whole images."""

    n_images: int
    rows_per_image: np.ndarray  # (n_classes,)
    shard_images: int

    @staticmethod
    def of(n_images: int, rows_per_image: np.ndarray, shard_rows: int) -> BankLayout:
        """Shards of ``shard_rows`` rows rounded down to whole images (at least one image)."""
        return BankLayout(n_images, rows_per_image, max(1, shard_rows // max(1, int(np.sum(rows_per_image)))))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows_per_image * self.n_images)])

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_images)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The training images ``[first, last)`` of ``shard``."""
        return shard * self.shard_images, min(self.n_images, (shard + 1) * self.shard_images)


def bank_attributes(problem: Problem, plan: ClassPlan, layout: BankLayout, images_fingerprint: str,
                    dtype: torch.dtype, image_dtype: str) -> dict[str, Any]:
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
        "shard_images": layout.shard_images,
        "n_shards": layout.n_shards,
        "dtype": str(dtype).replace("torch.", ""),
        "image_dtype": image_dtype,
        "fingerprint": images_fingerprint,
    }


def check_format(url: str, attrs: dict) -> None:
    """``BankError`` unless ``attrs`` are those of a bank of this :data:`FORMAT_VERSION`."""
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise BankError(f"bank: {url} has format version {version!r}, expected {FORMAT_VERSION} (banks now store "
                        "the training images, not patch rows); rebuild it (build_bank with overwrite=True, or "
                        "--overwrite)")


def differences(stored: dict, attrs: dict) -> list[str]:
    """The attributes in which a stored bank (``stored``) differs from the requested one (``attrs``)."""
    return sorted(k for k in attrs if stored.get(k) != attrs[k])


def create_bank_group(url: str, attrs: dict, centers: np.ndarray, shape: tuple[int, int, int],
                      storage_options: dict | None = None, overwrite: bool = False) -> zarr.Group:
    """Create the bank's arrays, or reopen an identical unfinished/finished bank (to resume).

    Only a missing path, an empty folder or a bank of this project is written to (see
    :mod:`lemmse_ray.storage.ownership`).  An existing bank with different attributes is replaced only with
    ``overwrite=True``; a half-made one (its creation interrupted, or raced on an object store) is rebuilt,
    with a warning.  All of it runs under the bank's creation lock (:mod:`lemmse_ray.storage.locks`): a process
    creating the bank that another is creating waits for it, then reopens the finished group.
    """
    attrs = public(attrs)
    with creation_lock(url):
        owned = owned_group(url, "bank", MEMBERS + FORMER_MEMBERS, storage_options)
        if owned is not None and not overwrite and owned.attrs.get("format_version") not in (None, FORMAT_VERSION):
            check_format(url, dict(owned.attrs))
        existing = whole_group(url, "bank", MEMBERS + FORMER_MEMBERS, MEMBERS, storage_options)
        if existing is not None and not overwrite:
            old = dict(existing.attrs)
            check_format(url, old)
            diff = differences(old, attrs)
            if diff:
                raise ValueError(f"url: {url} already holds a different bank (differs in {', '.join(diff)}); "
                                 "choose another url or pass overwrite=True")
            return open_group(url, "r+", storage_options)
        return _create_bank_arrays(url, attrs, centers, shape, storage_options)


def _create_bank_arrays(url: str, attrs: dict, centers: np.ndarray, shape: tuple[int, int, int],
                        storage_options: dict | None) -> zarr.Group:
    """A new bank group at ``url`` (under its creation lock): its arrays, then its attributes."""
    group = create_group(url, "bank", storage_options)
    n, per_shard, n_shards = attrs["n_images"], attrs["shard_images"], attrs["n_shards"]
    group.create_array("images", shape=(n, *shape), dtype=attrs["image_dtype"], chunks=(per_shard, *shape),
                       fill_value=np.nan, compressors=CHECKSUMMED)
    group.create_array("centers", shape=centers.shape, dtype="float64", chunks=centers.shape,
                       compressors=CHECKSUMMED)[...] = centers
    group.create_array("digests", shape=(n_shards, 32), dtype="uint8", chunks=(1, 32), fill_value=0,
                       compressors=CHECKSUMMED)
    group.create_array("done", shape=(n_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=CHECKSUMMED)
    group.attrs.update(attrs)  # last: a marked group without attributes is an interrupted creation
    return group


def _damaged(where: str, err: Exception) -> BankError:
    return BankError(f"{where} is damaged ({type(err).__name__}: {err}); repair the bank")


def read_shard(group: zarr.Group, url: str, shard: int, layout: BankLayout) -> torch.Tensor:
    """The images of ``shard`` (float64), checked: ``BankError`` naming the bank, the array and the shard if its
    chunk fails its checksum or cannot be decoded, is missing (read as the fill value), or differs from the
    digest written with it."""
    first, last = layout.shard_range(shard)
    where = f"bank {url}: array 'images', shard {shard} (images {first}–{last})"
    try:
        data = group["images"][first:last]
    except Exception as err:  # a checksum mismatch, a truncated or undecodable chunk
        raise _damaged(where, err) from err
    if np.isnan(data).any():
        raise BankError(f"{where} has a missing chunk (it was never written); repair the bank")
    try:
        digest = group["digests"][shard]
    except Exception as err:
        raise _damaged(f"bank {url}: array 'digests', shard {shard}", err) from err
    images = torch.from_numpy(np.ascontiguousarray(data)).to(torch.float64)
    if not np.array_equal(shard_digest(images), digest):
        raise BankError(f"{where} does not match the digest written with it (array 'digests'): the stored images "
                        "were changed; repair the bank")
    return images


def write_shard(group: zarr.Group, shard: int, layout: BankLayout, images: torch.Tensor) -> None:
    """Write one whole shard (the training images ``layout.shard_range(shard)``), then its digest, then flag it
    done.  The digest is computed from ``images``, the builder's copy, not from what was written."""
    first, last = layout.shard_range(shard)
    if images.shape[0] != last - first:
        raise ValueError(f"images: shard {shard} holds {last - first} images, got {images.shape[0]}")
    array = group["images"]
    # a damaged old chunk (from a crashed writer) must not be read back: Zarr may read a chunk it partly rewrites
    sync(array.store.delete(f"{array.path}/{array.metadata.encode_chunk_key((shard, 0, 0, 0))}"))
    array[first:last] = images.numpy().astype(array.dtype)
    group["digests"][shard] = shard_digest(images)
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
        self.layout = BankLayout(self.attrs["n_images"], plan.rows_per_image(), self.attrs["shard_images"])

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

    def read_images(self, shard: int) -> torch.Tensor:
        """The images of ``shard`` (float64), checked (:func:`read_shard`)."""
        return read_shard(self.group, self.url, shard, self.layout)


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
    check_readable(url, group)
    attrs = dict(group.attrs)
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


def check_readable(url: str, group: zarr.Group) -> None:
    """``BankError`` unless the bank ``group`` at ``url`` is of this format and whole (a bank of another format is
    named as such, not as half-made)."""
    if group.attrs.get("format_version") not in (None, FORMAT_VERSION):
        check_format(url, dict(group.attrs))
    check_whole(url, group)
    check_format(url, dict(group.attrs))


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
    check_readable(url, group)
    return group


def verify_bank(url: str, storage_options: dict | None = None) -> list[dict]:
    """Read and check every shard of the bank at ``url`` (:func:`read_shard`: checksum, missing chunk, digest).

    One row per shard: ``{"shard", "first_image", "last_image" (exclusive), "done" (bool), "status"}`` with
    status ``"ok"``, ``"not built"`` (not flagged done: the builder will write it) or the problem found, naming
    the bank, the array and the shard.  ``ValueError`` if ``url`` holds no bank of this format.
    """
    group = _open_checked(url, "r", storage_options)
    attrs = dict(group.attrs)
    layout = BankLayout(attrs["n_images"], np.zeros(0), attrs["shard_images"])
    try:
        done = group["done"][...]
    except Exception as err:
        raise BankError(f"bank {url}: array 'done' is damaged ({type(err).__name__}: {err}); rebuild the "
                        "bank") from err
    rows = []
    for shard in range(attrs["n_shards"]):
        first, last = layout.shard_range(shard)
        status = "not built"
        if done[shard]:
            try:
                read_shard(group, url, shard, layout)
                status = "ok"
            except BankError as err:
                status = str(err)
        rows.append({"shard": shard, "first_image": first, "last_image": last, "done": bool(done[shard]),
                     "status": status})
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
