r"""The kernel resolver: the one place that decides which backend evaluates each class of a bank.

Backends (:data:`BACKENDS`), and what each needs:

* ``"torch"`` — :mod:`lemmse_ray.kernels.torch_kernels`: the logits by a matrix product (whitened and
  random-mask aware kinds) or the per-pixel mixture kernel (random-mask agnostic); any device, float32 or
  float64, every statistic.  Its epilogue (:func:`epilogue_library`) is the compiled one of
  :mod:`lemmse_ray.kernels.epilogue` for float32 on the CPU where it builds, else pure torch.
* ``"sliding"`` — the sliding-window kernel, for a class whitened by a multiple of the identity whose rows are all
  the windows of the images that the bank holds *as images* (:func:`image_class`: a
  :class:`~lemmse_ray.PatchBank`, in memory or a shard of a bank on disk in an actor); float32, at most 30
  channels, every statistic but top-k.  Two implementations read the same :class:`~lemmse_ray.kernels.sliding.SlidingRows`, told apart by
  the second field of the :class:`Choice` (``sliding_variant=`` of :func:`resolve`):

  - ``Choice("sliding")`` — :mod:`lemmse_ray.kernels.sliding`, the compiled C kernel, on the CPU (it needs a C
    compiler);
  - ``Choice("sliding", "triton")`` — :mod:`lemmse_ray.kernels.triton_sliding`, the Triton kernel, on a CUDA
    device with the optional ``triton`` package (on the CPU only under ``TRITON_INTERPRET=1`` and
    ``sliding_variant="triton"``, for tests).

  ``sliding_variant="auto"`` (default) takes the Triton one on CUDA where Triton is installed, else the compiled
  one; whoever holds the rows calls :func:`sliding_backend_partials` with the class's Choice, which runs the
  right one.
* ``"triton"`` — :mod:`lemmse_ray.kernels.triton_kernel`: the fused Triton kernel of the matrix-product kinds;
  float32 on CUDA (on the CPU only under ``TRITON_INTERPRET=1``, Triton's interpreter, for tests), the optional
  ``triton`` package, every statistic but top-k.

Requests (:data:`KERNELS`: the ``kernel=`` argument of :func:`lemmse_ray.estimate`,
:meth:`lemmse_ray.PatchBank.estimate`, :func:`~lemmse_ray.cluster.driver.estimate_on_ray`, the actors and
:mod:`lemmse_ray.cluster.plan`; ``--kernel`` and ``kernel:`` in YAML and study specs):

* ``"auto"`` (default) — per class, the sliding kernel where it can run (the compiled one on the CPU, the Triton
  one on CUDA), else Triton on a CUDA device where it can run, else torch;
* ``"torch"`` — torch for every class;
* ``"sliding"`` — the sliding kernel for the class it evaluates; the bank's other classes (e.g. the border
  classes under zero padding) use torch's matrix product.  Refused when the sliding kernel evaluates no class;
* ``"triton"`` — Triton for every matrix-product class; the mixture kind, and a request with top-k, use torch.
  Refused when Triton cannot run here.

A refused request raises :class:`KernelUnavailable` (a ``ValueError``) listing every backend's reasons, e.g.
``kernel='sliding' needs what this run lacks: sliding: computes in float32 only (dtype torch.float64);
keeps no top-k rows (stats include 'topk') | torch: available | triton: …``.  Where the device is not known yet
(``device=None``: the driver of Ray actors, which resolve again where they run) the reasons that depend on the
machine (device, packages, compiled libraries) are left to that later call.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..core.classes import ClassPlan
from ..core.partials import Partials
from ..core.statistics import unsupported
from . import epilogue, sliding

BACKENDS = ("torch", "sliding", "triton")
KERNELS = ("auto", *BACKENDS)
EPILOGUES = ("auto", "compiled", "torch")
#: Implementations of the sliding backend (``sliding_variant=`` of :func:`resolve` and :func:`image_class`):
#: ``"auto"`` takes ``"triton"`` on a CUDA device where Triton is installed, else ``"compiled"``.
SLIDING_VARIANTS = ("auto", "compiled", "triton")


class KernelUnavailable(ValueError):
    """A requested kernel cannot evaluate this run; the message lists every backend's reasons."""


