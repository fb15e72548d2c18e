r"""Imaging inverse problems: forward operator :math:`A`, input operator :math:`B`, and simulation.

A problem produces the measurement :math:`y = A(x) + \sigma e`, :math:`e \sim \mathcal N(0, I)`, and the
estimator input :math:`z = B y`.  The ``input`` argument chooses :math:`B`:

* ``"direct"`` — physics-agnostic, :math:`z = y`;
* ``"adjoint"`` — :math:`B = A^\top`;
* ``"pinv"`` — pseudo-inverse (spectral threshold for blurs);
* ``"tikhonov"`` — :math:`B = (A^\top A + \lambda I)^{-1} A^\top` with ``reg`` :math:`=\lambda`.

Images follow deepinv's conventions: ``(B, C, H, W)`` floats in [0, 1], masks with 1 = keep.  What the
estimator needs from a problem is the noiseless input :math:`B A x` (the bank keys), the covariance
:math:`G = B B^\top` (see :mod:`lemmse_ray.core.covariance`), and, for random masks, the keep-probability.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch

from .covariance import CirculantCovariance, DenseCovariance, DiagonalCovariance
from .validation import check_choice, check_sigma

INPUT_MODES = ("direct", "adjoint", "pinv", "tikhonov")


def _check_reg(reg: Any, name: str) -> float:
    if isinstance(reg, bool):
        raise ValueError(f"{name} must be a number >= 0, got {reg!r}")
    try:
        value = float(reg)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {reg!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {reg!r}")
    return value


class Problem(ABC):
    """Base class. Subclasses define :meth:`forward`, :meth:`input_op` and :meth:`covariance`."""

    name = "problem"
    random_mask = False
    keep_prob: float | None = None

    def __init__(self, input: str = "direct", reg: float = 1e-2) -> None:
        self.input = check_choice(input, INPUT_MODES, "input")
        self.reg = _check_reg(reg, "reg")

    @property
    def aware(self) -> bool:
        """True when the estimator input uses the physics (``input != "direct"``)."""
        return self.input != "direct"

    @abstractmethod
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`A x` (``mask``: per-image masks of random-mask problems)."""

    @abstractmethod
    def input_op(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`B y`."""

    @abstractmethod
    def covariance(self, shape: tuple[int, int, int]):
        """:math:`G = B B^\\top` for images of shape (C, H, W)."""

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise ``ValueError`` if images of ``shape`` (C, H, W) do not fit this problem."""

    def noiseless_input(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`B A x` — the bank keys before patch extraction (clean images for random masks)."""
        return self.input_op(self.forward(x))

    def draw_mask(self, shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    def measure(self, x: torch.Tensor, sigma: float, generator: torch.Generator | None = None):
        """Simulate ``(y, z, mask)`` from clean images ``x`` (B, C, H, W); ``mask`` is None without masks."""
        sigma = check_sigma(sigma)
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError("x must be a torch tensor of shape (B, C, H, W)")
        self.check_shape(tuple(x.shape[1:]))
        mask = self.draw_mask(tuple(x.shape), generator, x.dtype)
        clean = self.forward(x, mask)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=clean.device)
        y = clean + sigma * noise
        return y, self.input_op(y, mask), mask

    def spec(self) -> dict:
        """A JSON-able description (stored with banks and results)."""
        return {"problem": self.name, "input": self.input, "reg": self.reg}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k not in ("problem", "kernel", "mask"))
        return f"{type(self).__name__}({args})"


class Denoising(Problem):
    r""":math:`y = x + \sigma e`. Aware inputs equal ``y`` except ``"tikhonov"``: :math:`z = y/(1+\lambda)`."""

    name = "denoising"

    @property
    def _scale(self) -> float:
        return 1.0 / (1.0 + self.reg) if self.input == "tikhonov" else 1.0

    def forward(self, x, mask=None):
        return x

    def input_op(self, y, mask=None):
        return y * self._scale if self._scale != 1.0 else y

    def covariance(self, shape):
        return DiagonalCovariance(np.full(int(np.prod(shape)), self._scale ** 2))


class Inpainting(Problem):
    r"""Pixel masks shared over channels (1 = keep), noise on every pixel: :math:`y = m\odot x + \sigma e`.

    Either a **fixed** ``mask`` (H, W) used for every image, or **random** iid masks with keep-probability
    ``keep_prob`` drawn per image (then per-image masks are passed to :func:`lemmse_ray.estimate`).
    Aware inputs: ``"adjoint"`` = ``"pinv"`` :math:`= m\odot y`; ``"tikhonov"`` :math:`= m\odot y/(1+\lambda)`.
    """

    name = "inpainting"

    def __init__(self, mask: Any = None, keep_prob: float | None = None, input: str = "direct", reg: float = 1e-2):
        super().__init__(input, reg)
        if (mask is None) == (keep_prob is None):
            raise ValueError("mask or keep_prob: give exactly one (a fixed (H, W) mask, or a keep-probability)")
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)
            if m.ndim != 2 or m.numel() == 0:
                raise ValueError(f"mask must be a 2-D (H, W) array, got shape {tuple(m.shape)}")
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("mask must contain only 0 and 1 (1 = keep)")
            self.mask = m
        else:
            q = float(keep_prob)
            if not (0.0 < q <= 1.0):
                raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob!r}")
            self.mask = None
            self.keep_prob = q
            self.random_mask = True

    @property
    def _scale(self) -> float:
        return 1.0 / (1.0 + self.reg) if self.input == "tikhonov" else 1.0

    def check_shape(self, shape):
        if self.mask is not None and tuple(self.mask.shape) != tuple(shape[1:]):
            raise ValueError(f"mask has shape {tuple(self.mask.shape)} but images are {tuple(shape[1:])}")

    def _mask_for(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.mask is not None:
            return self.mask.to(dtype=x.dtype, device=x.device)
        if mask is None:
            raise ValueError("mask: random-mask inpainting needs the per-image masks")
        return mask.to(dtype=x.dtype, device=x.device)

    def draw_mask(self, shape, generator, dtype):
        batch, _, height, width = shape
        if self.mask is not None:
            return self.mask.to(dtype).expand(batch, 1, height, width).clone()
        return (torch.rand((batch, 1, height, width), generator=generator, dtype=torch.float64) < self.keep_prob).to(dtype)

    def forward(self, x, mask=None):
        return self._mask_for(x, mask) * x

    def input_op(self, y, mask=None):
        if self.input == "direct":
            return y
        return self._mask_for(y, mask) * y * self._scale

    @property
    def input_scale(self) -> float:
        """The factor of ``z`` beyond the mask: :math:`1/(1+\\lambda)` for ``"tikhonov"``, else 1."""
        return self._scale if self.aware else 1.0

    def noiseless_input(self, x):
        if self.random_mask and self.keep_prob < 1:
            return x  # keys are clean patches; the per-query mask enters the kernel
        if self.random_mask:  # keep_prob = 1: every mask is all ones
            return self.input_op(x, torch.ones_like(x[:, :1]))
        return super().noiseless_input(x)

    def covariance(self, shape):
        if self.random_mask and self.keep_prob < 1:
            raise ValueError("random-mask inpainting has a per-query covariance; it has no fixed G")
        channels = shape[0]
        if self.input == "direct":
            return DiagonalCovariance(np.ones(int(np.prod(shape))))
        mask = np.ones(shape[1:]) if self.mask is None else self.mask.numpy()
        diagonal = (mask * self._scale) ** 2
        return DiagonalCovariance(np.tile(diagonal.ravel(), channels))

    def spec(self):
        out = super().spec()
        if self.mask is not None:
            out["mask"] = self.mask.to(torch.int8).tolist()
        else:
            out["keep_prob"] = self.keep_prob
        return out


def gaussian_kernel(size: int, std: float) -> torch.Tensor:
    """Normalised, odd ``size``×``size`` Gaussian blur kernel with standard deviation ``std`` (pixels)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be an odd positive integer, got {size!r}")
    std = check_sigma(std, "std")
    t = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (t / std) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


class Deblurring(Problem):
    r"""Circular convolution with an odd 2-D ``kernel`` :math:`h`, the same on every channel:

    .. math:: (Ax)[c,u,v] = \sum_{a,b} h[a,b]\; x[c,\,(u-a+k_h/\!/2) \bmod H,\,(v-b+k_w/\!/2) \bmod W]

    (deepinv's ``BlurFFT`` convention).  In Fourier, :math:`A = F^{-1}\operatorname{diag}(\hat h)F`; the input
    operators are the spectra :math:`\bar{\hat h}` (adjoint), :math:`1/\hat h` where :math:`|\hat h| >`
    ``threshold`` else 0 (pinv), and :math:`\bar{\hat h}/(|\hat h|^2+\lambda)` (tikhonov, ``reg`` = λ).
    """

    name = "deblurring"

    def __init__(self, kernel: Any, input: str = "direct", reg: float = 1e-2, threshold: float = 1e-2):
        super().__init__(input, reg)
        k = torch.as_tensor(np.asarray(kernel), dtype=torch.float64)
        if k.ndim != 2:
            raise ValueError(f"kernel must be a 2-D array, got shape {tuple(k.shape)}")
        if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise ValueError(f"kernel must have odd height and width, got shape {tuple(k.shape)}")
        if not bool(torch.isfinite(k).all()):
            raise ValueError("kernel contains NaN or inf values")
        self.kernel = k
        self.threshold = _check_reg(threshold, "threshold")
        if self.input == "tikhonov" and self.reg == 0:
            raise ValueError("reg must be > 0 for input='tikhonov'")

    def check_shape(self, shape):
        kh, kw = self.kernel.shape
        if kh > shape[1] or kw > shape[2]:
            raise ValueError(f"kernel of shape {(kh, kw)} is larger than the images {tuple(shape[1:])}")

    def spectrum(self, height: int, width: int) -> torch.Tensor:
        """:math:`\\hat h` on the H×W grid (complex128), kernel centre moved to (0, 0)."""
        kh, kw = self.kernel.shape
        placed = torch.zeros(height, width, dtype=torch.float64)
        rows = (torch.arange(kh) - kh // 2) % height
        cols = (torch.arange(kw) - kw // 2) % width
        placed.index_put_((rows[:, None].expand(kh, kw), cols[None, :].expand(kh, kw)), self.kernel, accumulate=True)
        return torch.fft.fft2(placed)

    def input_spectrum(self, height: int, width: int) -> torch.Tensor:
        """Spectrum :math:`\\hat b` of the input operator B."""
        h = self.spectrum(height, width)
        if self.input == "direct":
            return torch.ones_like(h)
        if self.input == "adjoint":
            return h.conj()
        if self.input == "pinv":
            keep = h.abs() > self.threshold
            return torch.where(keep, 1.0 / torch.where(keep, h, torch.ones_like(h)), torch.zeros_like(h))
        return h.conj() / (h.abs() ** 2 + self.reg)

    @staticmethod
    def _apply(x: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        out = torch.fft.ifft2(torch.fft.fft2(x.to(torch.float64)) * spectrum.to(x.device)).real
        return out.to(x.dtype)

    def forward(self, x, mask=None):
        return self._apply(x, self.spectrum(x.shape[-2], x.shape[-1]))

    def input_op(self, y, mask=None):
        if self.input == "direct":
            return y
        return self._apply(y, self.input_spectrum(y.shape[-2], y.shape[-1]))

    def covariance(self, shape):
        if self.input == "direct":
            return DiagonalCovariance(np.ones(int(np.prod(shape))))
        b = self.input_spectrum(shape[1], shape[2])
        return CirculantCovariance(torch.fft.ifft2(b.abs() ** 2).real.numpy())

    def spec(self):
        out = super().spec()
        out.update(kernel=self.kernel.tolist(), threshold=self.threshold)
        return out


class LinearInverseProblem(Problem):
    r"""Generic problem from callables: ``forward`` :math:`A` (may be nonlinear) and a *linear* ``input_op``
    :math:`B` (``None`` = identity), both acting on batched tensors.

    :math:`G = BB^\top` is obtained by probing: :math:`B` is applied to the standard basis of the
    measurement space (in batches), giving its matrix column by column; patch covariances and classes then
    follow exactly as for the built-in problems (``docs/theory.md``, the class rule).  Cost: one
    application of :math:`B` per measurement coordinate, and a dense (C·H·W)² matrix, so this path suits
    images up to ~64×64.
    """

    name = "generic"

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor],
                 input_op: Callable[[torch.Tensor], torch.Tensor] | None = None, label: str = "generic",
                 probe_batch: int = 256):
        if not callable(forward):
            raise ValueError("forward must be callable")
        if input_op is not None and not callable(input_op):
            raise ValueError("input_op must be callable or None")
        super().__init__("direct" if input_op is None else "adjoint")
        self._forward = forward
        self._input = input_op
        self.label = label
        self.probe_batch = probe_batch
        self._cov_cache: dict[tuple, DenseCovariance] = {}

    def __getstate__(self) -> dict:
        """Pickled without the probed covariances (dense (C·H·W)² matrices): a copy sent to a Ray task or
        actor re-probes them when it needs them."""
        return {**self.__dict__, "_cov_cache": {}}

    def forward(self, x, mask=None):
        return self._forward(x)

    def input_op(self, y, mask=None):
        return y if self._input is None else self._input(y)

    def covariance(self, shape):
        shape = tuple(int(s) for s in shape)
        if shape in self._cov_cache:
            return self._cov_cache[shape]
        n = int(np.prod(shape))
        if self._input is None:
            cov = DenseCovariance(np.eye(n))
        else:
            with torch.no_grad():
                y_shape = tuple(self._forward(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:])
                m = int(np.prod(y_shape))
                columns = []
                for start in range(0, m, self.probe_batch):
                    stop = min(m, start + self.probe_batch)
                    basis = torch.zeros((stop - start, m), dtype=torch.float64)
                    basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                    out = self._input(basis.reshape(stop - start, *y_shape))
                    columns.append(out.reshape(stop - start, n).to(torch.float64).numpy())
            matrix = np.concatenate(columns, axis=0).T  # (n, m): column t = B e_t
            cov = DenseCovariance(matrix @ matrix.T)
        self._cov_cache[shape] = cov
        return cov

    def spec(self):
        return {"problem": self.name, "label": self.label, "input": "probed" if self._input is not None else "direct"}


def from_physics(physics: Any, input: str = "adjoint") -> LinearInverseProblem:
    """Wrap any object with ``A``, ``A_adjoint`` and ``A_dagger`` methods (deepinv ``LinearPhysics`` duck type).

    ``input``: ``"direct"`` (z = y), ``"adjoint"`` (:math:`B = A^\\top`) or ``"pinv"`` (:math:`B = A^\\dagger`).
    """
    check_choice(input, ("direct", "adjoint", "pinv"), "input")
    for method in ("A", "A_adjoint", "A_dagger"):
        if not callable(getattr(physics, method, None)):
            raise ValueError(f"physics must have a callable {method} method")
    op = {"direct": None, "adjoint": physics.A_adjoint, "pinv": physics.A_dagger}[input]
    return LinearInverseProblem(physics.A, op, label=f"{type(physics).__name__}:{input}")
