r"""Query features and the scan of bank rows against them.

A query is one pixel of one estimator input ``z`` (query id = image·H·W + position).  For every class
:math:`c` of the plan, :func:`prepare_queries` lists the queries that meet :math:`c` and their features for
the kernel of :mod:`lemmse_ray.kernel`, with a per-query ``shift`` that makes the logits exact
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

:func:`scan` evaluates a contiguous range of bank rows (a whole bank, or one shard) against a query set and
returns one :class:`~lemmse_ray.kernel.Partials` over all queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .backends import fused_partials, use_triton
from .bank import BankArrays
from .classes import ClassPlan
from .kernel import Partials, matmul_partials, merge_into, mixture_partials
from .problems import Problem


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


def prepare_queries(z: torch.Tensor, mask: torch.Tensor | None, problem: Problem, plan: ClassPlan,
                    centers: np.ndarray, sigma: float, dtype: torch.dtype = torch.float32) -> QuerySet:
    """Features for estimator inputs ``z`` (B, C, H, W) (and masks (B, 1, H, W) for random masks)."""
    geometry = plan.geometry
    batch, channels = z.shape[:2]
    n_pos = geometry.n_positions
    patches = geometry.extract(z.to(torch.float64)).reshape(batch * n_pos, geometry.dim)
    query_class = torch.from_numpy(np.tile(plan.position_class, batch))
    var = sigma * sigma
    log_2pi_var = math.log(2 * math.pi * var)
    per_class: list[ClassQueries | None] = []
    if plan.kind == "masked":
        patches = patches / problem.input_scale
        pixel_mask = geometry.extract_mask(mask.to(torch.float64)).reshape(batch * n_pos, -1)
        kept = pixel_mask.sum(dim=1)
        coord_mask = pixel_mask.repeat(1, channels)
    q = plan.keep_prob
    for c, cls in enumerate(plan.classes):
        center = torch.from_numpy(centers[c])
        if plan.kind == "whitened":
            met = torch.from_numpy(plan.meets[c][query_class.numpy()])
            ids = torch.nonzero(met).flatten()
            qt = patches[ids][:, torch.from_numpy(cls.random)] @ torch.from_numpy(cls.whitening).T
            qt = qt - center[: cls.rank]
            features = torch.cat([qt / var, torch.full((len(ids), 1), -1.0 / var, dtype=torch.float64)], dim=1)
            shift = -0.5 * (qt * qt).sum(dim=1) / var - 0.5 * cls.rank * log_2pi_var - 0.5 * cls.log_pdet
        elif plan.kind == "masked":
            padded = torch.from_numpy(cls.padded_pixels).to(torch.float64)
            ids = torch.nonzero((pixel_mask @ padded) == 0).flatten()
            m = coord_mask[ids]
            pt = patches[ids] - center
            features = torch.cat([m * pt / var, -0.5 * m / var], dim=1)
            n1 = kept[ids]
            n0 = geometry.patch_size ** 2 - float(cls.padded_pixels.sum()) - n1
            log_prior = n1 * math.log(q) + n0 * math.log1p(-q)
            shift = -0.5 * (m * pt * pt).sum(dim=1) / var + log_prior - 0.5 * channels * n1 * log_2pi_var
        else:  # mixture
            ids = torch.nonzero(query_class == c).flatten()
            pixels = torch.from_numpy(np.flatnonzero(~cls.padded_pixels))
            features = patches[ids].reshape(len(ids), channels, -1)[:, :, pixels].permute(0, 2, 1)
            shift = (len(pixels) * math.log1p(-q) - 0.5 * (features * features).sum(dim=(1, 2)) / var
                     - 0.5 * channels * len(pixels) * log_2pi_var)
        per_class.append(ClassQueries(ids, features.to(dtype).contiguous(), shift.to(dtype)) if len(ids) else None)
    return QuerySet(batch * n_pos, channels, sigma, per_class)


def queries_to(queries: QuerySet, device: torch.device | str) -> QuerySet:
    """The same query set on another device."""
    return QuerySet(queries.n, queries.channels, queries.sigma,
                    [None if cq is None else ClassQueries(cq.index.to(device), cq.features.to(device),
                                                          cq.shift.to(device)) for cq in queries.per_class])


def keys_to(keys: dict[int, "ClassKeys"], device: torch.device | str) -> dict[int, "ClassKeys"]:
    return {c: ClassKeys(k.features.to(device), k.values.to(device), k.row_ids.to(device)) for c, k in keys.items()}


@dataclass
class ClassKeys:
    features: torch.Tensor  # (R_c, F) or (R_c, A, C)
    values: torch.Tensor  # (R_c, C)
    row_ids: torch.Tensor  # (R_c,) global row ids


def key_features(arrays: BankArrays, plan: ClassPlan, centers: np.ndarray) -> dict[int, ClassKeys]:
    """Kernel key features of each class present in ``arrays`` (σ-free: build once, scan many times)."""
    out = {}
    class_ids = arrays.class_ids
    present = torch.unique_consecutive(class_ids)
    dtype = arrays.keys.dtype
    for c in present.tolist():
        rows = torch.nonzero(class_ids == c).flatten()
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        keys = arrays.keys[lo:hi]
        cls = plan.classes[c]
        if plan.kind == "whitened":
            feats = torch.cat([keys[:, : cls.rank], arrays.half_sqnorm[lo:hi, None]], dim=1)
        elif plan.kind == "masked":
            feats = torch.cat([keys, keys * keys], dim=1)
        else:
            channels = arrays.values.shape[1]
            raw = keys + torch.from_numpy(centers[c]).to(dtype)
            pixels = torch.from_numpy(np.flatnonzero(~cls.padded_pixels))
            feats = raw.reshape(hi - lo, channels, -1)[:, :, pixels].permute(0, 2, 1)
        out[c] = ClassKeys(feats.contiguous(), arrays.values[lo:hi].contiguous(),
                           torch.arange(arrays.start + lo, arrays.start + hi))
    return out


def scan(keys: dict[int, ClassKeys], plan: ClassPlan, queries: QuerySet, stats: tuple[str, ...] = (),
         topk: int = 0, kernel: str = "auto") -> Partials:
    """Partials of every query over the rows behind ``keys`` (classes no query meets are skipped).

    ``kernel``: ``"auto"``, ``"torch"`` or ``"triton"`` for the matrix-product forms (:mod:`lemmse_ray.backends`).
    """
    first = next(iter(keys.values())).values
    total = Partials.empty(queries.n, queries.channels, stats, topk, first.dtype, first.device)
    for c, ck in keys.items():
        cq = queries.per_class[c]
        if cq is None:
            continue
        if plan.kind == "mixture":
            part = mixture_partials(cq.features, ck.features, ck.values, cq.shift, plan.keep_prob, queries.sigma,
                                    ck.row_ids, stats, topk)
        elif use_triton(kernel, ck.features, stats):
            part = fused_partials(cq.features, ck.features, ck.values, cq.shift, stats)
        else:
            part = matmul_partials(cq.features, ck.features, ck.values, cq.shift, ck.row_ids, stats, topk)
        merge_into(total, cq.index, part)
    return total
