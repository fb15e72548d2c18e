r"""The in-memory LE-MMSE estimator.

.. math:: g^*(p) = \sum_{i,j} w_{ij}(p)\, x_i[:, j], \qquad
          w_{ij}(p) = \operatorname{softmax}_{ij}\bigl(\log N(p;\ \Pi_j BAx_i,\ \sigma^2 S_j)\bigr)

evaluated at every pixel of every estimator input: the best estimator, under the empirical training
distribution, among all functions applied identically to every :math:`P\times P` patch of ``z`` (every CNN
with receptive field ``P`` and the same boundary rule); see ``docs/theory.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from ..kernels.resolver import (
    Choice,
    check_kernel,
    image_class,
    resolve,
    sliding_backend_partials,
)
from .features import (
    ClassKeys,
    QuerySet,
    key_bytes,
    key_features,
    keys_to,
    prepare_queries,
    queries_to,
    scan,
)
from .rows import (
    CENTER_IMAGES,
    RowSources,
    centers_from_inputs,
    class_offsets,
    class_rows,
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
              dtype: torch.dtype, chunk_rows: int = 1 << 14, classes=None, first: int = 0,
              n_images: int | None = None) -> dict[int, ClassKeys]:
    """Kernel key features of every class (or of ``classes``) of the bank of ``train`` (noiseless inputs
    ``inputs``), in one pass: training images ``first …`` of a bank of ``n_images`` (default: these alone),
    whose global row ids the keys carry.

    Keys are whitened and centred in float64 (the whitening may amplify rounding), a few thousand rows at a
    time so that the float64 intermediates stay in cache; only the key features are kept, in ``dtype``."""
    count = train.shape[0]
    offsets = class_offsets(plan, count if n_images is None else n_images)
    out = {}
    for c, per_image in enumerate(plan.rows_per_image()):
        if per_image == 0 or (classes is not None and c not in classes):
            continue
        step = max(1, chunk_rows // int(per_image))
        chunks = [key_features(class_rows(train[i:i + step], first + i, problem, plan, centers, c,
                                          int(offsets[c]) + (first + i) * int(per_image), inputs[i:i + step]
                                          ).to(dtype), plan, centers)[c] for i in range(0, count, step)]
        out[c] = ClassKeys(*(torch.cat([getattr(k, name) for k in chunks])
                             for name in ("features", "values", "row_ids")))
    return out


def part_bytes(plan: ClassPlan, n_images: int, dtype: torch.dtype, device: torch.device | str | None = "cpu") -> int:
    """An upper bound of the bytes a :class:`PatchBank` of ``n_images`` images holds on ``device`` (None: a CPU
    not known yet): key features of the classes scanned by matrix product, and for the class the sliding kernel
    evaluates (:func:`image_class`: on the CPU, or on CUDA with Triton) its key and value images (float32, in
    groups of up to 16 lanes) and the float64 images kept (in host memory) to build its keys on demand."""
    index = image_class(plan, dtype, device)
    per_image = plan.rows_per_image()
    rows = n_images * int(per_image.sum() - (0 if index is None else per_image[index]))
    if index is None:
        return key_bytes(plan, rows, dtype)
    geometry = plan.geometry
    channels, height, width = geometry.shape
    pad = geometry.patch_size - 1 if geometry.padding == "circular" and geometry.candidates == "all" else 0
    windows = (height + pad - geometry.patch_size + 1) * (width + pad - geometry.patch_size + 1)
    lanes = -(-n_images // 16) * 16
    images = lanes * channels * ((height + pad) * (width + pad) + windows) * 4 + n_images * channels * height * width * 8
    return key_bytes(plan, rows, dtype) + images


@dataclass
class Scan:
    """A query batch ready to be scanned against any part of one bank (:meth:`PatchBank.scan`): its features, the
    backend of every class, and the class the sliding kernel evaluates (None: none)."""

    z: torch.Tensor  # (B, C, H, W) estimator inputs
    queries: QuerySet
    choices: dict[int, Choice]
    sliding: int | None
    stats: tuple[str, ...]
    topk: int


def prepare_scan(z: torch.Tensor, mask: torch.Tensor | None, sigma: float, problem: Problem, plan: ClassPlan,
                 centers: np.ndarray, dtype: torch.dtype, device: torch.device | str, stats: tuple[str, ...],
                 topk: int, kernel: str = "auto", images: int | None = None) -> Scan:
    """The query features of checked estimator inputs ``z`` for a bank of ``plan`` held as :class:`PatchBank`
    parts on ``device`` that hold class ``images`` as images (:attr:`PatchBank.sliding`; None: none), with
    every class's backend resolved (:func:`lemmse_ray.kernels.resolver.resolve`): computed once per batch,
    whatever the number of parts it is scanned against."""
    choices = resolve(kernel, plan, dtype=dtype, device=device, stats=stats, images=images)
    index = images if images is not None and choices[images].backend == "sliding" else None
    queries = prepare_queries(z, mask, problem, plan, centers, sigma, dtype, () if index is None else (index,))
    return Scan(z, queries_to(queries, device), choices, index, stats, topk)


class PatchBank:
    r"""The patch bank of training images, built once in memory and reused for any σ and any query batch.

    Everything that does not depend on σ or on the queries is computed here, once: the patch classes and
    their whitenings, the class centres, and the kernel's key features of every bank row
    :math:`(i, j)` (the whitened, centred key :math:`\tilde k = W_c(\Pi_j BAx_i)_R - \text{centre}_c` with
    :math:`\tfrac12\lVert\tilde k\rVert^2`, or the masked/mixture features) and values :math:`x_i[:, j]` — or,
    for the class the sliding-window kernel evaluates (:mod:`lemmse_ray.kernels.sliding`), its key and value
    images.  :meth:`estimate` then only prepares the query features and scans the bank.

    The same object holds one shard of a bank on disk in a Ray actor (:meth:`part`): rows keep the bank's
    global ids and keys its centres, so a scan of every part, merged, is a scan of the whole bank.

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
        dtype = check_dtype(dtype)
        train, geometry = check_train(train, problem, patch_size, padding, candidates)
        plan = plan_classes(problem, geometry)
        inputs = problem.noiseless_input(train)
        self._hold(train, inputs, problem, plan, centers_from_inputs(inputs[:CENTER_IMAGES], plan), dtype, 0,
                   train.shape[0], "cpu")

    @classmethod
    def part(cls, images: torch.Tensor, problem: Problem, plan: ClassPlan, centers: np.ndarray, first: int,
             n_images: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> PatchBank:
        """The part of a bank of ``n_images`` training images made of images ``first …`` (``images``, float64;
        a shard of a bank on disk): its rows keep the bank's global ids and its keys the bank's ``centers``;
        key features are held on ``device``."""
        bank = cls.__new__(cls)
        bank._hold(images, problem.noiseless_input(images), problem, plan, centers, dtype, first, n_images, device)
        return bank

    def _hold(self, train: torch.Tensor, inputs: torch.Tensor, problem: Problem, plan: ClassPlan,
              centers: np.ndarray, dtype: torch.dtype, first: int, n_images: int, device) -> None:
        self.dtype, self.problem, self.plan, self.geometry, self.centers = dtype, problem, plan, plan.geometry, centers
        self.device = torch.device(device)
        self.first, self.n_images, self.n_bank_images = first, train.shape[0], n_images
        index = image_class(plan, dtype, self.device)
        #: the rows of the class the sliding kernel evaluates (:mod:`lemmse_ray.kernels.sliding`), or None
        self.sliding = None if index is None else sliding.SlidingRows.build(train, inputs, plan, index).to(self.device)
        others = None if index is None else [c for c in range(plan.n_classes) if c != index]
        self._keys = keys_to(bank_keys(train, inputs, problem, plan, centers, dtype, classes=others, first=first,
                                       n_images=n_images), self.device)
        # the sliding class's keys are built only if the matrix product needs them (top-k, kernel="torch"),
        # from the float64 images, so that they are the bits an eager build gives
        self._deferred = None if index is None else train
        #: rows of the whole bank (of all its parts)
        self.n_rows = int(class_offsets(plan, n_images)[-1])

    @property
    def keys(self) -> dict[int, ClassKeys]:
        """Kernel key features of every class (for the sliding kernel's class, built at first use)."""
        if self._deferred is not None:
            train = self._deferred
            self._keys.update(keys_to(bank_keys(train, self.problem.noiseless_input(train), self.problem, self.plan,
                                                self.centers, self.dtype, classes=[self.sliding.index],
                                                first=self.first, n_images=self.n_bank_images), self.device))
            self._keys = dict(sorted(self._keys.items()))
            self._deferred = None
        return self._keys

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training images."""
        return self.geometry.shape

    def source(self) -> RowSources:
        """(training image, position row·W + col) of bank rows, indexed by row ids (:class:`RowSources`)."""
        return RowSources(self.plan, self.n_bank_images)

    def prepare(self, z: torch.Tensor, mask: torch.Tensor | None, sigma: float, stats: tuple[str, ...], topk: int,
                kernel: str = "auto") -> Scan:
        """:func:`prepare_scan` for this bank (checked inputs)."""
        return prepare_scan(z, mask, sigma, self.problem, self.plan, self.centers, self.dtype, self.device, stats,
                            topk, kernel, None if self.sliding is None else self.sliding.index)

    def scan(self, batch: Scan) -> Partials:
        """Partials of every query pixel of ``batch`` over this bank's rows (not finalized: parts merge them)."""
        queries, stats = batch.queries, batch.stats
        skip = () if batch.sliding is None else (batch.sliding,)
        keys = {c: k for c, k in (self._keys if skip else self.keys).items() if c not in skip}
        if keys:
            part = scan(keys, self.plan, queries, stats, batch.topk, batch.choices)
        else:
            part = Partials.empty(queries.n, queries.channels, sums_of(stats), batch.topk, self.dtype, self.device)
        if skip:
            windows = torch.from_numpy(np.flatnonzero(sliding.query_windows(self.geometry.padding, self.shape,
                                                                            self.geometry.patch_size)))
            ids = (torch.arange(batch.z.shape[0])[:, None] * len(self.plan.position_class) + windows[None]).flatten()
            slid = sliding_backend_partials(batch.choices[batch.sliding], self.sliding, batch.z.to(self.device),
                                            queries.sigma, stats)
            merge_into(part, ids.to(self.device), slid.to(device=self.device))
        return part

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
        if self.first or self.n_images != self.n_bank_images:
            raise ValueError("this PatchBank is a part of a larger bank: scan its parts and merge them")
        stats = check_stats(stats, topk)
        sigma = check_noise_level(sigma, self.dtype)
        z, mask = check_queries(z, mask, self.problem, self.shape)
        batch = self.prepare(z, mask, sigma, stats, topk, kernel)
        res = to_result(finalize(self.scan(batch), self.n_rows), self.source(), tuple(z.shape), stats)
        res.info = {"n_rows": self.n_rows, "n_classes": self.plan.n_classes, "kind": self.plan.kind,
                    "sliding_class": batch.sliding}
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
