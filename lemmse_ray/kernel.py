r"""Partial log-sum-exp statistics over blocks of bank rows, their exact merge, and finalisation.

For queries :math:`q_1..q_M` and a block of bank rows :math:`r` with logits :math:`s_{mr}` (log-densities)
and values :math:`v_r \in \mathbb R^C`, a *partial* holds, per query,

.. math::
    m = \max_r s_r,\quad l = \sum_r e^{s_r-m},\quad o = \sum_r e^{s_r-m} v_r

and optionally :math:`o_2 = \sum e^{s-m} v^2` (posterior variance), :math:`l_2 = \sum e^{2(s-m)}`
(effective number of patches), :math:`l_s = \sum e^{s-m} s` (entropy) and the top-k rows by logit.
Partials of disjoint blocks merge exactly and in any order (:func:`merge`); :func:`finalize` turns the
merged partial into the posterior mean :math:`o/l` and the statistics.

Logit forms (the caller prepares features, :mod:`lemmse_ray.queries`):

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
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from . import fused

STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")

BLOCK_Q = 1024
BLOCK_R = 1024
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


@dataclass
class Partials:
    """Per-query partial statistics (see module docstring). Optional fields are ``None`` when not requested."""

    m: torch.Tensor  # (M,)
    l: torch.Tensor  # (M,)
    o: torch.Tensor  # (M, C)
    o2: torch.Tensor | None = None  # (M, C)
    l2: torch.Tensor | None = None  # (M,)
    ls: torch.Tensor | None = None  # (M,)
    top_s: torch.Tensor | None = None  # (M, k) logits, descending
    top_r: torch.Tensor | None = None  # (M, k) int64 global row ids (-1: none)

    @staticmethod
    def empty(n: int, channels: int, stats: tuple[str, ...], topk: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> "Partials":
        """The identity of :func:`merge`: no rows seen (m = −inf, l = 0)."""
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return Partials(
            m=torch.full((n,), -math.inf, dtype=dtype, device=device), l=zeros(n), o=zeros(n, channels),
            o2=zeros(n, channels) if "variance" in stats else None,
            l2=zeros(n) if "ess" in stats else None,
            ls=zeros(n) if "entropy" in stats else None,
            top_s=torch.full((n, topk), -math.inf, dtype=dtype, device=device) if "topk" in stats else None,
            top_r=torch.full((n, topk), -1, dtype=torch.int64, device=device) if "topk" in stats else None,
        )

    def __len__(self) -> int:
        return self.m.shape[0]

    def select(self, index: torch.Tensor) -> "Partials":
        return Partials(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                           for f in fields(self)})

    def assign(self, index: torch.Tensor, other: "Partials") -> None:
        """In place: ``self[index] = other``."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if mine is not None:
                mine[index] = getattr(other, f.name)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Partials":
        """Copy to another float ``dtype`` and/or ``device`` (row ids stay int64)."""
        def move(name: str, t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device) if name == "top_r" or dtype is None else t.to(dtype=dtype, device=device)
        return Partials(**{f.name: (None if (t := getattr(self, f.name)) is None else move(f.name, t))
                           for f in fields(self)})


def _safe(m: torch.Tensor) -> torch.Tensor:
    """Reference point for rescaling: ``m`` where finite, 0 where no row was seen (−inf)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of each row of a block and their columns, ties at the k-th value going to the
    leftmost columns (``torch.topk`` breaks such ties arbitrarily).  Columns ascend with row ids, so with
    :func:`_merge_topk` the top-k is that of (logit descending, row id ascending) over all rows, whatever the
    blocks, shards or actors: rows with equal logits (duplicate patches) never make it depend on the split."""
    values, columns = torch.topk(s, k, dim=1)
    kth = values[:, -1:]
    above = (s > kth).sum(dim=1)
    rows = torch.nonzero(above + (s == kth).sum(dim=1) > k).flatten()  # more rows tie at the k-th value
    if len(rows):
        sub, kth_sub = s[rows], kth[rows]
        equal = sub == kth_sub
        keep = (sub > kth_sub) | (equal & (equal.cumsum(dim=1) <= (k - above[rows])[:, None]))
        picked = torch.nonzero(keep)[:, 1].reshape(len(rows), k)
        columns[rows] = picked
        values[rows] = sub.gather(1, picked)
    return values, columns


