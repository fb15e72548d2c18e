"""Which kernel evaluates the matrix-product logit forms (whitened and random-mask aware).

``kernel`` (an argument of :func:`lemmse_ray.estimate`, :func:`lemmse_ray.bank.features.scan` and the Ray actors):

* ``"torch"`` — :func:`lemmse_ray.kernels.torch_kernels.matmul_partials`: any device, float32 or float64, every statistic.
* ``"triton"`` — the fused kernel of :mod:`lemmse_ray.kernels.triton_kernel` (optional ``triton`` package): float32 on
  CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).  A call that asks for
  ``"topk"`` runs on the torch kernel (the fused kernel keeps no top-k).
* ``"auto"`` (default) — ``"triton"`` when the bank rows are float32 on a CUDA device and Triton is installed,
  ``"torch"`` otherwise (always on the CPU).

The per-pixel mixture kernel (random-mask agnostic inpainting) always runs on torch.

The in-memory API (:class:`lemmse_ray.PatchBank`, :func:`lemmse_ray.estimate`) has one more choice,
``"sliding"``, and its ``"auto"`` uses it where it applies: the compiled CPU kernel of
:mod:`lemmse_ray.kernels.sliding` for a class whitened by a multiple of the identity whose rows are all the windows of
the images (no matrix product; float32; every statistic but top-k).
"""

from __future__ import annotations

import importlib.util

import torch

from ..core.partials import Partials

KERNELS = ("auto", "torch", "triton")


IN_MEMORY_KERNELS = (*KERNELS, "sliding")  # PatchBank.estimate and lemmse_ray.estimate


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_kernel(kernel: str, dtype: torch.dtype = torch.float32, choices: tuple[str, ...] = KERNELS) -> str:
    """Validate ``kernel`` among ``choices`` for arithmetic in ``dtype`` (the Triton and sliding kernels are
    float32 only)."""
    if not isinstance(kernel, str) or kernel not in choices:
        raise ValueError(f"kernel must be one of {choices}, got {kernel!r}")
    if kernel in ("triton", "sliding") and dtype != torch.float32:
        raise ValueError(f"kernel={kernel!r} computes in float32 only, got dtype {dtype} (use kernel='torch')")
    return kernel


def check_triton_runs(device: torch.device | str) -> None:
    """Raise ValueError unless the Triton kernel can run on ``device`` here (installed; CUDA or interpreter)."""
    if not triton_installed():
        raise ValueError("kernel='triton' needs the triton package (pip install 'lemmse_ray[triton]'), "
                         "which is not installed here")
    if torch.device(device).type != "cuda":
        from .triton_kernel import interpreted
        if not interpreted():
            raise ValueError(f"kernel='triton' runs on CUDA devices, not {device} (on the CPU only under "
                             "TRITON_INTERPRET=1, Triton's interpreter)")


def use_triton(kernel: str, k_feat: torch.Tensor, stats: tuple[str, ...]) -> bool:
    """Whether a matrix-product scan of rows ``k_feat`` with ``stats`` runs on the Triton kernel (raises
    ValueError when ``kernel="triton"`` cannot run here)."""
    if kernel == "torch" or "topk" in stats:
        return False
    if kernel == "triton":
        check_triton_runs(k_feat.device)
        return True
    return k_feat.is_cuda and k_feat.dtype == torch.float32 and triton_installed()


def fused_partials(q_feat: torch.Tensor, k_feat: torch.Tensor, values: torch.Tensor, shift: torch.Tensor,
                   stats: tuple[str, ...] = ()) -> Partials:
    """:func:`lemmse_ray.kernels.triton_kernel.triton_matmul_partials` (imports Triton on first use)."""
    from .triton_kernel import triton_matmul_partials
    return triton_matmul_partials(q_feat, k_feat, values, shift, stats)
