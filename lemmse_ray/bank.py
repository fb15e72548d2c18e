r"""Patch-bank rows: keys, values and provenance for every (training image, candidate position).

Rows are sorted by class, then image, then position.  For a whitened class :math:`c` the key of row
:math:`(i, j)` is :math:`\tilde k = W_c\,(\Pi_j BAx_i)_R - \text{centre}_c`, zero-padded to the plan's width,
stored with :math:`\tfrac12\lVert\tilde k\rVert^2`; for random masks it is the clean patch minus the centre.
The centre (a per-class mean key over the first :data:`CENTER_IMAGES` images) only improves float32 accuracy:
distances do not depend on it.  Values are the clean centre pixels :math:`x_i[:, j]`.  A bank does not
depend on :math:`\sigma`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .classes import ClassPlan
from .problems import Problem

CENTER_IMAGES = 256


@dataclass
class BankArrays:
    """A contiguous range of bank rows starting at global row ``start`` (arrays of equal length)."""

    keys: torch.Tensor  # (n, width)
    half_sqnorm: torch.Tensor  # (n,)
    values: torch.Tensor  # (n, C)
    class_ids: torch.Tensor  # (n,) int64
    source: torch.Tensor  # (n, 2) int64: (image, position)
    start: int = 0

    def __len__(self) -> int:
        return self.keys.shape[0]

    def to(self, dtype: torch.dtype) -> "BankArrays":
        return BankArrays(self.keys.to(dtype), self.half_sqnorm.to(dtype), self.values.to(dtype),
                          self.class_ids, self.source, self.start)

    @staticmethod
    def concat(parts: list["BankArrays"]) -> "BankArrays":
        return BankArrays(*(torch.cat([getattr(p, name) for p in parts]) for name in
                            ("keys", "half_sqnorm", "values", "class_ids", "source")), start=parts[0].start)


def raw_keys(images: torch.Tensor, problem: Problem, plan: ClassPlan, index: int) -> torch.Tensor:
    """Uncentred keys of class ``index`` for ``images`` (n, C, H, W) → (n · positions, rank), float64."""
    cls = plan.classes[index]
    positions = plan.positions(index)
    inputs = problem.noiseless_input(images.to(torch.float64))
    patches = plan.geometry.extract(inputs, positions).reshape(-1, plan.geometry.dim)
    if cls.whitening is None:
        return patches
    return patches[:, torch.tensor(cls.random)] @ torch.tensor(cls.whitening).T


def class_centers(images: torch.Tensor, problem: Problem, plan: ClassPlan) -> np.ndarray:
    """(n_classes, width) centres: mean keys of each class over the first ``CENTER_IMAGES`` images."""
    first = images[:CENTER_IMAGES]
    centers = np.zeros((plan.n_classes, plan.width))
    for index in range(plan.n_classes):
        if len(plan.positions(index)):
            keys = raw_keys(first, problem, plan, index)
            centers[index, : keys.shape[1]] = keys.mean(dim=0).numpy()
    return centers


def class_rows(images: torch.Tensor, image_offset: int, problem: Problem, plan: ClassPlan, centers: np.ndarray,
               index: int, start: int = 0) -> BankArrays:
    """Rows of class ``index`` for ``images`` (global image ids from ``image_offset``), float64."""
    positions = plan.positions(index)
    n = images.shape[0] * len(positions)
    keys = torch.zeros((n, plan.width), dtype=torch.float64)
    raw = raw_keys(images, problem, plan, index)
    keys[:, : raw.shape[1]] = raw - torch.tensor(centers[index, : raw.shape[1]])
    flat = images.to(torch.float64).flatten(2)  # (n_img, C, H·W)
    values = flat[:, :, torch.tensor(positions)].permute(0, 2, 1).reshape(n, -1)
    image_ids = torch.arange(image_offset, image_offset + images.shape[0]).repeat_interleave(len(positions))
    position_ids = torch.tensor(positions).repeat(images.shape[0])
    return BankArrays(keys, 0.5 * (keys * keys).sum(dim=1), values,
                      torch.full((n,), index, dtype=torch.int64), torch.stack([image_ids, position_ids], dim=1),
                      start)


def class_offsets(plan: ClassPlan, n_images: int) -> np.ndarray:
    """(n_classes + 1,) first global row of each class (class-major order)."""
    return np.concatenate([[0], np.cumsum(plan.rows_per_image() * n_images)])


def memory_bank(images: torch.Tensor, problem: Problem, plan: ClassPlan, centers: np.ndarray) -> BankArrays:
    """The whole bank in memory (float64)."""
    parts = [class_rows(images, 0, problem, plan, centers, index) for index in range(plan.n_classes)
             if len(plan.positions(index))]
    return BankArrays.concat(parts)