@dataclass(frozen=True)
class Choice:
    """The backend of one class and its variant: for ``"torch"`` its epilogue (``"compiled"`` or ``"torch"``); for
    ``"sliding"``, ``"triton"`` names the Triton sliding kernel (:mod:`lemmse_ray.kernels.triton_sliding`, CUDA) and
    anything else (the default) the compiled C one (:mod:`lemmse_ray.kernels.sliding`, CPU) — see
    :data:`SLIDING_COMPILED`, :data:`SLIDING_TRITON` and :func:`sliding_backend_partials`."""

    backend: str
    epilogue: str = "torch"


#: The sliding class on the compiled C kernel (CPU).
SLIDING_COMPILED = Choice("sliding")
#: The sliding class on the Triton sliding kernel (CUDA; the CPU under Triton's interpreter).
SLIDING_TRITON = Choice("sliding", "triton")


def check_kernel(kernel: str, dtype: torch.dtype | None = None) -> str:
    """Validate the name ``kernel`` (one of :data:`KERNELS`) and, when ``dtype`` is given, that its backend
    computes in that dtype (the sliding and Triton kernels are float32 only); returns ``kernel``."""
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if dtype is not None and kernel in ("sliding", "triton") and dtype != torch.float32:
        raise KernelUnavailable(f"kernel={kernel!r} computes in float32 only, got dtype {dtype} "
                                "(use kernel='auto' or 'torch')")
    return kernel


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) in this process."""
    from .triton_kernel import interpreted  # imports triton: an optional dependency
    return interpreted()


def epilogue_library(requested: str, dtype: torch.dtype, device: torch.device | str) -> ctypes.CDLL | None:
    """The compiled epilogue library of the torch kernels for a request among :data:`EPILOGUES`, or None for
    the pure-torch epilogue: ``"auto"`` takes the compiled one for float32 on the CPU where it builds,
    ``"compiled"`` requires it, ``"torch"`` never uses it."""
    if requested not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {requested!r}")
    if requested == "torch":
        return None
    lib = epilogue.load() if dtype == torch.float32 and torch.device(device).type == "cpu" else None
    if lib is None and requested == "compiled":
        raise ValueError("epilogue='compiled' needs float32 on CPU and a working C compiler "
                         "(see lemmse_ray.kernels.compiled)")
    return lib


def pick_sliding_variant(requested: str, device: torch.device | str | None) -> str:
    """The implementation of the sliding backend for a request among :data:`SLIDING_VARIANTS` on ``device``:
    ``"compiled"`` or ``"triton"`` (``"auto"``: Triton on a CUDA device where the ``triton`` package is installed,
    else compiled; ``device=None``, not known yet: compiled, the caller resolving again where the work runs)."""
    if not isinstance(requested, str) or requested not in SLIDING_VARIANTS:
        raise ValueError(f"sliding_variant must be one of {SLIDING_VARIANTS}, got {requested!r}")
    if requested != "auto":
        return requested
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "triton" if on_cuda and triton_installed() else "compiled"


def _sliding_machine_reasons(variant: str, requested: str, device: torch.device) -> list[str]:
    """Why the sliding implementation ``variant`` cannot run on ``device`` (empty: it can)."""
    reasons = []
    if variant == "compiled":
        if device.type != "cpu":
            hint = (" (on CUDA the Triton sliding kernel needs the triton package, which is not installed here)"
                    if device.type == "cuda" and requested == "auto" else "")
            reasons.append(f"runs on the CPU, not {device.type}{hint}")
        if sliding.load() is None:
            reasons.append("needs its compiled library: a working C compiler (see lemmse_ray.kernels.compiled), and "
                           "LEMMSE_RAY_FUSED not set to 0")
    elif not triton_installed():
        reasons.append("the Triton sliding kernel needs the triton package (pip install 'lemmse_ray[triton]'), which "
                       "is not installed here")
    elif device.type != "cuda" and not triton_interpreted():
        reasons.append(f"the Triton sliding kernel runs on CUDA devices, not {device.type} (on the CPU only under "
                       "TRITON_INTERPRET=1, Triton's interpreter)")
    return reasons


def image_class(plan: ClassPlan, dtype: torch.dtype, device: torch.device | str | None = "cpu",
                sliding_variant: str = "auto") -> int | None:
    """The class of ``plan`` that a :class:`~lemmse_ray.PatchBank` should hold as images for the sliding kernel
    (None: none).

    It is the class :func:`lemmse_ray.kernels.sliding.eligible_class` finds, when the arithmetic is float32, the
    images have at most :data:`~lemmse_ray.kernels.sliding.MAX_CHANNELS` channels, the compiled sliding library
    builds here (it also fixes the lane width of :class:`~lemmse_ray.kernels.sliding.SlidingRows`), and the
    implementation :func:`pick_sliding_variant` picks for ``device`` can run there: the compiled kernel on the CPU,
    the Triton one on CUDA (see the module docstring).  ``device=None``: where the work runs is not known yet (a
    driver of Ray actors), and the checks of the machine are left to the actors."""
    if dtype != torch.float32 or plan.geometry.shape[0] > sliding.MAX_CHANNELS:
        return None
    if device is None:
        return sliding.eligible_class(plan)
    device = torch.device(device)
    variant = pick_sliding_variant(sliding_variant, device)
    if sliding.load() is None or _sliding_machine_reasons(variant, sliding_variant, device):
        return None
    return sliding.eligible_class(plan)


def _statistics_reasons(stats: tuple[str, ...], backend: str) -> list[str]:
    """The requested statistics ``backend`` does not produce (:data:`lemmse_ray.core.statistics.STATISTICS`
    declares which backends produce each one; top-k rows: torch only)."""
    return ["keeps no top-k rows (stats include 'topk')" if name == "topk" else f"does not compute {name!r}"
            for name in unsupported(stats, backend)]


def _sliding_reasons(plan: ClassPlan, images: int | None, dtype: torch.dtype,
                     device: torch.device | None, stats: tuple[str, ...], variant: str,
                     requested: str) -> list[str]:
    """Why the sliding kernel (implementation ``variant``) cannot evaluate this request (empty: it can, for class
    ``images``)."""
    reasons = []
    if dtype != torch.float32:
        reasons.append(f"computes in float32 only (dtype {dtype})")
    reasons += _statistics_reasons(stats, "sliding")
    if device is not None:
        reasons += _sliding_machine_reasons(variant, requested, device)
    if plan.geometry.shape[0] > sliding.MAX_CHANNELS:
        reasons.append(f"handles at most {sliding.MAX_CHANNELS} channels (the images have {plan.geometry.shape[0]})")
    if sliding.eligible_class(plan) is None:
        reasons.append("applies only to a class whitened by a multiple of the identity whose rows are all windows "
                       "of the images (e.g. denoising, circular padding or the interior under zero padding)")
    elif images is None and not reasons:
        reasons.append("this bank holds no images (it was built where the sliding kernel was unavailable)")
    return reasons


def _triton_reasons(plan: ClassPlan, dtype: torch.dtype, device: torch.device | None,
                    stats: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Why Triton cannot evaluate this request: (reasons that refuse an explicit request, reasons for which an
    explicit request still runs, on torch: the mixture kind and statistics it does not compute, e.g. top-k)."""
    refused, delegated = [], []
    if dtype != torch.float32:
        refused.append(f"computes in float32 only (dtype {dtype})")
    if device is not None:
        if not triton_installed():
            refused.append("needs the triton package (pip install 'lemmse_ray[triton]'), which is not installed "
                           "here")
        elif device.type != "cuda" and not triton_interpreted():
            refused.append(f"runs on CUDA devices, not {device.type} (on the CPU only under TRITON_INTERPRET=1, "
                           "Triton's interpreter)")
    if plan.kind == "mixture":
        delegated.append("evaluates matrix products only, not the per-pixel mixture (random-mask agnostic "
                         "inpainting)")
    delegated += _statistics_reasons(stats, "triton")
    return refused, delegated


