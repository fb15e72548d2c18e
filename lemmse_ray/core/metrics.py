r"""Image-quality metrics (deepinv conventions: per image, data range 1) and their pooling.

Per image, :math:`\mathrm{MSE}(a, b) = \frac1{CHW}\sum (a-b)^2` and
:math:`\mathrm{PSNR} = 10\log_{10}(\text{range}^2/\mathrm{MSE})`.  A set of :math:`B` images is summarised by
the **PSNR of the pooled MSE**, :math:`10\log_{10}(\text{range}^2/\overline{\mathrm{MSE}})` with
:math:`\overline{\mathrm{MSE}} = \frac1B\sum_b \mathrm{MSE}_b`: the mean of per-image PSNRs is a mean of
logarithms, which one near-copy (MSE → 0, PSNR → ∞) dominates.  Every PSNR reported by :func:`capped_psnr` and
:func:`pooled_psnr` is capped at :data:`PSNR_CAP` (an exact copy would be ``inf``), and :func:`psnr_summary`
counts the images at the cap.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: the largest PSNR reported (dB): an MSE below range² · 10^(−PSNR_CAP/10) is shown as PSNR_CAP
PSNR_CAP = 100.0


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image of (B, C, H, W) tensors → (B,)."""
    return ((a.to(torch.float64) - b.to(torch.float64)) ** 2).flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    r""":math:`\mathrm{PSNR} = 10\log_{10}(\text{range}^2/\mathrm{MSE})` per image → (B,) (inf if identical;
    :func:`capped_psnr` is the reported form)."""
    return 10.0 * torch.log10(data_range ** 2 / mse(a, b))


def psnr_of_mse(values: Any, data_range: float = 1.0, cap: float = PSNR_CAP) -> np.ndarray:
    r""":math:`10\log_{10}(\text{range}^2 / \max(\mathrm{MSE}, \text{range}^2\,10^{-\text{cap}/10}))`, float64,
    elementwise: at most ``cap`` dB, never inf.  ``values``: MSEs ≥ 0 (any shape)."""
    mses = np.asarray(values, dtype=np.float64)
    if mses.size and not (np.isfinite(mses).all() and (mses >= 0).all()):
        raise ValueError("values: MSEs must be finite and ≥ 0")
    if not (data_range > 0 and math.isfinite(cap)):
        raise ValueError(f"data_range must be > 0 and cap finite, got {data_range!r} and {cap!r}")
    floor = data_range ** 2 * 10.0 ** (-cap / 10.0)
    return 10.0 * np.log10(data_range ** 2 / np.maximum(mses, floor))


def capped_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, cap: float = PSNR_CAP) -> np.ndarray:
    """Per-image PSNR of (B, C, H, W) tensors, capped at ``cap`` dB (:func:`psnr_of_mse`) → (B,) float64."""
    return psnr_of_mse(mse(a, b).numpy(), data_range, cap)


def pooled_psnr(values: Any, data_range: float = 1.0, cap: float = PSNR_CAP) -> float:
    r"""PSNR of the mean of the per-image MSEs ``values`` (B,), capped: :math:`10\log_{10}(\text{range}^2/
    \overline{\mathrm{MSE}})`."""
    mses = np.asarray(values, dtype=np.float64).ravel()
    if mses.size == 0:
        raise ValueError("values: at least one MSE is needed")
    return float(psnr_of_mse(mses.mean(), data_range, cap))


def psnr_summary(values: Any, data_range: float = 1.0, cap: float = PSNR_CAP) -> dict[str, float]:
    r"""The PSNR statistics of a set of per-image MSEs ``values`` (B,):

    * ``psnr`` -- :func:`pooled_psnr` (the headline);
    * ``se`` -- its standard error by the delta method,
      :math:`\frac{10}{\ln 10}\,\operatorname{se}(\overline{\mathrm{MSE}})/\overline{\mathrm{MSE}}` with
      :math:`\operatorname{se} = \operatorname{sd}/\sqrt B` (NaN for B < 2 or a zero mean);
    * ``mean``, ``median`` -- of the per-image capped PSNRs (:func:`psnr_of_mse`);
    * ``capped`` -- the number of images at the cap; ``n`` -- B.
    """
    mses = np.asarray(values, dtype=np.float64).ravel()
    per_image = psnr_of_mse(mses, data_range, cap)
    pooled = pooled_psnr(mses, data_range, cap)
    mean = float(mses.mean())
    se = (10.0 / math.log(10.0) * float(mses.std(ddof=1)) / math.sqrt(len(mses)) / mean
          if len(mses) > 1 and mean > 0 else math.nan)
    return {"psnr": pooled, "se": se, "mean": float(per_image.mean()), "median": float(np.median(per_image)),
            "capped": int((per_image >= cap).sum()), "n": len(mses)}
