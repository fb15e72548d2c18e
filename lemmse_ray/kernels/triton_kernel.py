r"""Fused Triton kernel for the matrix-product logit forms (imported lazily: Triton is an optional dependency).

For queries with features :math:`Q_f` (M, F), bank rows with features :math:`K_f` (R, F) and values
:math:`v` (R, C), the logits are :math:`s = Q_f K_f^\top` (+ a per-query shift added afterwards, as in
:func:`lemmse_ray.kernels.torch_kernels.matmul_partials`).  The rows are cut into ``n_splits`` contiguous ranges (split-K,
as in flash-decoding: a handful of queries against many rows still gives every GPU core a program).  One
program handles one block of ``block_m`` queries and one range of rows, ``block_n`` rows at a time, and keeps
per query, in base 2 (:math:`s_2 = s\log_2 e`, so that :math:`2^{s_2-m_2} = e^{s-m}`),

.. math::
    m \leftarrow \max(m, \max_r s_{2,r}),\quad \alpha = 2^{m_\text{old}-m},\quad p_r = 2^{s_{2,r}-m},

    [o, l, o_2] \leftarrow \alpha [o, l, o_2] + p\,[v, 1, v^2],\quad
    l_2 \leftarrow \alpha^2 l_2 + \textstyle\sum_r p_r^2,\quad
    l_s \leftarrow \alpha l_s + \textstyle\sum_r p_r s_{2,r},

the logits tile and the weighted sums never leaving the chip.  Each range gives one
:class:`~lemmse_ray.core.partials.Partials` (:math:`m` and :math:`l_s` converted back to natural units); the ranges
are merged exactly by :func:`lemmse_ray.core.partials.merge` (a pairwise tree) and the shift is added last.  Top-k
is not computed here (see :mod:`lemmse_ray.kernels.resolver`).

Products, ``precision``:

* ``"ieee"`` — full float32 products (``tl.dot(..., input_precision="ieee")``).
* ``"tf32x3"`` — each float32 operand :math:`a` is split as :math:`a = a_h + a_l + \epsilon` with
  :math:`a_h = \operatorname{tf32}(a)`, :math:`a_l = \operatorname{tf32}(a - a_h)` (round to nearest,
  11 significant bits, :math:`|\epsilon| \le 2^{-22}|a|`), and :math:`ab \approx a_l b_h + a_h b_l + a_h b_h`,
  three tensor-core products of exactly representable TF32 inputs accumulated in float32 (the dropped
  :math:`a_l b_l` is :math:`\le 2^{-22}|ab|`): float32-level accuracy at tensor-core speed.  The split is
  written out here (rather than Triton's built-in ``"tf32x3"``) so that its inputs are exactly TF32 and the
  interpreter, whose products are plain float32, reproduces the GPU's product values.

Only float32 is supported (float64 stays on the torch path).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..core.partials import LN2, LOG2E, Partials, add_shift, merge, merge_into
from ..core.statistics import sums_of, unsupported

PRECISIONS = ("ieee", "tf32x3")


@triton.jit
def _tf32(x):
    """Round float32 to the nearest TF32 (10 explicit mantissa bits, ties away from zero)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, TF32X3: tl.constexpr):
    """``acc + a @ b`` in float32: exact products (ieee) or three TF32 tensor-core products (see module doc)."""
    if TF32X3:
        a_hi = _tf32(a)
        b_hi = _tf32(b)
        a_lo = _tf32(a - a_hi)
        b_lo = _tf32(b - b_hi)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _partials_kernel(q_ptr, k_ptr, v_ptr, m_ptr, acc_ptr, l2_ptr, ls_ptr, M, R, F, C, rows_per_split,
                     WANT_VAR: tl.constexpr, WANT_L2: tl.constexpr, WANT_LS: tl.constexpr,
                     TF32X3: tl.constexpr, SINGLE_F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_F: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < M
    offs_f = tl.arange(0, BLOCK_F)
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * F
    if SINGLE_F:
        q_tile = tl.load(q_rows + offs_f[None, :], mask=valid_m[:, None] & (offs_f[None, :] < F), other=0.0)
    # augmented values [v, 1, v²] (columns 0..C−1, C, C+1..2C), built in registers from v (R, C)
    offs_w = tl.arange(0, BLOCK_W)
    is_v = offs_w < C
    is_one = offs_w == C
    if WANT_VAR:
        is_sq = (offs_w > C) & (offs_w <= 2 * C)
        width = 2 * C + 1
    else:
        is_sq = offs_w < 0
        width = C + 1
    col = tl.where(is_v, offs_w, tl.where(is_sq, offs_w - C - 1, 0))

    row_lo = split * rows_per_split
    row_hi = tl.minimum(R, row_lo + rows_per_split)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
    l2_i = tl.zeros((BLOCK_M,), tl.float32)
    ls_i = tl.zeros((BLOCK_M,), tl.float32)
    for r0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = r0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < row_hi
        k_rows = k_ptr + offs_n.to(tl.int64)[:, None] * F
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if SINGLE_F:
            k_tile = tl.load(k_rows + offs_f[None, :], mask=valid_n[:, None] & (offs_f[None, :] < F), other=0.0)
            s = _dot(q_tile, tl.trans(k_tile), s, TF32X3)
        else:
            for f0 in range(0, F, BLOCK_F):
                f = f0 + offs_f
                q_chunk = tl.load(q_rows + f[None, :], mask=valid_m[:, None] & (f[None, :] < F), other=0.0)
                k_chunk = tl.load(k_rows + f[None, :], mask=valid_n[:, None] & (f[None, :] < F), other=0.0)
                s = _dot(q_chunk, tl.trans(k_chunk), s, TF32X3)
        s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a valid row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_ptr + offs_n.to(tl.int64)[:, None] * C + col[None, :],
                    mask=valid_n[:, None] & (is_v | is_sq)[None, :], other=0.0)
        v = tl.where(is_sq[None, :], v * v, v)
        v = tl.where(is_one[None, :] & valid_n[:, None], 1.0, v)
        acc = _dot(p, v, acc * alpha[:, None], TF32X3)
        if WANT_L2:
            l2_i = l2_i * alpha * alpha + tl.sum(p * p, axis=1)
        if WANT_LS:
            ls_i = ls_i * alpha + tl.sum(p * tl.where(valid_n[None, :], s, 0.0), axis=1)
        m_i = m_new

    out = split.to(tl.int64) * M + offs_m
    tl.store(m_ptr + out, m_i, mask=valid_m)
    tl.store(acc_ptr + out[:, None] * width + offs_w[None, :], acc, mask=valid_m[:, None] & (offs_w[None, :] < width))
    if WANT_L2:
        tl.store(l2_ptr + out, l2_i, mask=valid_m)
    if WANT_LS:
        tl.store(ls_ptr + out, ls_i, mask=valid_m)


