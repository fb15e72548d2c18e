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

from ..core.classes import ClassPlan
from ..core.problems import Problem

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


def class_keys(inputs: torch.Tensor, plan: ClassPlan, index: int) -> torch.Tensor:
    """Uncentred keys of class ``index`` from noiseless inputs :math:`BAx` (n, C, H, W) float64 →
    (n · positions, rank) float64."""
    cls = plan.classes[index]
    patches = plan.geometry.extract(inputs, plan.positions(index)).reshape(-1, plan.geometry.dim)
    if cls.whitening is None:
        return patches
    whitening = cls.whitening
    if whitening.size and np.all(np.count_nonzero(whitening, axis=1) == 1):  # a scaled selection of coordinates (diagonal S)
        column = np.argmax(whitening != 0, axis=1)
        scale = whitening[np.arange(len(column)), column]
        columns = cls.random[column]
        if not np.array_equal(columns, np.arange(patches.shape[1])):
            patches = patches[:, torch.from_numpy(columns)]
        return patches if np.all(scale == 1) else patches * torch.from_numpy(scale)
    if len(cls.random) < plan.geometry.dim:
        patches = patches[:, torch.from_numpy(cls.random)]
    return patches @ torch.from_numpy(whitening).T


def centers_from_inputs(inputs: torch.Tensor, plan: ClassPlan) -> np.ndarray:
    r"""(n_classes, width) centres from the noiseless inputs of the first ``CENTER_IMAGES`` images.

    Keys are linear in the patches, so the mean key of a class is the key of the mean patch: the patches
    of the mean input image, averaged over the class's positions (one patch extraction per class).
    """
    mean = inputs[:CENTER_IMAGES].mean(dim=0, keepdim=True)
    centers = np.zeros((plan.n_classes, plan.width))
    for index in range(plan.n_classes):
        if len(plan.positions(index)):
            keys = class_keys(mean, plan, index)
            centers[index, : keys.shape[1]] = keys.mean(dim=0).numpy()
    return centers


def class_centers(images: torch.Tensor, problem: Problem, plan: ClassPlan) -> np.ndarray:
    """(n_classes, width) centres: mean keys of each class over the first ``CENTER_IMAGES`` images."""
    return centers_from_inputs(problem.noiseless_input(images[:CENTER_IMAGES].to(torch.float64)), plan)


def class_rows(images: torch.Tensor, image_offset: int, problem: Problem, plan: ClassPlan, centers: np.ndarray,
               index: int, start: int = 0, inputs: torch.Tensor | None = None) -> BankArrays:
    """Rows of class ``index`` for ``images`` (global image ids from ``image_offset``), float64.

    ``inputs``: the noiseless inputs :math:`BAx` of ``images`` when already computed."""
    positions = plan.positions(index)
    n = images.shape[0] * len(positions)
    if inputs is None:
        inputs = problem.noiseless_input(images.to(torch.float64))
    raw = class_keys(inputs, plan, index)
    keys = raw - torch.tensor(centers[index, : raw.shape[1]])  # a copy: centres may be read-only (Ray)
    if raw.shape[1] < plan.width:
        keys = torch.cat([keys, torch.zeros((n, plan.width - raw.shape[1]), dtype=torch.float64)], dim=1)
    values = images.to(torch.float64).flatten(2)[:, :, torch.from_numpy(positions)].permute(0, 2, 1).reshape(n, -1)
    return BankArrays(keys, 0.5 * (keys * keys).sum(dim=1), values, torch.full((n,), index, dtype=torch.int64),
                      class_source(plan, index, image_offset, images.shape[0]), start)


def class_source(plan: ClassPlan, index: int, image_offset: int, n_images: int) -> torch.Tensor:
    """(n_images · positions, 2) int64 (image, position) of the rows of class ``index`` for images
    ``image_offset …``."""
    positions = torch.from_numpy(plan.positions(index))
    image_ids = torch.arange(image_offset, image_offset + n_images).repeat_interleave(len(positions))
    return torch.stack([image_ids, positions.repeat(n_images)], dim=1)


def row_source(plan: ClassPlan, n_images: int, rows: np.ndarray) -> np.ndarray:
    """(training image, position row·W + col) of global ``rows`` of a bank of ``n_images`` images (any shape;
    −1 and rows past the bank read as its first or last row) → shape + (2,) int64: rows are numbered
    class-major (class, image, position), so the source is a function of the row id."""
    offsets = class_offsets(plan, n_images)
    flat = np.clip(np.asarray(rows, dtype=np.int64).reshape(-1), 0, max(0, int(offsets[-1]) - 1))
    classes = np.searchsorted(offsets, flat, side="right") - 1
    out = np.zeros((len(flat), 2), dtype=np.int64)
    per_image = plan.rows_per_image()
    for c in np.unique(classes):
        at = classes == c
        image, k = np.divmod(flat[at] - offsets[c], per_image[c])
        out[at, 0], out[at, 1] = image, plan.positions(int(c))[k]
    return out.reshape(*np.shape(rows), 2)


class RowSources:
    """(training image, position) of the rows of a bank of ``n_images`` images, indexed by a tensor of row ids
    (:func:`row_source`), for :func:`lemmse_ray.core.statistics.to_result`."""

    def __init__(self, plan: ClassPlan, n_images: int):
        self.plan, self.n_images = plan, n_images

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(row_source(self.plan, self.n_images, rows.cpu().numpy()))


def class_offsets(plan: ClassPlan, n_images: int) -> np.ndarray:
    """(n_classes + 1,) first global row of each class (class-major order)."""
    return np.concatenate([[0], np.cumsum(plan.rows_per_image() * n_images)])


def memory_bank(images: torch.Tensor, problem: Problem, plan: ClassPlan, centers: np.ndarray) -> BankArrays:
    """The whole bank in memory (float64)."""
    inputs = problem.noiseless_input(images.to(torch.float64))
    parts = [class_rows(images, 0, problem, plan, centers, index, inputs=inputs) for index in range(plan.n_classes)
             if len(plan.positions(index))]
    return BankArrays.concat(parts)
