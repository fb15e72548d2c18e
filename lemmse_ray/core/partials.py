r"""Partial log-sum-exp statistics of disjoint blocks of bank rows and their exact merge.

For queries :math:`q_1..q_M` and a block of bank rows :math:`r` with logits :math:`s_{mr}` (log-densities)
and values :math:`v_r \in \mathbb R^C`, a *partial* holds, per query,

.. math::
    m = \max_r s_r,\quad l = \sum_r e^{s_r-m},\quad o = \sum_r e^{s_r-m} v_r

and optionally the sums :math:`o_2 = \sum e^{s-m} v^2`, :math:`l_2 = \sum e^{2(s-m)}`,
:math:`l_s = \sum e^{s-m} s` and the top-k rows by logit (``top_s``, ``top_r``): :data:`SUMS`, by field name.
Partials of disjoint blocks merge exactly and in any order (:func:`merge`);
:func:`lemmse_ray.core.statistics.finalize` turns the merged partial into the posterior mean and the statistics
(:data:`lemmse_ray.core.statistics.STATISTICS` says which sums each one needs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

LOG2E = 1.0 / math.log(2.0)


LN2 = math.log(2.0)

#: The optional sums that :func:`merge` rescales to the common reference :math:`m=\max(m_a, m_b)`, each with the
#: power :math:`p` of the factor :math:`e^{m_b-m}` it takes: :math:`o_2` and :math:`l_s` are sums of
#: :math:`e^{s-m}(\cdot)` (:math:`p=1`), :math:`l_2` a sum of :math:`e^{2(s-m)}` (:math:`p=2`).
RESCALED = {"o2": 1, "l2": 2, "ls": 1}
#: The top-k logits (descending) and global row ids (−1: none), kept and merged together by :func:`merge_topk`.
TOPK = ("top_s", "top_r")
#: Every optional sum of :class:`Partials`, by field name.
SUMS = (*RESCALED, *TOPK)


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
    def empty(n: int, channels: int, sums: tuple[str, ...], topk: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> "Partials":
        """The identity of :func:`merge`: no rows seen (m = −inf, l = 0), with the optional ``sums`` (names of
        :data:`SUMS`; :func:`lemmse_ray.core.statistics.sums_of` gives those of a set of statistics)."""
        check_sums(sums)
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return Partials(
            m=torch.full((n,), -math.inf, dtype=dtype, device=device), l=zeros(n), o=zeros(n, channels),
            o2=zeros(n, channels) if "o2" in sums else None,
            l2=zeros(n) if "l2" in sums else None,
            ls=zeros(n) if "ls" in sums else None,
            top_s=torch.full((n, topk), -math.inf, dtype=dtype, device=device) if "top_s" in sums else None,
            top_r=torch.full((n, topk), -1, dtype=torch.int64, device=device) if "top_r" in sums else None,
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


def check_sums(sums: tuple[str, ...]) -> tuple[str, ...]:
    """``sums`` if they name optional sums of :class:`Partials` (the top-k logits and row ids together)."""
    unknown = [name for name in sums if name not in SUMS]
    if unknown:
        raise ValueError(f"sums: unknown partial sums {unknown}; choose from {SUMS}")
    if len(set(sums) & set(TOPK)) == 1:
        raise ValueError(f"sums: the top-k sums {TOPK} go together, got {tuple(sums)}")
    return sums


def safe_reference(m: torch.Tensor) -> torch.Tensor:
    """Reference point for rescaling: ``m`` where finite, 0 where no row was seen (−inf)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of each row of a block and their columns, ties at the k-th value going to the
    leftmost columns (``torch.topk`` breaks such ties arbitrarily).  Columns ascend with row ids, so with
    :func:`merge_topk` the top-k is that of (logit descending, row id ascending) over all rows, whatever the
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


def merge_topk(s1, r1, s2, r2, k):
    """Top-k of the union, logits descending; ties broken by the smaller row id (order-independent)."""
    s = torch.cat([s1, s2], dim=1)
    r = torch.cat([r1, r2], dim=1)
    order = torch.argsort(r, dim=1, stable=True)
    s, r = s.gather(1, order), r.gather(1, order)
    order = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), r.gather(1, order)


def merge(a: Partials, b: Partials) -> Partials:
    r"""Exact merge of partials over disjoint row sets: with :math:`m=\max(m_a,m_b)`,
    :math:`l = l_a e^{m_a-m} + l_b e^{m_b-m}`, likewise :math:`o`, and each sum of :data:`RESCALED` present with
    the factors raised to its power; the top-k by :func:`merge_topk`."""
    m = torch.maximum(a.m, b.m)
    ref = safe_reference(m)
    fa, fb = torch.exp(a.m - ref), torch.exp(b.m - ref)
    out = Partials(m=m, l=fa * a.l + fb * b.l, o=fa[:, None] * a.o + fb[:, None] * b.o)
    for name, power in RESCALED.items():
        sum_a, sum_b = getattr(a, name), getattr(b, name)
        if sum_a is not None:
            ga, gb = (fa, fb) if power == 1 else (fa * fa, fb * fb)
            if sum_a.dim() == 2:  # per channel
                ga, gb = ga[:, None], gb[:, None]
            setattr(out, name, ga * sum_a + gb * sum_b)
    if a.top_s is not None:
        out.top_s, out.top_r = merge_topk(a.top_s, a.top_r, b.top_s, b.top_r, a.top_s.shape[1])
    return out


def merge_into(total: Partials, index: torch.Tensor, part: Partials) -> None:
    """In place: ``total[index] = merge(total[index], part)``."""
    total.assign(index, merge(total.select(index), part))


def add_shift(part: Partials, shift: torch.Tensor) -> Partials:
    """Add a per-query constant to every logit of a partial (only m, l_s and the top-k logits move)."""
    out = replace(part, m=part.m + shift)
    if part.ls is not None:
        out.ls = part.ls + shift * part.l
    if part.top_s is not None:
        out.top_s = part.top_s + shift[:, None]
    return out
