"""What a run shows a reader: labelled image grids of its estimates and tables of means."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.metrics import PSNR_CAP, psnr_of_mse

MAX_WIDTH = 10.0  # inches, image grids
DPI = 120


def as_images(value: Any, name: str) -> np.ndarray:
    """``value`` as a float64 (B, C, H, W) array with C = 1 or 3 and finite values (ValueError naming it)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, C, H, W) with B ≥ 1 and C = 1 or 3, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return array


def show_image(ax: Any, image: np.ndarray) -> None:
    """One (C, H, W) image on ``ax``, clipped to [0, 1] (noisy inputs leave it), nearest-neighbour, no ticks."""
    shown = np.clip(image.transpose(1, 2, 0), 0, 1)
    ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_image_grid(rows: Mapping[str, Any], x: Any, title: str, max_images: int = 8) -> Any:
    r"""A matplotlib ``Figure``: one row per entry of ``rows`` ({label: (B, C, H, W)}, e.g. "input z",
    "LE-MMSE", each network), labelled on its left, the ground truth ``x`` (B, C, H, W) as the last row, and
    under each tile its PSNR against ``x``, :math:`10\log_{10}(1/\mathrm{MSE})` capped at
    :data:`~lemmse_ray.core.metrics.PSNR_CAP` dB (said in the title).  The first ``max_images`` images are
    shown; values are clipped to [0, 1] for display only."""
    from matplotlib.figure import Figure  # heavy: only where figures are drawn

    truth = as_images(x, "x")
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("rows must be a non-empty mapping {label: (B, C, H, W) images}")
    arrays = {}
    for label, value in rows.items():
        if not isinstance(label, str) or not label:
            raise ValueError(f"rows: labels must be non-empty strings, got {label!r}")
        arrays[label] = as_images(value, f"rows[{label!r}]")
        if arrays[label].shape != truth.shape:
            raise ValueError(f"rows[{label!r}] has shape {arrays[label].shape}, but x has {truth.shape}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("title must be a non-empty string")
    n = min(max_images, len(truth))
    tile = min(1.2, MAX_WIDTH / (n + 1))
    fig = Figure(figsize=(tile * n + 1.2, (tile + 0.35) * (len(arrays) + 1) + 0.5))
    axes = fig.subplots(len(arrays) + 1, n, squeeze=False)
    for r, (label, images) in enumerate(arrays.items()):
        values = psnr_of_mse(((images[:n] - truth[:n]) ** 2).reshape(n, -1).mean(axis=1))
        for b in range(n):
            show_image(axes[r, b], images[b])
            axes[r, b].set_xlabel(f"{values[b]:.1f} dB", fontsize=7, labelpad=2)
        axes[r, 0].set_ylabel(label, fontsize=8)
    for b in range(n):
        show_image(axes[-1, b], truth[b])
    axes[-1, 0].set_ylabel("ground truth x", fontsize=8)
    fig.suptitle(f"{title}\n(PSNR against x under each tile, capped at {PSNR_CAP:g} dB)", fontsize=9)
    fig.subplots_adjust(wspace=0.08, hspace=0.35)
    return fig


def png_bytes(fig: Any) -> bytes:
    """The PNG of a matplotlib figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def group_means(rows: list[dict], keys: Sequence[str], columns: Sequence[str]) -> list[dict]:
    """One row per distinct value of ``keys`` (sorted): the number of rows and the mean of each column."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [{**dict(zip(keys, key)), "images": len(sel),
             **{c: float(np.mean([r[c] for r in sel])) for c in columns}} for key, sel in sorted(groups.items())]