def _merge_topk(s1, r1, s2, r2, k):
    """Top-k of the union, logits descending; ties broken by the smaller row id (order-independent)."""
    s = torch.cat([s1, s2], dim=1)
    r = torch.cat([r1, r2], dim=1)
    order = torch.argsort(r, dim=1, stable=True)
    s, r = s.gather(1, order), r.gather(1, order)
    order = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), r.gather(1, order)


def merge(a: Partials, b: Partials) -> Partials:
    r"""Exact merge of partials over disjoint row sets: with :math:`m=\max(m_a,m_b)`,
    :math:`l = l_a e^{m_a-m} + l_b e^{m_b-m}`, likewise :math:`o, o_2, l_s`, and :math:`l_2` with squared factors."""
    m = torch.maximum(a.m, b.m)
    ref = _safe(m)
    fa, fb = torch.exp(a.m - ref), torch.exp(b.m - ref)
    out = Partials(m=m, l=fa * a.l + fb * b.l, o=fa[:, None] * a.o + fb[:, None] * b.o)
    if a.o2 is not None:
        out.o2 = fa[:, None] * a.o2 + fb[:, None] * b.o2
    if a.l2 is not None:
        out.l2 = fa * fa * a.l2 + fb * fb * b.l2
    if a.ls is not None:
        out.ls = fa * a.ls + fb * b.ls
    if a.top_s is not None:
        out.top_s, out.top_r = _merge_topk(a.top_s, a.top_r, b.top_s, b.top_r, a.top_s.shape[1])
    return out


def merge_into(total: Partials, index: torch.Tensor, part: Partials) -> None:
    """In place: ``total[index] = merge(total[index], part)``."""
    total.assign(index, merge(total.select(index), part))


EPILOGUES = ("auto", "compiled", "torch")


