r"""The in-memory LE-MMSE estimator.

.. math:: g^*(p) = \sum_{i,j} w_{ij}(p)\, x_i[:, j], \qquad
          w_{ij}(p) = \operatorname{softmax}_{ij}\bigl(\log N(p;\ \Pi_j BAx_i,\ \sigma^2 S_j)\bigr)

evaluated at every pixel of every estimator input: the best estimator, under the empirical training
distribution, among all functions applied identically to every :math:`P\times P` patch of ``z`` (every CNN
with receptive field ``P`` and the same boundary rule); see ``docs/theory.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.classes import ClassPlan, plan_classes
from ..core.partials import Partials, merge_into
from ..core.patches import PatchGeometry
from ..core.problems import Problem
from ..core.statistics import Result, check_stats, finalize, sums_of, to_result
from ..core.validation import (
    as_images,
    check_dtype,
    check_noise_level,
    check_query_mask,
)
from ..kernels import sliding
from ..kernels.resolver import check_kernel, image_class, resolve
from .features import ClassKeys, key_features, prepare_queries, scan
from .rows import (
    CENTER_IMAGES,
    centers_from_inputs,
    class_offsets,
    class_rows,
    class_source,
)


def check_train(train, problem: Problem, patch_size: int, padding: str, candidates: str):
    """Validate the training images and the patch geometry; return (train as float64, geometry)."""
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a lemmse_ray problem (Denoising, Inpainting, ...), got {type(problem).__name__}")
    train = as_images(train, "train")
    shape = tuple(train.shape[1:])
    problem.check_shape(shape)
    return train, PatchGeometry(shape, patch_size, padding, candidates)


def check_queries(z, mask, problem: Problem, shape: tuple[int, int, int]):
    """Validate estimator inputs ``z`` for training images of ``shape`` (C, H, W); return float64 (z, mask)."""
    z = as_images(z, "z", check_range=False)
    if z.shape[1] != shape[0]:
        raise ValueError(f"z has {z.shape[1]} channels but train has {shape[0]}")
    if tuple(z.shape[2:]) != tuple(shape[1:]):
        raise ValueError(f"z has spatial shape {tuple(z.shape[2:])} but train has {tuple(shape[1:])}")
    return z, check_query_mask(mask, problem, z)


def check_inputs(train, z, problem: Problem, mask, patch_size: int, padding: str, candidates: str):
    """Validate and convert the inputs; return (train, z, mask, geometry) with float64 tensors."""
    train, geometry = check_train(train, problem, patch_size, padding, candidates)
    z, mask = check_queries(z, mask, problem, geometry.shape)
    return train, z, mask, geometry


def bank_keys(train: torch.Tensor, inputs: torch.Tensor, problem: Problem, plan: ClassPlan, centers: np.ndarray,
              dtype: torch.dtype, chunk_rows: int = 1 << 14, classes=None) -> dict[int, ClassKeys]:
    """Kernel key features of every class (or of ``classes``) of the bank of ``train`` (noiseless inputs
    ``inputs``), in one pass.

    Keys are whitened and centred in float64 (the whitening may amplify rounding), a few thousand rows at a
    time so that the float64 intermediates stay in cache; only the key features are kept, in ``dtype``."""
    n_images = train.shape[0]
    offsets = class_offsets(plan, n_images)
    out = {}
    for c, per_image in enumerate(plan.rows_per_image()):
        if per_image == 0 or (classes is not None and c not in classes):
            continue
        step = max(1, chunk_rows // int(per_image))
        chunks = [key_features(class_rows(train[i:i + step], i, problem, plan, centers, c,
                                          int(offsets[c]) + i * int(per_image), inputs[i:i + step]).to(dtype),
                               plan, centers)[c] for i in range(0, n_images, step)]
        out[c] = ClassKeys(*(torch.cat([getattr(k, name) for k in chunks])
                             for name in ("features", "values", "row_ids")))
    return out


class PatchBank:
    r"""The patch bank of training images, built once in memory and reused for any σ and any query batch.

    Everything that does not depend on σ or on the queries is computed here, once: the patch classes and
    their whitenings, the class centres, and the kernel's key features of every bank row
    :math:`(i, j)` (the whitened, centred key :math:`\tilde k = W_c(\Pi_j BAx_i)_R - \text{centre}_c` with
    :math:`\tfrac12\lVert\tilde k\rVert^2`, or the masked/mixture features) and values :math:`x_i[:, j]`.
    :meth:`estimate` then only prepares the query features and scans the bank.

    Args:
        train: (N, C, H, W) training images (numpy or torch), values in [0, 1]; the prior is uniform on them.
        problem: :class:`~lemmse_ray.Denoising`, :class:`~lemmse_ray.Inpainting`,
            :class:`~lemmse_ray.Deblurring` or a :class:`~lemmse_ray.LinearInverseProblem`.
        patch_size: odd receptive field P (1 ≤ P ≤ 2·min(H, W) − 1).
        padding: boundary rule, ``"zeros"`` or ``"circular"``.
        candidates: bank positions, ``"all"`` or ``"interior"`` (circular padding only).
        dtype: ``torch.float32`` (default) or ``torch.float64``: the stored key features and the kernel
            arithmetic (whitening and centring are always computed in float64).

    Example::

        bank = lm.PatchBank(train, lm.Denoising(), patch_size=5)
        for sigma in (0.05, 0.1, 0.2):
            res = bank.estimate(problem.measure(x, sigma)[1], sigma)
    """

    def __init__(self, train, problem: Problem, patch_size: int = 5, padding: str = "zeros",
                 candidates: str = "all", dtype: torch.dtype = torch.float32) -> None:
        self.dtype = check_dtype(dtype)
        train, self.geometry = check_train(train, problem, patch_size, padding, candidates)
        self.problem = problem
        self.n_images = train.shape[0]
        self.plan = plan_classes(problem, self.geometry)
        inputs = problem.noiseless_input(train)
        self.centers = centers_from_inputs(inputs[:CENTER_IMAGES], self.plan)
        index = image_class(self.plan, self.dtype)
        #: the rows of the class the sliding kernel evaluates (:mod:`lemmse_ray.kernels.sliding`), or None
        self.sliding = None if index is None else sliding.SlidingRows.build(train, inputs, self.plan, index)
        others = None if index is None else [c for c in range(self.plan.n_classes) if c != index]
        self._keys = bank_keys(train, inputs, problem, self.plan, self.centers, self.dtype, classes=others)
        # the sliding class's keys are built only if the matrix product needs them (top-k, kernel="torch"),
        # from the float64 images, so that they are the bits an eager build gives
        self._deferred = None if index is None else train
        self.n_rows = int(class_offsets(self.plan, self.n_images)[-1])

    @property
    def keys(self) -> dict[int, ClassKeys]:
        """Kernel key features of every class (for the sliding kernel's class, built at first use)."""
        if self._deferred is not None:
            train = self._deferred
            self._keys.update(bank_keys(train, self.problem.noiseless_input(train), self.problem, self.plan,
                                        self.centers, self.dtype, classes=[self.sliding.index]))
            self._keys = dict(sorted(self._keys.items()))
            self._deferred = None
        return self._keys

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training images."""
        return self.geometry.shape

    def source(self) -> torch.Tensor:
        """(n_rows, 2) int64 (training image, position row·W + col) of every bank row, in row order."""
        return torch.cat([class_source(self.plan, c, 0, self.n_images) for c in range(self.plan.n_classes)])

    def estimate(self, z, sigma: float, mask=None, stats=("variance", "ess"), topk: int = 5,
                 kernel: str = "auto") -> Result:
        """Exact LE-MMSE estimate of the clean images behind estimator inputs ``z`` at noise level ``sigma``.

        Args:
            z: (B, C, H, W) estimator inputs, e.g. ``problem.measure(x, sigma, generator)[1]``.
            sigma: noise level σ > 0 of the measurement.
            mask: (B, 1, H, W) or (B, H, W) per-image masks, for random-mask inpainting only.
            stats: any of ``"variance"``, ``"ess"``, ``"max_weight"``, ``"entropy"``, ``"log_evidence"``,
                ``"topk"``.
            topk: number of most-weighted training patches reported with ``"topk"``.
            kernel: ``"auto"`` (default), ``"sliding"``, ``"torch"`` or ``"triton"``, resolved per class by
                :func:`lemmse_ray.kernels.resolver.resolve`: ``"auto"`` evaluates the class of :attr:`sliding`
                (if any) with the sliding-window kernel of :mod:`lemmse_ray.kernels.sliding` (unless ``"topk"``
                is asked for) and every other class with torch's matrix product; ``"sliding"`` requires the
                sliding kernel; ``"torch"`` uses the matrix product everywhere; ``"triton"`` runs only in
                Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, for tests).

        Returns:
            :class:`Result` with ``mean`` (B, C, H, W) and the requested statistics.
        """
        stats = check_stats(stats, topk)
        sigma = check_noise_level(sigma, self.dtype)
        images = None if self.sliding is None else self.sliding.index
        choices = resolve(kernel, self.plan, dtype=self.dtype, device="cpu", stats=stats, images=images,
                          in_memory=True)
        use_sliding = images is not None and choices[images].backend == "sliding"
        z, mask = check_queries(z, mask, self.problem, self.shape)
        skip = (self.sliding.index,) if use_sliding else ()
        queries = prepare_queries(z, mask, self.problem, self.plan, self.centers, sigma, self.dtype, skip)
        keys = {c: k for c, k in (self._keys if use_sliding else self.keys).items() if c not in skip}
        if keys:
            part = scan(keys, self.plan, queries, stats, topk, choices)
        else:
            part = Partials.empty(queries.n, queries.channels, sums_of(stats), topk, self.dtype)
        if use_sliding:
            windows = torch.from_numpy(np.flatnonzero(sliding.query_windows(self.geometry.padding, self.shape,
                                                                    self.geometry.patch_size)))
            ids = (torch.arange(z.shape[0])[:, None] * len(self.plan.position_class) + windows[None]).flatten()
            merge_into(part, ids, sliding.sliding_partials(self.sliding, z, sigma, stats))
        source = self.source() if "topk" in stats else torch.zeros((0, 2), dtype=torch.int64)
        res = to_result(finalize(part, self.n_rows), source, tuple(z.shape), stats)
        res.info = {"n_rows": self.n_rows, "n_classes": self.plan.n_classes, "kind": self.plan.kind,
                    "sliding_class": self.sliding.index if use_sliding else None}
        return res


def estimate(train, z, problem: Problem, sigma: float, patch_size: int = 5, padding: str = "zeros",
             candidates: str = "all", mask=None, stats=("variance", "ess"), topk: int = 5,
             dtype: torch.dtype = torch.float32, kernel: str = "auto") -> Result:
    """Exact LE-MMSE estimate of the clean images behind estimator inputs ``z``.

    Builds a :class:`PatchBank` of ``train`` and calls :meth:`PatchBank.estimate`; to estimate several
    batches or noise levels with the same training images, build the bank once and reuse it.

    Args:
        train: (N, C, H, W) training images (numpy or torch), values in [0, 1]; the prior is uniform on them.
        z: (B, C, H, W) estimator inputs, e.g. ``problem.measure(x, sigma, generator)[1]``.
        problem: :class:`~lemmse_ray.Denoising`, :class:`~lemmse_ray.Inpainting`,
            :class:`~lemmse_ray.Deblurring` or a :class:`~lemmse_ray.LinearInverseProblem`.
        sigma: noise level σ > 0 of the measurement.
        patch_size: odd receptive field P (1 ≤ P ≤ 2·min(H, W) − 1).
        padding: boundary rule, ``"zeros"`` or ``"circular"``.
        candidates: bank positions, ``"all"`` or ``"interior"`` (circular padding only).
        mask: (B, 1, H, W) or (B, H, W) per-image masks, for random-mask inpainting only.
        stats: any of ``"variance"``, ``"ess"``, ``"max_weight"``, ``"entropy"``, ``"log_evidence"``, ``"topk"``.
        topk: number of most-weighted training patches reported with ``"topk"``.
        dtype: ``torch.float32`` (default) or ``torch.float64`` for the kernel arithmetic (the class
            whitening is always computed in float64).
        kernel: ``"auto"`` (default), ``"sliding"``, ``"torch"`` or ``"triton"``, as in :meth:`PatchBank.estimate`.

    Returns:
        :class:`Result` with ``mean`` (B, C, H, W) and the requested statistics.
    """
    stats = check_stats(stats, topk)
    check_noise_level(sigma, check_dtype(dtype))
    check_kernel(kernel, dtype)
    train, z, mask, _ = check_inputs(train, z, problem, mask, patch_size, padding, candidates)
    bank = PatchBank(train, problem, patch_size, padding, candidates, dtype)
    return bank.estimate(z, sigma, mask=mask, stats=stats, topk=topk, kernel=kernel)
