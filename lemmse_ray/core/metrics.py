r"""Image-quality metrics (deepinv conventions: per image, data range 1)."""
from __future__ import annotations

import torch


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image of (B, C, H, W) tensors → (B,)."""
    return ((a.to(torch.float64) - b.to(torch.float64)) ** 2).flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    r""":math:`\mathrm{PSNR} = 10\log_{10}(\text{range}^2/\mathrm{MSE})` per image → (B,) (inf if identical)."""
    return 10.0 * torch.log10(data_range ** 2 / mse(a, b))