def compiled_epilogue(epilogue: str, values: torch.Tensor):
    """The compiled library of :mod:`lemmse_ray.fused` if ``epilogue`` asks for it and it applies (float32 on
    CPU), else None (the pure-torch epilogue)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue == "torch":
        return None
    lib = fused.load() if values.dtype == torch.float32 and values.device.type == "cpu" else None
    if lib is None and epilogue == "compiled":
        raise ValueError("epilogue='compiled' needs float32 on CPU and a working C compiler "
                         "(see lemmse_ray.fused)")
    return lib


def _reduce(logits: Callable[[int, int], torch.Tensor], n_rows: int, values: torch.Tensor,
            row_ids: torch.Tensor | None, n_queries: int, stats: tuple[str, ...], topk: int,
            block_r: int, epilogue: str = "auto") -> Partials:
    r"""Online reduction over row blocks for one query block.

    ``logits(r0, r1)`` returns a writable (Mq, r1−r0) block of logits *in base 2* (:math:`s\log_2 e`):
    ``exp2`` is several times faster than ``exp`` on CPUs, and the statistics are the same numbers
    (:math:`2^{s_2-m_2} = e^{s-m}`); ``m``, ``l_s`` and the top-k logits are converted back at the end.
    ``epilogue``: ``"auto"`` (the fused compiled epilogue of :mod:`lemmse_ray.fused` for float32 on CPU when
    it builds, else pure torch), ``"compiled"`` (required) or ``"torch"``.
    """
    lib = compiled_epilogue(epilogue, values)
    dtype = values.dtype
    channels = values.shape[1]
    want_var, want_l2, want_ls = "variance" in stats, "ess" in stats, "entropy" in stats
    device = values.device
    part = Partials.empty(n_queries, channels, stats, topk, dtype, device)
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
            ts, ti = _block_topk(s, min(topk, r1 - r0))
            tr = row_ids[r0:r1][ti] if row_ids is not None else ti + r0
            part.top_s, part.top_r = _merge_topk(part.top_s, part.top_r, ts, tr, topk)
        if lib is not None:
            fused.epilogue(lib, s, values_t[:, r0:r1], m, acc, want_var, part.l2, part.ls)
            continue
        m_new = torch.maximum(m, s.amax(dim=1))
        ref = _safe(m_new)
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


def _add_shift(part: Partials, shift: torch.Tensor) -> Partials:
    """Add a per-query constant to every logit of a partial (only m, l_s and the top-k logits move)."""
    out = replace(part, m=part.m + shift)
    if part.ls is not None:
        out.ls = part.ls + shift * part.l
    if part.top_s is not None:
        out.top_s = part.top_s + shift[:, None]
    return out


def _by_query_blocks(n_queries: int, block_q: int, run: Callable[[int, int], Partials]) -> Partials:
    parts = [run(q0, min(n_queries, q0 + block_q)) for q0 in range(0, n_queries, block_q)]
    if len(parts) == 1:
        return parts[0]
    return Partials(**{f.name: (None if getattr(parts[0], f.name) is None
                                else torch.cat([getattr(p, f.name) for p in parts]))
                       for f in fields(parts[0])})


def matmul_partials(q_feat: torch.Tensor, k_feat: torch.Tensor, values: torch.Tensor, shift: torch.Tensor,
                    row_ids: torch.Tensor | None = None, stats: tuple[str, ...] = (), topk: int = 0,
                    block_q: int = BLOCK_Q, block_r: int = BLOCK_R, epilogue: str = "auto") -> Partials:
    """Partials for logits :math:`s = Q_f K_f^\\top + \\text{shift}` (shapes (M, F), (R, F), (R, C), (M,))."""
    n_rows = k_feat.shape[0]
    buffer = torch.empty((block_q, block_r), dtype=q_feat.dtype, device=q_feat.device)

    def run(q0: int, q1: int) -> Partials:
        q = q_feat[q0:q1] * LOG2E

        def logits(r0: int, r1: int) -> torch.Tensor:
            out = buffer[: q1 - q0, : r1 - r0]
            if out.is_contiguous():
                return torch.mm(q, k_feat[r0:r1].T, out=out)
            return torch.mm(q, k_feat[r0:r1].T)

        return _add_shift(_reduce(logits, n_rows, values, row_ids, q1 - q0, stats, topk, block_r, epilogue),
                          shift[q0:q1])

    return _by_query_blocks(q_feat.shape[0], block_q, run)


def mixture_partials(q_pix: torch.Tensor, k_pix: torch.Tensor, values: torch.Tensor, shift: torch.Tensor,
                     keep_prob: float, sigma: float, row_ids: torch.Tensor | None = None,
                     stats: tuple[str, ...] = (), topk: int = 0, block_q: int = 64,
                     block_r: int = 2048, epilogue: str = "auto") -> Partials:
    """Partials for the per-pixel mixture logits (random-mask agnostic inpainting).

    ``q_pix`` (M, A, C) query pixels and ``k_pix`` (R, A, C) key pixels over the A non-padded pixels.
    """
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

        return _add_shift(_reduce(logits, n_rows, values, row_ids, q1 - q0, stats, topk, block_r, epilogue),
                          shift[q0:q1])

    return _by_query_blocks(q_pix.shape[0], block_q, run)


def finalize(part: Partials, n_rows_total: int) -> dict[str, torch.Tensor]:
    r"""Posterior mean and statistics from a merged partial.

    mean :math:`=o/l`; variance :math:`=o_2/l-\text{mean}^2`; ess :math:`=l^2/l_2`; max_weight
    :math:`=1/l` (the largest term is :math:`e^{m-m}=1`); entropy :math:`=m+\log l-l_s/l`; log_evidence
    :math:`=m+\log l-\log N_\text{rows}` (the log-density of the query under the patch distribution,
    uniform over the ``n_rows_total`` bank rows); top-k logits and row ids.
    """
    if bool((part.l <= 0).any()):
        raise ValueError("some queries met no bank rows (their class is absent from the bank)")
    out = {"mean": part.o / part.l[:, None]}
    if not bool(torch.isfinite(out["mean"]).all()):
        raise ValueError("sigma: the estimate is not finite: the logits overflowed the arithmetic's range "
                         "(use dtype float64, or a larger sigma)")
    if part.o2 is not None:
        out["variance"] = torch.clamp(part.o2 / part.l[:, None] - out["mean"] ** 2, min=0)
    if part.l2 is not None:
        out["ess"] = part.l * part.l / part.l2
    out["max_weight"] = 1.0 / part.l
    log_z = part.m + torch.log(part.l)
    if part.ls is not None:
        out["entropy"] = log_z - part.ls / part.l
    out["log_evidence"] = log_z - math.log(n_rows_total)
    if part.top_s is not None:
        out["topk_logits"] = part.top_s
        out["topk_rows"] = part.top_r
    return out
