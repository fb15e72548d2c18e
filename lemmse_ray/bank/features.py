r"""Query features and the scan of bank rows against them.

A query is one pixel of one estimator input ``z`` (query id = image·H·W + position).  For every class
:math:`c` of the plan, :func:`prepare_queries` lists the queries that meet :math:`c` and their features for
the kernel of :mod:`lemmse_ray.kernels.torch_kernels`, with a per-query ``shift`` that makes the logits exact
log-densities:

* whitened: :math:`\tilde q = W_c p_R - \text{centre}_c`, features :math:`[\tilde q/\sigma^2, -1/\sigma^2]`,
  shift :math:`-\lVert\tilde q\rVert^2/2\sigma^2 - \tfrac{r_c}{2}\log 2\pi\sigma^2 - \tfrac12\log\operatorname{pdet}S_c`.
* masked (random-mask aware, mask patch :math:`m`, :math:`n_1` kept pixels): features
  :math:`[m\odot\tilde p, -\tfrac12 m]/\sigma^2`, shift :math:`-\lVert m\odot\tilde p\rVert^2/2\sigma^2
  + \log P(m\mid c) - \tfrac{C n_1}{2}\log 2\pi\sigma^2`, where under zero padding
  :math:`P(m\mid c) = q^{n_1}(1-q)^{P^2-|\text{pad}_c|-n_1}` if no kept pixel of :math:`m` is padded for
  :math:`c`, else 0 (then the query does not meet :math:`c`): the zero-padded mask patch carries border
  information.
* mixture (random-mask agnostic): the query's non-padded pixels; shift
  :math:`\sum_a[\log(1-q) - \lVert p_a\rVert^2/2\sigma^2] - \tfrac{C A}{2}\log 2\pi\sigma^2`.

Each form is one :class:`KernelKind` object (:class:`Whitened`, :class:`Masked`, :class:`Mixture`; chosen by
:func:`kernel_kind` from ``plan.kind``) that owns which queries meet a class, their features, the key features
and the partials function.  :func:`scan` evaluates a contiguous range of bank rows (a whole bank, or one
shard) against a query set and returns one :class:`~lemmse_ray.core.partials.Partials` over all queries; block sizes
are passed through it.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..core.classes import ClassPlan, PatchClass
from ..core.partials import Partials, merge_into
from ..core.problems import Problem
from ..core.statistics import sums_of
from ..kernels.resolver import Choice, resolve
from ..kernels.torch_kernels import matmul_partials, mixture_partials
from .rows import BankArrays


@dataclass
class ClassQueries:
    index: torch.Tensor  # (M_c,) query ids
    features: torch.Tensor  # (M_c, F) or (M_c, A, C) for the mixture kernel
    shift: torch.Tensor  # (M_c,)


@dataclass
class QuerySet:
    """Features of every query for every class it meets (``per_class[c]`` is None if none meets ``c``)."""

    n: int
    channels: int
    sigma: float
    per_class: list[ClassQueries | None]


@dataclass
class ClassKeys:
    features: torch.Tensor  # (R_c, F) or (R_c, A, C)
    values: torch.Tensor  # (R_c, C)
    row_ids: torch.Tensor  # (R_c,) global row ids


@dataclass
class QueryBatch:
    """What every class's query features are computed from: the patches of a batch of estimator inputs."""

    patches: torch.Tensor  # (M, d) float64
    query_class: np.ndarray  # (M,) class of each query's position
    channels: int
    sigma: float
    pixel_mask: torch.Tensor | None = None  # (M, P²) float64, random masks only

    @property
    def var(self) -> float:
        return self.sigma * self.sigma

    @property
    def log_2pi_var(self) -> float:
        return math.log(2 * math.pi * self.var)


