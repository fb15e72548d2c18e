"""What a run shows a reader: image grids of its estimates and tables of means."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def image_grid(rows: Sequence[torch.Tensor], scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile rows of (B, C, H, W) images in [0, 1] into one uint8 (H', W', 3) array, nearest-upscaled."""
    if not rows:
        raise ValueError("rows must not be empty")
    batch, channels, height, width = rows[0].shape
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((len(rows) * cell_h + pad, batch * cell_w + pad, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        if tuple(images.shape) != (batch, channels, height, width):
            raise ValueError(f"rows: every row must have shape {(batch, channels, height, width)}, got {tuple(images.shape)}")
        pixels = (images.detach().to(torch.float64).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        if channels == 1:
            pixels = np.repeat(pixels, 3, axis=1)
        for b in range(batch):
            tile = pixels[b, :3].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
            top, left = pad + r * cell_h, pad + b * cell_w
            canvas[top: top + height * scale, left: left + width * scale] = tile
    return canvas


def group_means(rows: list[dict], keys: Sequence[str], columns: Sequence[str]) -> list[dict]:
    """One row per distinct value of ``keys`` (sorted): the number of rows and the mean of each column."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [{**dict(zip(keys, key)), "images": len(sel),
             **{c: float(np.mean([r[c] for r in sel])) for c in columns}} for key, sel in sorted(groups.items())]
