r"""The statistics of an estimate: which exist, how a merged partial turns into them, and their image grids.

:func:`finalize` turns a merged :class:`~lemmse_ray.core.partials.Partials` into the posterior mean
:math:`o/l` and the statistics; :func:`to_result` lays them on the query images' pixel grid as a
:class:`Result`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .partials import Partials

STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")


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



@dataclass
class Result:
    """Estimate and statistics, each on the query images' pixel grid.

    ``mean``/``variance``: (B, C, H, W); ``ess``, ``max_weight``, ``entropy``, ``log_evidence``: (B, H, W);
    ``topk_image``, ``topk_position`` (row·W + col), ``topk_logits``: (B, H, W, k).  Statistics that were
    not requested are ``None``.
    """

    mean: torch.Tensor
    variance: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    max_weight: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_evidence: torch.Tensor | None = None
    topk_image: torch.Tensor | None = None
    topk_position: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def check_stats(stats, topk: int) -> tuple[str, ...]:
    stats = tuple(stats or ())
    for name in stats:
        if name not in STATS:
            raise ValueError(f"stats: unknown statistic {name!r}; choose from {STATS}")
    if "topk" in stats and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    return stats


def to_result(stats_out: dict[str, torch.Tensor], source: torch.Tensor, shape: tuple[int, ...],
              stats: tuple[str, ...]) -> Result:
    """Reshape finalized statistics (per query) to image grids."""
    batch, channels, height, width = shape
    grid = lambda t: t.reshape(batch, height, width, *t.shape[1:])  # noqa: E731
    res = Result(mean=grid(stats_out["mean"]).permute(0, 3, 1, 2).contiguous())
    if "variance" in stats:
        res.variance = grid(stats_out["variance"]).permute(0, 3, 1, 2).contiguous()
    for name in ("ess", "max_weight", "entropy", "log_evidence"):
        if name in stats:
            setattr(res, name, grid(stats_out[name]))
    if "topk" in stats:
        rows = stats_out["topk_rows"]
        found = rows >= 0
        src = source[rows.clamp(min=0)]
        res.topk_image = grid(torch.where(found, src[..., 0], -1))
        res.topk_position = grid(torch.where(found, src[..., 1], -1))
        res.topk_logits = grid(stats_out["topk_logits"])
    return res