def _refuse(kernel: str, reasons: dict[str, list[str]]) -> KernelUnavailable:
    listed = " | ".join(f"{name}: {'; '.join(reasons[name]) or 'available'}" for name in
                        (kernel, *(b for b in BACKENDS if b != kernel)))
    return KernelUnavailable(f"kernel={kernel!r} needs what this run lacks: {listed} "
                             "(kernel='auto' chooses among the available ones)")


def resolve(kernel: str, plan: ClassPlan, *, dtype: torch.dtype, device: torch.device | str | None,
            stats: Iterable[str] = (), images: int | None = None,
            sliding_variant: str = "auto") -> dict[int, Choice]:
    """The backend of every class of ``plan`` for a request ``kernel`` (see the module docstring).

    Args:
        kernel: one of :data:`KERNELS`.
        plan: the bank's classes.
        dtype: the kernel arithmetic (torch.float32 or torch.float64).
        device: where the classes are evaluated; None where it is not known yet (the checks that depend on the
            machine are then left out: the caller resolves again where the work runs).
        stats: the requested statistics (top-k is kept by torch only).
        images: the class the bank holds as images for the sliding kernel (:func:`image_class`), or None.
        sliding_variant: the implementation of the sliding backend, one of :data:`SLIDING_VARIANTS` (default
            ``"auto"``: the Triton one on CUDA where Triton is installed, else the compiled one; ``"triton"`` on
            the CPU runs under Triton's interpreter only, for tests).

    Returns:
        {class: :class:`Choice`} for every class of ``plan``; the sliding class, if any, :data:`SLIDING_COMPILED`
        or :data:`SLIDING_TRITON` (run it with :func:`sliding_backend_partials`).

    Raises:
        KernelUnavailable: when ``kernel`` is explicit and cannot run, listing every backend's reasons.
    """
    check_kernel(kernel)
    stats = tuple(stats)
    device = None if device is None else torch.device(device)
    variant = pick_sliding_variant(sliding_variant, device)
    triton_refused, triton_delegated = _triton_reasons(plan, dtype, device, stats)
    reasons = {"torch": [], "sliding": _sliding_reasons(plan, images, dtype, device, stats, variant,
                                               sliding_variant),
               "triton": triton_refused + triton_delegated}
    if (kernel == "sliding" and reasons["sliding"]) or (kernel == "triton" and triton_refused):
        raise _refuse(kernel, reasons)
    use_sliding = kernel in ("auto", "sliding") and not reasons["sliding"]
    use_triton = not reasons["triton"] and (kernel == "triton" or (
        kernel == "auto" and device is not None and device.type == "cuda"))
    library = None if device is None else epilogue_library("auto", dtype, device)
    choices = {}
    for c in range(plan.n_classes):
        if use_sliding and c == images:
            choices[c] = SLIDING_TRITON if variant == "triton" else SLIDING_COMPILED
        elif use_triton:
            choices[c] = Choice("triton")
        else:
            choices[c] = Choice("torch", "torch" if library is None else "compiled")
    return choices


