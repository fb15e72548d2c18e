r"""Patch geometry: which image coordinates form the patch :math:`\Pi_k z` at each position.

The patch at pixel :math:`k=(r,c)` is the :math:`C\times P\times P` block centred there, flattened in
(channel, row, column) order: coordinate :math:`(ch, a, b)` reads pixel :math:`(r+a-P/\!/2,\ c+b-P/\!/2)`.

* ``padding="zeros"``: coordinates outside the image are exactly 0 (like a CNN with zero padding).
* ``padding="circular"``: coordinates wrap modulo (H, W).

Bank *candidates*: ``"all"`` positions (default; with circular padding this is what the theory gives), or
``"interior"`` — only positions whose patch does not wrap (circular padding only; the convention of earlier
analytic denoisers).  Queries are always at every pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .validation import CANDIDATES, PADDINGS, check_choice, check_patch_size


@dataclass(frozen=True)
class PatchGeometry:
    """Patch coordinates for images of ``shape`` = (C, H, W)."""

    shape: tuple[int, int, int]
    patch_size: int
    padding: str = "zeros"
    candidates: str = "all"
    pixel_index: np.ndarray = field(init=False, repr=False)  # (H·W, P²) pixel index, −1 = padded
    coords: np.ndarray = field(init=False, repr=False)  # (H·W, C·P²) coordinate index into C·H·W, −1 = padded

    def __post_init__(self) -> None:
        channels, height, width = self.shape
        check_patch_size(self.patch_size, height, width)
        check_choice(self.padding, PADDINGS, "padding")
        check_choice(self.candidates, CANDIDATES, "candidates")
        if self.candidates == "interior" and self.padding != "circular":
            raise ValueError("candidates='interior' is only defined with padding='circular'")
        half = self.patch_size // 2
        offsets = np.arange(self.patch_size) - half
        rows = np.arange(height)[:, None, None, None] + offsets[None, None, :, None]
        cols = np.arange(width)[None, :, None, None] + offsets[None, None, None, :]
        rows, cols = np.broadcast_arrays(rows, cols)
        if self.padding == "circular":
            pixel = (rows % height) * width + cols % width
        else:
            inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
            pixel = np.where(inside, rows * width + cols, -1)
        pixel = pixel.reshape(height * width, self.patch_size ** 2)
        per_channel = np.arange(channels)[None, :, None] * (height * width)
        coords = np.where(pixel[:, None, :] >= 0, pixel[:, None, :] + per_channel, -1)
        object.__setattr__(self, "pixel_index", pixel)
        object.__setattr__(self, "coords", coords.reshape(height * width, channels * self.patch_size ** 2))

    @property
    def dim(self) -> int:
        """:math:`d = C P^2`."""
        return self.coords.shape[1]

    @property
    def n_positions(self) -> int:
        return self.coords.shape[0]

    @property
    def padded_pixels(self) -> np.ndarray:
        """(H·W, P²) bool: pixel of the patch lies outside the image (zero padding)."""
        return self.pixel_index < 0

    def candidate_mask(self) -> np.ndarray:
        """(H·W,) bool: positions whose patches enter the bank."""
        _, height, width = self.shape
        if self.candidates == "all":
            return np.ones(height * width, dtype=bool)
        half = self.patch_size // 2
        r, c = np.divmod(np.arange(height * width), width)
        return (r >= half) & (r < height - half) & (c >= half) & (c < width - half)

    def extract(self, images: torch.Tensor, positions: np.ndarray | None = None) -> torch.Tensor:
        """Patches of ``images`` (N, C, H, W) at ``positions`` (default: all) → (N, n_positions, d)."""
        flat = images.reshape(images.shape[0], -1)
        flat = torch.cat([flat, torch.zeros((images.shape[0], 1), dtype=images.dtype)], dim=1)
        coords = self.coords if positions is None else self.coords[positions]
        index = torch.from_numpy(np.where(coords >= 0, coords, flat.shape[1] - 1))
        return flat[:, index]

    def extract_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """Pixel-mask patches of ``masks`` (N, 1, H, W) → (N, H·W, P²), padded pixels 0."""
        flat = masks.reshape(masks.shape[0], -1)
        flat = torch.cat([flat, torch.zeros((masks.shape[0], 1), dtype=masks.dtype)], dim=1)
        index = torch.from_numpy(np.where(self.pixel_index >= 0, self.pixel_index, flat.shape[1] - 1))
        return flat[:, index]

    def spec(self) -> dict:
        return {"shape": list(self.shape), "patch_size": self.patch_size, "padding": self.padding,
                "candidates": self.candidates}