def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    return type(_partials_kernel).__name__ == "InterpretedFunction"


def default_splits(n_queries: int, n_rows: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Row ranges so that (query blocks × ranges) ≈ 4 programs per GPU core, each range ≥ 8 row tiles."""
    if device.type != "cuda":
        return 1
    cores = torch.cuda.get_device_properties(device).multi_processor_count
    m_blocks = triton.cdiv(n_queries, block_m)
    return max(1, min(triton.cdiv(4 * cores, m_blocks), triton.cdiv(n_rows, 8 * block_n)))


def _merge_splits(part: Partials, n_splits: int, n: int) -> Partials:
    """Merge a partial laid out as ``n_splits`` consecutive runs of ``n`` queries, pairwise (log₂ depth)."""
    while n_splits > 1:
        half = n_splits // 2
        merged = merge(part.select(slice(0, half * n)), part.select(slice(half * n, 2 * half * n)))
        if n_splits % 2:
            merge_into(merged, slice(0, n), part.select(slice(2 * half * n, None)))
        part, n_splits = merged, half
    return part


def _power_of_two(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def triton_matmul_partials(q_feat: torch.Tensor, k_feat: torch.Tensor, values: torch.Tensor,
                           shift: torch.Tensor, stats: tuple[str, ...] = (), precision: str = "ieee",
                           n_splits: int | None = None, block_m: int = 64, block_n: int = 64,
                           block_f: int | None = None, num_warps: int = 4, num_stages: int = 2) -> Partials:
    r"""Partials for :math:`s = Q_f K_f^\top + \text{shift}`, fused (see the module docstring).

    Same contract as :func:`lemmse_ray.kernels.torch_kernels.matmul_partials` without top-k: ``q_feat`` (M, F),
    ``k_feat`` (R, F), ``values`` (R, C), ``shift`` (M,), all float32 on one device (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``).  ``stats``: any statistics of :data:`lemmse_ray.core.statistics.STATISTICS` but
    top-k (it accumulates the sums they need).  ``n_splits``: row ranges (default: :func:`default_splits`);
    ``block_f``: feature chunk (default: the whole padded width up to 128, else 64).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if refused := unsupported(stats, "triton"):
        raise ValueError(f"stats: the Triton kernel does not compute {', '.join(refused)} (it keeps no top-k rows: "
                         "use the torch kernel)")
    tensors = {"q_feat": q_feat, "k_feat": k_feat, "values": values, "shift": shift}
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 for the Triton kernel, got {t.dtype}")
        if t.device != q_feat.device:
            raise ValueError(f"{name} is on {t.device}, q_feat on {q_feat.device}")
    if q_feat.device.type != "cuda" and not interpreted():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before importing it)")
    n, width_f = q_feat.shape
    n_rows, channels = values.shape
    if k_feat.shape != (n_rows, width_f) or shift.shape != (n,):
        raise ValueError(f"shapes do not agree: q_feat {tuple(q_feat.shape)}, k_feat {tuple(k_feat.shape)}, "
                         f"values {tuple(values.shape)}, shift {tuple(shift.shape)}")
    device = q_feat.device
    if n_splits is None:
        n_splits = default_splits(n, n_rows, block_m, block_n, device)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_splits), block_n) * block_n
    n_splits = triton.cdiv(n_rows, rows_per_split)  # every range non-empty
    if block_f is None:
        block_f = _power_of_two(width_f) if width_f <= 128 else 64
    sums = sums_of(stats)
    want_var, want_l2, want_ls = "o2" in sums, "l2" in sums, "ls" in sums
    width = channels + 1 + (channels if want_var else 0)

    q = (q_feat * LOG2E).contiguous()
    empty = lambda *shape: torch.empty(shape, dtype=torch.float32, device=device)  # noqa: E731
    m2, acc = empty(n_splits * n), empty(n_splits * n, width)
    l2 = empty(n_splits * n) if want_l2 else m2  # unused pointer when not requested
    ls2 = empty(n_splits * n) if want_ls else m2
    grid = (triton.cdiv(n, block_m), n_splits)
    _partials_kernel[grid](q, k_feat.contiguous(), values.contiguous(), m2, acc, l2, ls2, n, n_rows, width_f,
                           channels, rows_per_split, WANT_VAR=want_var, WANT_L2=want_l2, WANT_LS=want_ls,
                           TF32X3=precision == "tf32x3", SINGLE_F=block_f >= width_f, BLOCK_M=block_m,
                           BLOCK_N=block_n, BLOCK_F=block_f, BLOCK_W=_power_of_two(width),
                           num_warps=num_warps, num_stages=num_stages)
    part = Partials(m=m2 * LN2, l=acc[:, channels].contiguous(), o=acc[:, :channels].contiguous(),
                    o2=acc[:, channels + 1:].contiguous() if want_var else None, l2=l2 if want_l2 else None,
                    ls=ls2 * LN2 if want_ls else None)
    return add_shift(_merge_splits(part, n_splits, n), shift)
