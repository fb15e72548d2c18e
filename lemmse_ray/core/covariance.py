r"""Noise covariance of the estimator input, restricted to patches.

With :math:`z = B(Ax + \sigma e)`, the noise of the patch :math:`\Pi_j z` has covariance :math:`\sigma^2 S_j`,

.. math::  S_j = \Pi_j\, G\, \Pi_j^\top, \qquad G = B B^\top .

Patches are described by *coordinate indices* into the flattened ``(C, H, W)`` image (``-1`` for a padded
coordinate, whose row of :math:`\Pi_j` is zero).  Each class below evaluates :math:`S_j` for a batch of
positions from such indices without forming :math:`\Pi_j`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _valid(coords: np.ndarray) -> np.ndarray:
    """Outer product mask of non-padded coordinates, shape (..., d, d)."""
    ok = coords >= 0
    return ok[..., :, None] & ok[..., None, :]


@dataclass(frozen=True)
class DiagonalCovariance:
    """:math:`G = \\operatorname{diag}(g)` — denoising, agnostic inputs, masks (``g`` over flattened C·H·W)."""

    diagonal: np.ndarray

    def patches(self, coords: np.ndarray) -> np.ndarray:
        """:math:`S` for coordinate indices ``coords`` of shape (n, d) → (n, d, d), float64."""
        same = coords[:, :, None] == coords[:, None, :]
        values = self.diagonal[np.maximum(coords, 0)]
        return np.where(same & _valid(coords), values[:, :, None], 0.0)


@dataclass(frozen=True)
class CirculantCovariance:
    """:math:`G` circulant on each channel (identical, channels independent) with first column ``kernel`` (H, W).

    :math:`G[(c,u),(c',u')] = \\delta_{cc'}\\, g[(u-u') \\bmod (H, W)]` — aware deblurring inputs.
    """

    kernel: np.ndarray

    def patches(self, coords: np.ndarray) -> np.ndarray:
        height, width = self.kernel.shape
        pixels = height * width
        safe = np.maximum(coords, 0)
        channel, rest = np.divmod(safe, pixels)
        row, col = np.divmod(rest, width)
        drow = (row[:, :, None] - row[:, None, :]) % height
        dcol = (col[:, :, None] - col[:, None, :]) % width
        same_channel = channel[:, :, None] == channel[:, None, :]
        return np.where(same_channel & _valid(coords), self.kernel[drow, dcol], 0.0)


@dataclass(frozen=True)
class DenseCovariance:
    """An explicit :math:`G` over flattened (C·H·W) coordinates — the generic, probed path."""

    matrix: np.ndarray

    def patches(self, coords: np.ndarray) -> np.ndarray:
        safe = np.maximum(coords, 0)
        block = self.matrix[safe[:, :, None], safe[:, None, :]]
        return np.where(_valid(coords), block, 0.0)