class KernelKind(ABC):
    """One logit form of the plan (``plan.kind``): its query features, key features and partials function."""

    name: str

    def batch(self, z: torch.Tensor, mask: torch.Tensor | None, problem: Problem, plan: ClassPlan,
              sigma: float) -> QueryBatch:
        """The patches (and mask patches) of estimator inputs ``z`` that query features are computed from."""
        geometry = plan.geometry
        batch, channels = z.shape[:2]
        patches = geometry.extract(z.to(torch.float64)).reshape(batch * geometry.n_positions, geometry.dim)
        return QueryBatch(patches, np.tile(plan.position_class, batch), channels, sigma)

    @abstractmethod
    def feature_width(self, plan: ClassPlan) -> int:
        """Width of the widest class's key features (elements per row)."""

    @abstractmethod
    def met(self, qb: QueryBatch, plan: ClassPlan, c: int) -> torch.Tensor:
        """Ids of the queries of ``qb`` that meet the rows of class ``c``."""

    @abstractmethod
    def query_features(self, qb: QueryBatch, plan: ClassPlan, c: int, ids: torch.Tensor,
                       center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, shift) of queries ``ids`` against class ``c`` (float64)."""

    @abstractmethod
    def key_features(self, arrays: BankArrays, lo: int, hi: int, cls: PatchClass,
                     center: np.ndarray) -> torch.Tensor:
        """Key features of rows ``[lo, hi)`` of ``arrays`` (all of class ``cls``)."""

    @abstractmethod
    def partials(self, cq: ClassQueries, ck: ClassKeys, plan: ClassPlan, sigma: float, stats: tuple[str, ...],
                 topk: int, choice: Choice, blocks: dict) -> Partials:
        """Partials of queries ``cq`` over rows ``ck`` on the backend of ``choice``
        (:func:`lemmse_ray.kernels.resolver.resolve`); ``blocks``: ``block_q``/``block_r`` to pass on."""


class Whitened(KernelKind):
    r"""Isotropic kernel on whitened coordinates: :math:`s = Q_f K_f^\top + \text{shift}` (matrix product)."""

    name = "whitened"

    def feature_width(self, plan):
        return plan.width + 1

    def met(self, qb, plan, c):
        return torch.nonzero(torch.from_numpy(plan.meets[c][qb.query_class])).flatten()

    def query_features(self, qb, plan, c, ids, center):
        cls = plan.classes[c]
        qt = qb.patches[ids][:, torch.from_numpy(cls.random)] @ torch.from_numpy(cls.whitening).T
        qt = qt - center[: cls.rank]
        features = torch.cat([qt / qb.var, torch.full((len(ids), 1), -1.0 / qb.var, dtype=torch.float64)], dim=1)
        shift = -0.5 * (qt * qt).sum(dim=1) / qb.var - 0.5 * cls.rank * qb.log_2pi_var - 0.5 * cls.log_pdet
        return features, shift

    def key_features(self, arrays, lo, hi, cls, center):
        return torch.cat([arrays.keys[lo:hi, : cls.rank], arrays.half_sqnorm[lo:hi, None]], dim=1)

    def partials(self, cq, ck, plan, sigma, stats, topk, choice, blocks):
        if choice.backend == "triton":
            from ..kernels.triton_kernel import triton_matmul_partials  # imports triton: an optional dependency
            return triton_matmul_partials(cq.features, ck.features, ck.values, cq.shift, stats)
        return matmul_partials(cq.features, ck.features, ck.values, cq.shift, ck.row_ids, stats, topk,
                               epilogue=choice.epilogue, **blocks)


class Masked(Whitened):
    r"""Random-mask aware kernel of width 2d (matrix product); a query meets a class when no kept pixel of its
    mask patch is padded for that class."""

    name = "masked"

    def feature_width(self, plan):
        return 2 * plan.geometry.dim

    def batch(self, z, mask, problem, plan, sigma):
        qb = super().batch(z, mask, problem, plan, sigma)
        qb.patches = qb.patches / problem.input_scale
        qb.pixel_mask = plan.geometry.extract_mask(mask.to(torch.float64)).reshape(len(qb.patches), -1)
        return qb

    def met(self, qb, plan, c):
        padded = torch.from_numpy(plan.classes[c].padded_pixels).to(torch.float64)
        return torch.nonzero((qb.pixel_mask @ padded) == 0).flatten()

    def query_features(self, qb, plan, c, ids, center):
        cls, q = plan.classes[c], plan.keep_prob
        pixel_mask = qb.pixel_mask[ids]
        m = pixel_mask.repeat(1, qb.channels)
        pt = qb.patches[ids] - center
        features = torch.cat([m * pt / qb.var, -0.5 * m / qb.var], dim=1)
        n1 = pixel_mask.sum(dim=1)
        n0 = plan.geometry.patch_size ** 2 - float(cls.padded_pixels.sum()) - n1
        log_prior = n1 * math.log(q) + n0 * math.log1p(-q)
        shift = -0.5 * (m * pt * pt).sum(dim=1) / qb.var + log_prior - 0.5 * qb.channels * n1 * qb.log_2pi_var
        return features, shift

    def key_features(self, arrays, lo, hi, cls, center):
        keys = arrays.keys[lo:hi]
        return torch.cat([keys, keys * keys], dim=1)


class Mixture(KernelKind):
    r"""Per-pixel mixture kernel (random-mask agnostic): the query's and the key's non-padded pixels."""

    name = "mixture"

    def feature_width(self, plan):
        return plan.geometry.dim  # at most: the non-padded pixels of the widest class, all channels

    def met(self, qb, plan, c):
        return torch.nonzero(torch.from_numpy(qb.query_class == c)).flatten()

    def query_features(self, qb, plan, c, ids, center):
        cls = plan.classes[c]
        pixels = torch.from_numpy(np.flatnonzero(~cls.padded_pixels))
        features = qb.patches[ids].reshape(len(ids), qb.channels, -1)[:, :, pixels].permute(0, 2, 1)
        shift = (len(pixels) * math.log1p(-plan.keep_prob) - 0.5 * (features * features).sum(dim=(1, 2)) / qb.var
                 - 0.5 * qb.channels * len(pixels) * qb.log_2pi_var)
        return features, shift

    def key_features(self, arrays, lo, hi, cls, center):
        channels = arrays.values.shape[1]
        raw = arrays.keys[lo:hi] + torch.from_numpy(center).to(arrays.keys.dtype)
        pixels = torch.from_numpy(np.flatnonzero(~cls.padded_pixels))
        return raw.reshape(hi - lo, channels, -1)[:, :, pixels].permute(0, 2, 1)

    def partials(self, cq, ck, plan, sigma, stats, topk, choice, blocks):
        return mixture_partials(cq.features, ck.features, ck.values, cq.shift, plan.keep_prob, sigma, ck.row_ids,
                                stats, topk, epilogue=choice.epilogue, **blocks)


KINDS: dict[str, KernelKind] = {k.name: k for k in (Whitened(), Masked(), Mixture())}


def kernel_kind(plan: ClassPlan) -> KernelKind:
    """The kernel-kind object of ``plan`` (``plan.kind``: ``"whitened"``, ``"masked"`` or ``"mixture"``)."""
    return KINDS[plan.kind]

def key_bytes(plan: ClassPlan, rows: int, dtype: torch.dtype) -> int:
    """Bytes of the key features, values and row ids of ``rows`` bank rows held for scanning (an upper bound:
    the widest class's features)."""
    itemsize = torch.finfo(dtype).bits // 8
    return rows * ((kernel_kind(plan).feature_width(plan) + plan.geometry.shape[0]) * itemsize + 8)



def query_bytes(shape: tuple[int, int, int], patch_size: int, n_images: int, dtype: torch.dtype) -> int:
    """An upper bound of the bytes :func:`prepare_queries` holds for ``n_images`` estimator inputs of ``shape``
    (C, H, W): per query pixel its float64 patch (``d = C·P²``), and features up to the widest kernel form
    (``2d + 1``) in float64 while they are computed and in ``dtype`` as kept, with the shift."""
    channels, height, width = shape
    dim = channels * patch_size * patch_size
    itemsize = torch.finfo(dtype).bits // 8
    return n_images * height * width * (8 * dim + (8 + itemsize) * (2 * dim + 2))


def prepare_queries(z: torch.Tensor, mask: torch.Tensor | None, problem: Problem, plan: ClassPlan,
                    centers: np.ndarray, sigma: float, dtype: torch.dtype = torch.float32,
                    skip: tuple[int, ...] = ()) -> QuerySet:
    """Features for estimator inputs ``z`` (B, C, H, W) (and masks (B, 1, H, W) for random masks), for every
    class but those in ``skip`` (evaluated otherwise, e.g. by :mod:`lemmse_ray.kernels.sliding`)."""
    kind = kernel_kind(plan)
    qb = kind.batch(z, mask, problem, plan, sigma)
    per_class: list[ClassQueries | None] = []
    for c in range(plan.n_classes):
        ids = kind.met(qb, plan, c) if c not in skip else ()
        if not len(ids):
            per_class.append(None)
            continue
        features, shift = kind.query_features(qb, plan, c, ids, torch.from_numpy(centers[c]))
        per_class.append(ClassQueries(ids, features.to(dtype).contiguous(), shift.to(dtype)))
    return QuerySet(len(qb.patches), qb.channels, sigma, per_class)


def queries_to(queries: QuerySet, device: torch.device | str) -> QuerySet:
    """The same query set on another device."""
    return QuerySet(queries.n, queries.channels, queries.sigma,
                    [None if cq is None else ClassQueries(cq.index.to(device), cq.features.to(device),
                                                          cq.shift.to(device)) for cq in queries.per_class])


def keys_to(keys: dict[int, ClassKeys], device: torch.device | str) -> dict[int, ClassKeys]:
    return {c: ClassKeys(k.features.to(device), k.values.to(device), k.row_ids.to(device)) for c, k in keys.items()}


def key_features(arrays: BankArrays, plan: ClassPlan, centers: np.ndarray) -> dict[int, ClassKeys]:
    """Kernel key features of each class present in ``arrays`` (σ-free: build once, scan many times)."""
    kind = kernel_kind(plan)
    out = {}
    class_ids = arrays.class_ids
    for c in torch.unique_consecutive(class_ids).tolist():
        rows = torch.nonzero(class_ids == c).flatten()
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        feats = kind.key_features(arrays, lo, hi, plan.classes[c], centers[c])
        out[c] = ClassKeys(feats.contiguous(), arrays.values[lo:hi].contiguous(),
                           torch.arange(arrays.start + lo, arrays.start + hi))
    return out


def scan(keys: dict[int, ClassKeys], plan: ClassPlan, queries: QuerySet, stats: tuple[str, ...] = (),
         topk: int = 0, kernel: str | Mapping[int, Choice] = "auto", block_q: int | None = None,
         block_r: int | None = None) -> Partials:
    """Partials of every query over the rows behind ``keys`` (classes no query meets are skipped).

    ``kernel``: the backend of each class, as :func:`lemmse_ray.kernels.resolver.resolve` decides it, or a
    request (``"auto"``, ``"torch"``, ``"triton"``) resolved here for rows on the keys' device (a scan evaluates
    key features; the sliding kernel's class, held as images, is :meth:`lemmse_ray.PatchBank.scan`'s).
    ``block_q``, ``block_r``: query and row block sizes of the torch kernels (unset: each kernel's default);
    the results do not depend on them beyond float rounding.
    """
    kind = kernel_kind(plan)
    blocks = {name: v for name, v in (("block_q", block_q), ("block_r", block_r)) if v is not None}
    first = next(iter(keys.values())).values
    if isinstance(kernel, str):
        kernel = resolve(kernel, plan, dtype=first.dtype, device=first.device, stats=stats)
    total = Partials.empty(queries.n, queries.channels, sums_of(stats), topk, first.dtype, first.device)
    for c, ck in keys.items():
        cq = queries.per_class[c]
        if cq is not None:
            merge_into(total, cq.index, kind.partials(cq, ck, plan, queries.sigma, stats, topk, kernel[c], blocks))
    return total


def met_pairs(z: torch.Tensor, mask: torch.Tensor | None, problem: Problem, plan: ClassPlan,
              class_rows: np.ndarray) -> int:
    """Pairs (query pixel, bank row) a scan of estimator inputs ``z`` evaluates: every query pixel times the
    rows of the classes it meets (``class_rows[c]``: rows of class ``c`` in the bank)."""
    kind = kernel_kind(plan)
    qb = kind.batch(z, mask, problem, plan, 1.0)
    return sum(len(kind.met(qb, plan, c)) * int(class_rows[c]) for c in range(plan.n_classes) if class_rows[c])
