r"""The in-memory LE-MMSE estimator.

.. math:: g^*(p) = \sum_{i,j} w_{ij}(p)\, x_i[:, j], \qquad
          w_{ij}(p) = \operatorname{softmax}_{ij}\bigl(\log N(p;\ \Pi_j BAx_i,\ \sigma^2 S_j)\bigr)

evaluated at every pixel of every estimator input: the best estimator, under the empirical training
distribution, among all functions applied identically to every :math:`P\times P` patch of ``z`` (every CNN
with receptive field ``P`` and the same boundary rule); see ``docs/theory.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .backends import check_kernel, check_triton_runs
from .bank import class_centers, class_offsets, memory_bank
from .classes import ClassPlan, plan_classes
from .kernel import STATS, Partials, finalize
from .patches import PatchGeometry
from .problems import Problem
from .queries import key_features, prepare_queries, scan
from .validation import as_images, check_noise_level, check_query_mask

DTYPES = (torch.float32, torch.float64)


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


def check_inputs(train, z, problem: Problem, mask, patch_size: int, padding: str, candidates: str):
    """Validate and convert the inputs; return (train, z, mask, geometry) with float64 tensors."""
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a lemmse_ray problem (Denoising, Inpainting, ...), got {type(problem).__name__}")
    train = as_images(train, "train")
    z = as_images(z, "z", check_range=False)
    if train.shape[1] != z.shape[1]:
        raise ValueError(f"z has {z.shape[1]} channels but train has {train.shape[1]}")
    if train.shape[2:] != z.shape[2:]:
        raise ValueError(f"z has spatial shape {tuple(z.shape[2:])} but train has {tuple(train.shape[2:])}")
    shape = tuple(train.shape[1:])
    problem.check_shape(shape)
    geometry = PatchGeometry(shape, patch_size, padding, candidates)
    return train, z, check_query_mask(mask, problem, z), geometry


def scan_in_memory(train: torch.Tensor, z: torch.Tensor, mask, problem: Problem, plan: ClassPlan, sigma: float,
                   stats: tuple[str, ...], topk: int, dtype: torch.dtype,
                   kernel: str = "auto") -> tuple[Partials, torch.Tensor, int]:
    """Build the bank of ``train`` in memory and return (merged partials, row sources, number of rows)."""
    centers = class_centers(train, problem, plan)
    arrays = memory_bank(train, problem, plan, centers).to(dtype)
    queries = prepare_queries(z, mask, problem, plan, centers, sigma, dtype)
    part = scan(key_features(arrays, plan, centers), plan, queries, stats, topk, kernel)
    return part, arrays.source, int(class_offsets(plan, train.shape[0])[-1])


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


def estimate(train, z, problem: Problem, sigma: float, patch_size: int = 5, padding: str = "zeros",
             candidates: str = "all", mask=None, stats=("variance", "ess"), topk: int = 5,
             dtype: torch.dtype = torch.float32, kernel: str = "auto") -> Result:
    """Exact LE-MMSE estimate of the clean images behind estimator inputs ``z``.

    Args:
        train: (N, C, H, W) training images (numpy or torch), values in [0, 1]; the prior is uniform on them.
        z: (B, C, H, W) estimator inputs, e.g. ``problem.measure(x, sigma, generator)[1]``.
        problem: :class:`~lemmse_ray.Denoising`, :class:`~lemmse_ray.Inpainting`,
            :class:`~lemmse_ray.Deblurring` or a :class:`~lemmse_ray.LinearInverseProblem`.
        sigma: noise level σ > 0 of the measurement.
        patch_size: odd receptive field P (1 ≤ P ≤ 2·min(H, W) − 1).
        padding: boundary rule, ``"zeros"`` or ``"circular"``.
        candidates: bank positions, ``"all"`` or ``"interior"`` (circular padding only).
        mask: (B, 1, H, W) or (B, H, W) per-image masks, for random-mask inpainting only.
        stats: any of ``"variance"``, ``"ess"``, ``"max_weight"``, ``"entropy"``, ``"log_evidence"``, ``"topk"``.
        topk: number of most-weighted training patches reported with ``"topk"``.
        dtype: ``torch.float32`` (default) or ``torch.float64`` for the kernel arithmetic (the class
            whitening is always computed in float64).
        kernel: ``"auto"`` (default), ``"torch"`` or ``"triton"``: the kernel of the matrix-product logit
            forms (:mod:`lemmse_ray.backends`).  This API computes on the CPU, where ``"auto"`` is torch and
            ``"triton"`` runs only in Triton's interpreter (``TRITON_INTERPRET=1``, for tests).

    Returns:
        :class:`Result` with ``mean`` (B, C, H, W) and the requested statistics.
    """
    stats = check_stats(stats, topk)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sigma = check_noise_level(sigma, dtype)
    if check_kernel(kernel, dtype) == "triton":
        check_triton_runs("cpu")
    train, z, mask, geometry = check_inputs(train, z, problem, mask, patch_size, padding, candidates)
    plan = plan_classes(problem, geometry)
    part, source, n_rows = scan_in_memory(train, z, mask, problem, plan, sigma, stats, topk, dtype, kernel)
    res = to_result(finalize(part, n_rows), source, tuple(z.shape), stats)
    res.info = {"n_rows": n_rows, "n_classes": plan.n_classes, "kind": plan.kind}
    return res
