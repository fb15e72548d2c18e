r"""The torch kernels: partials of a query block over blocks of bank rows, by an online log-sum-exp.

Logit forms (the caller prepares features, :mod:`lemmse_ray.bank.features`):

* **matrix product** (:func:`matmul_partials`): :math:`s = Q_f K_f^\top + \text{shift}` — whitened
  isotropic kernel, :math:`s = -\lVert \tilde q-\tilde k\rVert^2/2\sigma^2 + b` with
  :math:`Q_f=[\tilde q/\sigma^2, -1/\sigma^2]`, :math:`K_f=[\tilde k, \tfrac12\lVert\tilde k\rVert^2]`;
  and the random-mask aware kernel of width 2d, :math:`Q_f=[m\odot p, -\tfrac12 m]/\sigma^2`,
  :math:`K_f=[\mu, \mu\odot\mu]`.
* **per-pixel mixture** (:func:`mixture_partials`): :math:`s = \text{shift} + \sum_a
  \operatorname{softplus}(\operatorname{logit} q + (p_a\cdot\mu_a - \tfrac12\lVert\mu_a\rVert^2)/\sigma^2)`,
  the exact log of :math:`\prod_a [qN(p_a;\mu_a,\sigma^2I)+(1-q)N(p_a;0,\sigma^2I)]` up to the shift.

Both are chunked over queries and rows, so memory is bounded by ``block_q × block_r`` whatever the sizes.
No reduced-precision arithmetic is used: float32 (default) or float64 throughout.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.partials import (
    LN2,
    LOG2E,
    Partials,
    add_shift,
    block_topk,
    merge_topk,
    safe_reference,
)
from ..core.statistics import sums_of
from . import epilogue as fused
from .resolver import epilogue_library

BLOCK_Q = 1024
BLOCK_R = 1024


def _reduce(logits: Callable[[int, int], torch.Tensor], n_rows: int, values: torch.Tensor,
            row_ids: torch.Tensor | None, n_queries: int, stats: tuple[str, ...], topk: int,
            block_r: int, epilogue: str = "auto") -> Partials:
    r"""Online reduction over row blocks for one query block.

    ``logits(r0, r1)`` returns a writable (Mq, r1−r0) block of logits *in base 2* (:math:`s\log_2 e`):
    ``exp2`` is several times faster than ``exp`` on CPUs, and the statistics are the same numbers
    (:math:`2^{s_2-m_2} = e^{s-m}`); ``m``, ``l_s`` and the top-k logits are converted back at the end.
    ``epilogue``: ``"auto"``, ``"compiled"`` or ``"torch"``, as decided by
    :func:`lemmse_ray.kernels.resolver.epilogue_library` (the fused compiled epilogue of
    :mod:`lemmse_ray.kernels.epilogue` for float32 on the CPU where it builds, else pure torch).
    """
    lib = epilogue_library(epilogue, values.dtype, values.device)
    dtype = values.dtype
    channels = values.shape[1]
    sums = sums_of(stats)
    want_var, want_l2, want_ls = "o2" in sums, "l2" in sums, "ls" in sums
    device = values.device
    part = Partials.empty(n_queries, channels, sums, topk, dtype, device)
    acc = torch.zeros((n_queries, 2 * channels + 1 if want_var else channels + 1), dtype=dtype, device=device)
    if lib is not None:
        values_t = values.T.contiguous()
    else:  # values, ones and squared values as one column-major (R, w) operand: e @ [v, 1, v²] gives o, l, o2
        columns = [values.T, torch.ones((1, n_rows), dtype=dtype, device=device)] + ([values.T * values.T] if want_var else [])
        aug = torch.cat(columns, dim=0).contiguous()
    m = part.m
    for r0 in range(0, n_rows, block_r):
        r1 = min(n_rows, r0 + block_r)
        s = logits(r0, r1)
        if part.top_s is not None:
            # only queries whose block maximum reaches their current k-th logit can change their top-k (ties
            # included, so the result is the same as merging every block): after the first blocks, few do
            live = torch.nonzero(s.amax(dim=1) >= part.top_s[:, -1]).flatten()
            if len(live):
                ts, ti = block_topk(s[live], min(topk, r1 - r0))
                tr = row_ids[r0:r1][ti] if row_ids is not None else ti + r0
                part.top_s[live], part.top_r[live] = merge_topk(part.top_s[live], part.top_r[live], ts, tr, topk)
        if lib is not None:
            fused.epilogue(lib, s, values_t[:, r0:r1], m, acc, want_var, part.l2, part.ls)
            continue
        m_new = torch.maximum(m, s.amax(dim=1))
        ref = safe_reference(m_new)
        alpha = torch.exp2(m - ref)
        s.sub_(ref[:, None])
        if want_ls:
            shifted = s.clone()
        s.exp2_()
        block = torch.mm(s, aug[:, r0:r1].T)
        acc.mul_(alpha[:, None]).add_(block)
        if want_l2:
            part.l2.mul_(alpha * alpha).add_((s * s).sum(dim=1))
        if want_ls:
            part.ls.mul_(alpha).add_((s * shifted).sum(dim=1) + ref * block[:, channels])
        m = m_new
    part.m = m * LN2
    if want_ls:
        part.ls = part.ls * LN2
    if part.top_s is not None:
        part.top_s = part.top_s * LN2
    part.o = acc[:, :channels].clone()
    part.l = acc[:, channels].clone()
    if want_var:
        part.o2 = acc[:, channels + 1:].clone()
    return part


def _by_query_blocks(n_queries: int, block_q: int, run: Callable[[int, int], Partials]) -> Partials:
    parts = [run(q0, min(n_queries, q0 + block_q)) for q0 in range(0, n_queries, block_q)]
    if len(parts) == 1:
        return parts[0]
    return Partials(**{f.name: (None if getattr(parts[0], f.name) is None
                                else torch.cat([getattr(p, f.name) for p in parts]))
                       for f in fields(parts[0])})


def check_operands(q_name: str, q: torch.Tensor, k_name: str, k: torch.Tensor, values: torch.Tensor,
                   shift: torch.Tensor, row_ids: torch.Tensor | None, ndim: int) -> None:
    """Refuse (ValueError naming the argument) operands of :func:`matmul_partials` (``ndim`` 2) or
    :func:`mixture_partials` (``ndim`` 3) that do not agree, before any block reaches the compiled epilogue,
    which reads as many values per channel as there are key rows (fewer value rows than key rows read past the
    buffer) and reads every operand in the dtype of the logits: one dtype (float32 or float64) and one device,
    queries (M, …) and keys (R, …) with the same trailing sizes, ``values`` (R, C), ``shift`` (M,),
    ``row_ids`` (R,)."""
    named = {q_name: q, k_name: k, "values": values, "shift": shift, "row_ids": row_ids}
    for name, t in named.items():
        if t is None and name == "row_ids":
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, {q_name} on {q.device}")
        if name != "row_ids" and t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype}, {q_name} {q.dtype}: the operands share one dtype")
    if q.dtype not in (torch.float32, torch.float64) or q.ndim != ndim:
        raise ValueError(f"{q_name} must be a {ndim}-D float32 or float64 tensor, got {q.dtype} {tuple(q.shape)}")
    if k.ndim != ndim or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"{k_name} must have the trailing sizes {tuple(q.shape[1:])} of {q_name}, "
                         f"got {tuple(k.shape)}")
    rows = k.shape[0]
    if values.ndim != 2 or values.shape[0] != rows:
        raise ValueError(f"values must have one row per row of {k_name} ({rows}), got {tuple(values.shape)}")
    if tuple(shift.shape) != (q.shape[0],):
        raise ValueError(f"shift must have one value per row of {q_name} ({q.shape[0]}), got {tuple(shift.shape)}")
    if row_ids is not None and tuple(row_ids.shape) != (rows,):
        raise ValueError(f"row_ids must have one id per row of {k_name} ({rows}), got {tuple(row_ids.shape)}")


def matmul_partials(q_feat: torch.Tensor, k_feat: torch.Tensor, values: torch.Tensor, shift: torch.Tensor,
                    row_ids: torch.Tensor | None = None, stats: tuple[str, ...] = (), topk: int = 0,
                    block_q: int = BLOCK_Q, block_r: int = BLOCK_R, epilogue: str = "auto") -> Partials:
    """Partials for logits :math:`s = Q_f K_f^\\top + \\text{shift}` (shapes (M, F), (R, F), (R, C), (M,);
    refused otherwise, :func:`check_operands`)."""
    check_operands("q_feat", q_feat, "k_feat", k_feat, values, shift, row_ids, 2)
    n_rows = k_feat.shape[0]
    buffer = torch.empty((block_q, block_r), dtype=q_feat.dtype, device=q_feat.device)

    def run(q0: int, q1: int) -> Partials:
        q = q_feat[q0:q1] * LOG2E

        def logits(r0: int, r1: int) -> torch.Tensor:
            out = buffer[: q1 - q0, : r1 - r0]
            if out.is_contiguous():
                return torch.mm(q, k_feat[r0:r1].T, out=out)
            return torch.mm(q, k_feat[r0:r1].T)

        return add_shift(_reduce(logits, n_rows, values, row_ids, q1 - q0, stats, topk, block_r, epilogue),
                          shift[q0:q1])

    return _by_query_blocks(q_feat.shape[0], block_q, run)


def mixture_partials(q_pix: torch.Tensor, k_pix: torch.Tensor, values: torch.Tensor, shift: torch.Tensor,
                     keep_prob: float, sigma: float, row_ids: torch.Tensor | None = None,
                     stats: tuple[str, ...] = (), topk: int = 0, block_q: int = 64,
                     block_r: int = 2048, epilogue: str = "auto") -> Partials:
    """Partials for the per-pixel mixture logits (random-mask agnostic inpainting).

    ``q_pix`` (M, A, C) query pixels and ``k_pix`` (R, A, C) key pixels over the A non-padded pixels (refused
    otherwise, :func:`check_operands`).
    """
    check_operands("q_pix", q_pix, "k_pix", k_pix, values, shift, row_ids, 3)
    n_rows, pixels, _ = k_pix.shape
    logit_q = math.log(keep_prob) - math.log1p(-keep_prob)
    inv = 1.0 / sigma ** 2
    # per pixel: K_a^T (C, R) and the row term logit q − |μ_a|²/2σ²
    k_t = k_pix.permute(1, 2, 0).contiguous()  # (A, C, R)
    k_bias = logit_q - 0.5 * inv * (k_pix * k_pix).sum(dim=2).T.contiguous()  # (A, R)

    def run(q0: int, q1: int) -> Partials:
        q = q_pix[q0:q1] * inv  # (Mq, A, C)

        def logits(r0: int, r1: int) -> torch.Tensor:
            s = torch.zeros((q1 - q0, r1 - r0), dtype=q_pix.dtype, device=q_pix.device)
            for a in range(pixels):
                t = torch.addmm(k_bias[a, r0:r1][None, :], q[:, a], k_t[a][:, r0:r1])
                s.add_(F.softplus(t))
            return s.mul_(LOG2E)

        return add_shift(_reduce(logits, n_rows, values, row_ids, q1 - q0, stats, topk, block_r, epilogue),
                          shift[q0:q1])

    return _by_query_blocks(q_pix.shape[0], block_q, run)