def sliding_backend_partials(choice: Choice, rows: sliding.SlidingRows, z: torch.Tensor, sigma: float,
                             stats: Iterable[str] = (), threads: int | None = None, **blocks: int) -> Partials:
    """Partials (float32, natural logarithms) of every window of every estimator input ``z`` (B, C, H, W) over
    the rows of the sliding class, by the implementation its :class:`Choice` (from :func:`resolve`) names: the one
    call for whoever holds the class's :class:`~lemmse_ray.kernels.sliding.SlidingRows`.

    * :data:`SLIDING_COMPILED` — :func:`lemmse_ray.kernels.sliding.sliding_partials` (``rows`` and ``z`` on the
      CPU; ``threads``: its OpenMP threads);
    * :data:`SLIDING_TRITON` — :func:`lemmse_ray.kernels.triton_sliding.triton_sliding_partials` on ``z``'s
      device (CUDA; the CPU under ``TRITON_INTERPRET=1``); ``rows`` are moved there first where they are not
      (:meth:`~lemmse_ray.kernels.sliding.SlidingRows.to`: keep them on the device to move them once);
      ``blocks``: its tile (:func:`lemmse_ray.kernels.triton_sliding.default_blocks`), for benchmarks and tests.

    The query order is (image, window row, window column), the windows of
    :func:`lemmse_ray.kernels.sliding.query_windows`.  ``stats``: any statistics but top-k.  A call the kernel
    cannot serve is refused by a one-line ValueError naming the argument.
    """
    if not isinstance(choice, Choice) or choice.backend != "sliding":
        raise ValueError(f"choice must be a Choice of the sliding backend, got {choice!r}")
    stats = tuple(stats)
    if choice.epilogue != "triton":
        if blocks:
            raise ValueError(f"blocks ({', '.join(blocks)}) tile the Triton sliding kernel, not the compiled one")
        return sliding.sliding_partials(rows, z, sigma, stats, threads=threads)
    from .triton_sliding import triton_sliding_partials  # optional: triton

    if isinstance(rows, sliding.SlidingRows) and isinstance(z, torch.Tensor) \
            and isinstance(rows.keys, torch.Tensor) and isinstance(rows.values, torch.Tensor):
        rows = rows.to(z.device)
    return triton_sliding_partials(rows, z, sigma, stats, **blocks)
