"""Boundary checks shared by the public entry points.

Every check raises :class:`ValueError` whose message starts with the name of the offending parameter, so a
researcher reading a traceback knows which argument to fix.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

PADDINGS = ("zeros", "circular")
CANDIDATES = ("all", "interior")


def check_sigma(sigma: Any, name: str = "sigma") -> float:
    """Return ``sigma`` as a float, requiring a finite value > 0."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {sigma!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")
    return value


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_patch_size(patch_size: Any, height: int, width: int) -> int:
    """``P`` must be odd with ``1 <= P <= 2·min(H, W) − 1`` (a patch never covers a pixel from both sides)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)):
        raise ValueError(f"patch_size must be an odd integer, got {patch_size!r}")
    p = int(patch_size)
    if p < 1 or p % 2 == 0:
        raise ValueError(f"patch_size must be odd and >= 1, got {p}")
    limit = 2 * min(height, width) - 1
    if p > limit:
        raise ValueError(f"patch_size={p} exceeds 2·min(H, W) − 1 = {limit} for images of size {height}×{width}")
    return p


def as_images(data: Any, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Convert numpy/torch data to a finite (N, C, H, W) tensor of ``dtype`` (on CPU)."""
    if isinstance(data, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(data))
    elif isinstance(data, torch.Tensor):
        tensor = data.detach().cpu()
    else:
        raise ValueError(f"{name} must be a numpy array or torch tensor of shape (N, C, H, W), got {type(data).__name__}")
    if tensor.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    if tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in (torch.uint8, torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(dtype)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return tensor


def as_mask(mask: Any, batch: int, height: int, width: int, name: str = "mask") -> torch.Tensor:
    """Per-image pixel masks as a float64 (B, 1, H, W) tensor of zeros and ones."""
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(mask).__name__}")
    mask = mask.detach().cpu().to(torch.float64)
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape) != (batch, 1, height, width):
        raise ValueError(f"{name} must have shape ({batch}, 1, {height}, {width}) or ({batch}, {height}, {width}), "
                         f"got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1 (1 = keep)")
    return mask
