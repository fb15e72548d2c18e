"""Result files a researcher can open: PNG image grids and Parquet tables, written atomically."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it is renamed onto ``path`` (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_parquet(rows: list[dict] | pa.Table, path: str | os.PathLike) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
