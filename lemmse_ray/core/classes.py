r"""Patch classes and per-class whitening (``docs/theory.md``, the class rule).

Deterministic problems (denoising, fixed-mask inpainting, deblurring, generic :math:`B`): the noise of the
patch at position :math:`j` is :math:`\sigma^2 S_j`.  Coordinates with a zero row of :math:`S_j` (padded
coordinates, masked pixels of an aware inpainting input) are deterministic 0; positions are grouped into
**classes** by (deterministic pattern, :math:`S_j`).  A query meets the classes of its own pattern
(components of another pattern have zero density at the query, or a support of a larger dimension) or,
when its own pattern has no bank rows, those of the largest contained pattern (:attr:`ClassPlan.meets`).
Inside a class, with :math:`S` restricted to the random coordinates
:math:`S_R = U\Lambda U^\top`, the whitening is :math:`W = \Lambda^{-1/2}U^\top` over the eigenvalues
:math:`\lambda > \text{rtol}\cdot\lambda_{\max}` (default ``rtol = 1e-10``; smaller eigenvalues are treated as
exact zeros, i.e. :math:`S^{+1/2}`), and the log-density is

.. math:: \log N = -\tfrac{1}{2\sigma^2}\lVert W(p-\mu)\rVert^2 - \tfrac r2\log(2\pi\sigma^2) - \tfrac12\log\operatorname{pdet} S.

Random-mask inpainting (keep-probability :math:`q<1`): the covariance depends on each query's mask, so
classes are the border patterns (padded pixels) and no whitening is applied (``kind`` "masked" for the aware
input, "mixture" for the agnostic one; see :mod:`lemmse_ray.bank.features`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .covariance import DiagonalCovariance
from .patches import PatchGeometry
from .problems import Problem

RTOL = 1e-10
ZERO_ROW_TOL = 1e-12


@dataclass(frozen=True)
class PatchClass:
    """One class: its deterministic coordinates and whitening."""

    deterministic: np.ndarray  # (d,) bool
    padded_pixels: np.ndarray  # (P²,) bool
    random: np.ndarray  # (n_r,) indices of random patch coordinates
    whitening: np.ndarray | None  # (r, n_r) float64, None = identity (random masks)
    log_pdet: float  # log pseudo-determinant of S restricted to the random coordinates

    @property
    def rank(self) -> int:
        return len(self.random) if self.whitening is None else self.whitening.shape[0]


@dataclass(frozen=True)
class ClassPlan:
    """Classes of every position for one (problem, geometry)."""

    geometry: PatchGeometry
    kind: str  # "whitened" | "masked" | "mixture"
    classes: tuple[PatchClass, ...]
    position_class: np.ndarray  # (H·W,) int
    keep_prob: float | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def width(self) -> int:
        """Stored key width: the largest rank (whitened) or d (random masks)."""
        return max(c.rank for c in self.classes) if self.kind == "whitened" else self.geometry.dim

    def positions(self, index: int) -> np.ndarray:
        """Candidate positions of class ``index`` (ascending)."""
        return np.flatnonzero((self.position_class == index) & self.geometry.candidate_mask())

    @cached_property
    def meets(self) -> np.ndarray:
        r"""(n_classes, n_classes) bool: ``meets[c, j]`` when a query at a position of class ``j`` meets the
        rows of class ``c``.

        Whitened plans: a component's support is :math:`\{p: p_D = 0\}` for its deterministic set
        :math:`D`, so a query with deterministic set :math:`D_q` lies in the supports of the classes with
        :math:`D \subseteq D_q`; among those *that have bank rows* it meets the ones of the smallest support
        dimension, i.e. the largest :math:`D` (usually :math:`D = D_q`, the query's own pattern; under
        ``candidates="interior"`` the query's own pattern may have no rows, and a subset pattern defines the
        estimate).  A column is empty when no class qualifies (the estimator is undefined there).
        Random-mask aware inputs meet every class (compatibility is decided per query from its mask); the
        mixture kernel's queries meet their own class.
        """
        if self.kind == "masked":
            return np.ones((self.n_classes, self.n_classes), dtype=bool)
        if self.kind == "mixture":
            return np.eye(self.n_classes, dtype=bool)
        det = np.stack([c.deterministic for c in self.classes]).astype(np.int64)  # (n_classes, d)
        inside = (det @ (1 - det).T == 0) & (self.rows_per_image() > 0)[:, None]  # [c, j]: D_c ⊆ D_j, rows
        size = np.where(inside, det.sum(axis=1)[:, None], -1)
        meets = inside & (size == size.max(axis=0, keepdims=True))
        ranks = np.array([c.rank for c in self.classes])
        for j in range(self.n_classes):
            if len(set(ranks[meets[:, j]])) > 1:
                raise ValueError("classes with the same deterministic pattern but different covariance ranks "
                                 "are not supported")
        return meets

    @cached_property
    def _rows_per_image(self) -> np.ndarray:
        return np.array([len(self.positions(i)) for i in range(self.n_classes)], dtype=np.int64)

    def rows_per_image(self) -> np.ndarray:
        """(n_classes,) candidate positions per class: the rows each training image adds to each class."""
        return self._rows_per_image.copy()


def _whitening(cov: np.ndarray, rtol: float) -> tuple[np.ndarray, float]:
    if cov.shape[0] == 0:  # every coordinate deterministic: the point mass, density 1 on a 0-dim support
        return np.zeros((0, 0)), 0.0
    if not np.any(cov - np.diag(np.diag(cov))):  # diagonal: the eigenvectors are the coordinate axes
        eigval, eigvec = np.diag(cov).copy(), np.eye(cov.shape[0])
    else:
        eigval, eigvec = np.linalg.eigh(cov)
    keep = eigval > rtol * max(eigval.max(initial=0.0), 0.0)
    if not keep.any():
        raise ValueError("a patch class has a zero noise covariance on its random coordinates")
    whitening = (eigvec[:, keep] / np.sqrt(eigval[keep])).T
    return whitening, float(np.log(eigval[keep]).sum())


def plan_classes(problem: Problem, geometry: PatchGeometry, rtol: float = RTOL) -> ClassPlan:
    """Group positions into classes and compute each class's whitening (float64)."""
    padded = geometry.padded_pixels
    channels = geometry.shape[0]
    if problem.random_mask and problem.keep_prob < 1:
        if geometry.padding == "circular" and geometry.patch_size > min(geometry.shape[1:]):
            raise ValueError("patch_size must be <= min(H, W) for random-mask inpainting with circular padding")
        patterns, position_class = np.unique(padded, axis=0, return_inverse=True)
        classes = tuple(
            PatchClass(deterministic=np.tile(p, channels), padded_pixels=p,
                       random=np.flatnonzero(~np.tile(p, channels)), whitening=None, log_pdet=0.0)
            for p in patterns)
        kind = "masked" if problem.aware else "mixture"
        return ClassPlan(geometry, kind, classes, position_class.reshape(-1), problem.keep_prob)

    covariance = problem.covariance(geometry.shape)
    coords = geometry.coords
    if isinstance(covariance, DiagonalCovariance) and (geometry.padding == "zeros"
                                                       or geometry.patch_size <= min(geometry.shape[1:])):
        # no coordinate repeats inside a patch, so S_j is diagonal: keep only its diagonal (n, d)
        diag = np.where(coords >= 0, covariance.diagonal[np.maximum(coords, 0)], 0.0)
        s_of, s_all = (lambda j: np.diag(diag[j])), diag
    else:
        s_all = covariance.patches(coords)  # (H·W, d, d)
        diag = np.einsum("nii->ni", s_all)
        s_of = lambda j: s_all[j]  # noqa: E731
    scale = max(float(diag.max()), np.finfo(float).tiny)
    deterministic = diag <= ZERO_ROW_TOL * scale
    keys: dict[bytes, int] = {}
    exact: dict[bytes, int] = {}  # positions with bit-identical S_j share the rounding work
    classes: list[PatchClass] = []
    position_class = np.empty(geometry.n_positions, dtype=np.int64)
    for j in range(geometry.n_positions):
        pattern = deterministic[j]
        raw = pattern.tobytes() + s_all[j].tobytes()
        if raw not in exact:
            key = pattern.tobytes() + (np.round(s_all[j] / scale, 9) + 0.0).tobytes()
            if key not in keys:
                random = np.flatnonzero(~pattern)
                whitening, log_pdet = _whitening(s_of(j)[np.ix_(random, random)], rtol)
                keys[key] = len(classes)
                classes.append(PatchClass(pattern, padded[j], random, whitening, log_pdet))
            exact[raw] = keys[key]
        position_class[j] = exact[raw]
    return ClassPlan(geometry, "whitened", tuple(classes), position_class)
