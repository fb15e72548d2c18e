"""Boundary checks shared by the public entry points.

Every check raises :class:`ValueError` whose message starts with the name of the offending parameter, so a
researcher reading a traceback knows which argument to fix.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch

PADDINGS = ("zeros", "circular")
CANDIDATES = ("all", "interior")
#: the arithmetic of the exact paths, by name (no reduced precision anywhere)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# Noise levels the kernel arithmetic represents without overflow: the query features scale as 1/σ² and the
# log-normalisers as log σ², so σ² (and |features|·|keys|/σ² summed over a patch) must stay finite.
SIGMA_RANGE = {torch.float32: (1e-12, 1e150), torch.float64: (1e-150, 1e150)}


def check_sigma(sigma: Any, name: str = "sigma") -> float:
    """Return ``sigma`` as a float, requiring a finite value > 0 (a bool is not a number here)."""
    if isinstance(sigma, bool):
        raise ValueError(f"{name} must be a positive number, got {sigma!r}")
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {sigma!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")
    return value


def check_noise_level(sigma: Any, dtype: torch.dtype, name: str = "sigma") -> float:
    """:func:`check_sigma`, plus the range in which ``dtype`` arithmetic stays finite (:data:`SIGMA_RANGE`).

    Below it 1/σ² overflows (float32: the features of a query, ≈ |p|/σ², times keys summed over a patch, pass
    3.4e38 and the logits become inf − inf = NaN); above it σ² overflows float64.  Refused with the range and
    the remedy rather than computed as NaN.
    """
    value = check_sigma(sigma, name)
    low, high = SIGMA_RANGE[dtype]
    if not low <= value <= high:
        hint = " (use dtype float64 for smaller σ)" if dtype == torch.float32 and value < low else ""
        raise ValueError(f"{name}={value:g} is outside [{low:g}, {high:g}], the range where "
                         f"{str(dtype).replace('torch.', '')} arithmetic stays finite{hint}")
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


def as_images(data: Any, name: str, dtype: torch.dtype = torch.float64, check_range: bool = True) -> torch.Tensor:
    """Convert numpy/torch data to a finite (N, C, H, W) tensor of ``dtype`` (on CPU).

    Images are floating point with values in [0, 1] (the deepinv convention): integer arrays are refused (a
    uint8 image divided by 255 is what is meant), and with ``check_range`` values far outside [0, 1] warn
    (estimator inputs ``z`` are noisy and legitimately leave the range: they pass ``check_range=False``).
    """
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
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"{name} must hold floating-point images in [0, 1], got dtype {tensor.dtype} "
                         "(for 8-bit images pass images / 255)")
    if tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(dtype)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values")
    if check_range and (float(tensor.min()) < -0.5 or float(tensor.max()) > 1.5):
        warnings.warn(f"{name} has values in [{float(tensor.min()):g}, {float(tensor.max()):g}], far outside "
                      "[0, 1]: images are expected as floats in [0, 1]", stacklevel=3)
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


def check_query_mask(mask: Any, problem: Any, z: torch.Tensor) -> torch.Tensor | None:
    """The per-image masks of estimator inputs ``z`` (B, C, H, W) for ``problem``: required (B, 1, H, W) for
    random-mask inpainting, refused (``None`` expected) otherwise."""
    if problem.random_mask:
        if mask is None:
            raise ValueError("mask is required for random-mask inpainting (the per-image masks of z)")
        mask = as_mask(mask, z.shape[0], z.shape[2], z.shape[3])
        if problem.keep_prob == 1 and not bool((mask == 1).all()):
            raise ValueError("mask has zeros but keep_prob = 1")
        return mask
    if mask is not None:
        raise ValueError("mask is only used by random-mask inpainting (a fixed mask belongs to the problem)")
    return None


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """``dtype`` if it is one of :data:`DTYPES` (torch.float32 or torch.float64), else ValueError."""
    if dtype not in DTYPES.values():
        raise ValueError(f"{name} must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a :data:`DTYPES` dtype (``"float32"``, ``"float64"``)."""
    return str(dtype).replace("torch.", "")


def as_float64(value: Any, name: str) -> np.ndarray:
    """``value`` (array-like or tensor) as a float64 numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric array") from None


def as_int64(value: Any, name: str) -> np.ndarray:
    """``value`` (an integer array or tensor) as an int64 numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {array.dtype}")
    return array.astype(np.int64)


def check_shape(array: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    """``array`` if its shape is ``shape``."""
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
    return array


def available_memory() -> int:
    """Bytes of memory available on this machine now (physical pages not in use)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
