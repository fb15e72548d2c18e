r"""Triton version of the sliding-window kernel (imported lazily: Triton is an optional dependency).

It computes what :func:`lemmse_ray.kernels.sliding.sliding_partials` computes, from the same
:class:`~lemmse_ray.kernels.sliding.SlidingRows` (moved to the device with :meth:`SlidingRows.to`): for every
window :math:`i=(i_y,i_x)` of the query image :math:`Z = w z` (padded circularly under circular padding, as
:meth:`SlidingRows.query_images` does; the interior windows only under zero padding) and every window
:math:`j=(j_y,j_x)` of every key image :math:`K_n` of the bank,

.. math:: D(i, j) = \sum_{o_y=0}^{P-1} R_{i_y+o_y,\ j_y+o_y}(i_x, j_x),\qquad
          R_{a,b}(i_x, j_x) = \sum_{c}\sum_{o_x=0}^{P-1} \bigl(Z_{c,a,i_x+o_x} - K_{n,c,b,j_x+o_x}\bigr)^2,

formed from differences (no :math:`\lVert q\rVert^2+\lVert k\rVert^2-2q\cdot k` cancellation), in float32 on
CUDA cores (no TF32, fp16 or bf16 anywhere).  A row block :math:`R_{a,b}` serves the :math:`P` pairs of query
and key rows :math:`(a-o_y, b-o_y)` on the diagonal :math:`\delta = i_y - j_y = a - b`: a program walks each
diagonal key row by key row, computes each row block once (``block_t`` of its :math:`CP` terms
:math:`(c, o_x)` at a time) and keeps the last :math:`P` in a ring of registers (row block :math:`b` in slot
:math:`b \bmod P`), so that a pair costs about :math:`2CP + 2P` operations instead of the :math:`2CP^2` of a
direct sum (plus :math:`P-1` row blocks to fill the ring on each diagonal).

One program owns a tile of ``block_y`` × ``block_x`` query windows of one query image and one range of
``groups_per_split`` lane groups of the bank; it takes the rows of a group ``block_r`` at a time, in the order
of their memory (window column, then lane: image :math:`Lg + k` in lane :math:`k` of group :math:`g`; lanes
beyond ``rows.n_images`` count as absent).  Per query it keeps the online log-sum-exp state of the C kernel, in
base 2 with the running *minimum distance* :math:`d_\min` as the reference, so that
:math:`s - m = (D - d_\min)\,\kappa` with :math:`\kappa = -\log_2 e/2\sigma^2` is formed without cancellation.
On a tile of rows with distances :math:`D_r` and values :math:`v_r`,

.. math::
    d' = \min(d_\min, \min_r D_r),\quad t = (d_\min - d')\kappa \le 0,\quad \alpha = 2^t,\quad
    e_r = 2^{(D_r - d')\kappa},

    [l, o_c, o_{2,c}] \leftarrow \alpha\,[l, o_c, o_{2,c}] + \textstyle\sum_r e_r\,[1, v_{r,c}, v_{r,c}^2],\quad
    l_2 \leftarrow \alpha^2 l_2 + \textstyle\sum_r e_r^2,\quad
    l_s \leftarrow \alpha\,(l_s + t\,l) + \textstyle\sum_r e_r (D_r - d')\kappa,

the sums in brackets being one float32 product ``tl.dot(e, [1, v, v²], input_precision="ieee")``.  The states
stay in registers for the whole program (no read-modify-write of global memory, no atomics), and are written
once, as the C kernel's ``[d_min, l, o, (o2), (l2), (ls)]``: :func:`lemmse_ray.kernels.sliding.states_to_partials`
turns them into :class:`~lemmse_ray.core.partials.Partials` (natural logarithms, float64), the ranges of groups
are merged by :func:`lemmse_ray.core.partials.merge` in range order, and the result is rounded to float32 as the
C kernel's is.

Reduction order.  It is fixed by the sizes and by ``groups_per_split``, ``block_r``, ``block_t`` and
``num_warps`` (the trees of ``tl.reduce`` and ``tl.dot`` are fixed when the kernel is compiled), never by the
number of programs, their scheduling or the device's load: each query's state is owned by one program per range
of groups; its folds come in the order lane groups ascending, tiles of ``block_r`` rows ascending, diagonals
:math:`\delta` ascending (key rows :math:`j_y = i_y - \delta` descending), whatever tile of queries holds it
(``block_y`` and ``block_x`` change no bit); within a fold the :math:`P` ring slots and the rows of the tile are
reduced by fixed trees; the ranges are merged in order.  The default ``groups_per_split`` depends on the bank
only (as the C kernel's chunks).  Up to the device's ``exp2`` (``ex2.approx`` on NVIDIA GPUs: relative error below
:math:`2^{-22}`; terms below :math:`2^{-126}` of the largest flushed to 0, which changes :math:`l \ge 1` by
less than float32's rounding unit for any bank below :math:`2^{100}` rows), the result agrees with the C kernel
within float32 rounding.  Top-k rows are not kept.

Validation mirrors :func:`lemmse_ray.kernels.sliding.check_arguments` (a Triton kernel trusts every size it
is given): :func:`check_arguments` refuses, on one line naming the argument, a call the kernel could not
serve within its buffers.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import fields

import torch
import triton
import triton.language as tl

from ..core.partials import LOG2E, Partials, merge
from ..core.statistics import sums_of, unsupported
from .sliding import SlidingRows, check_layout, states_to_partials

#: Largest number of ranges of lane groups (programs along the bank) of the default split.
MAX_SPLITS = 64


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


# The combine functions of tl.sum and tl.min where Triton has them: the same reductions compiled, and in Triton's
# interpreter evaluated by numpy at once (tl.sum and tl.min are jit functions, each call of which re-patches the
# language there: milliseconds).
ADD = getattr(tl.standard, "_sum_combine", _add)
MIN = getattr(tl.standard, "_elementwise_min", _min)


@triton.jit
def _sliding_kernel(a_ptr, k_ptr, v_ptr, out_ptr, C, HA, WA, HB, WB, L, n_images, n_groups, n_img, nqy, nqx,
                    nby, nbx, n_blocks_y, n_blocks_x, groups_per_split, F, scale,
                    P: tl.constexpr, WANT_VAR: tl.constexpr, WANT_L2: tl.constexpr, WANT_LS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    # index arithmetic in int64 (Triton's interpreter checks every int32 operation for overflow: slow)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    lanes = tl.cast(L, tl.int64)
    wa = tl.cast(WA, tl.int64)
    a_chan = tl.cast(HA, tl.int64) * wa  # channel stride of the query images
    k_row_stride = tl.cast(WB, tl.int64) * lanes
    k_chan = tl.cast(HB, tl.int64) * k_row_stride  # channel stride of the keys
    width_r = tl.cast(nbx, tl.int64) * lanes  # (window column, lane) pairs of one key row, lane fastest
    v_chan = tl.cast(nby, tl.int64) * width_r  # channel stride of the values
    img = pid // (n_blocks_y * n_blocks_x)
    tile = pid % (n_blocks_y * n_blocks_x)
    iy0 = (tile // n_blocks_x) * BLOCK_Y
    iy_hi = tl.minimum(tl.cast(nqy, tl.int64), iy0 + BLOCK_Y)
    offs_y = tl.arange(0, BLOCK_Y)
    offs_x = (tile % n_blocks_x) * BLOCK_X + tl.arange(0, BLOCK_X)
    valid_x = offs_x < nqx
    slots = tl.arange(0, BLOCK_P)
    terms = tl.arange(0, BLOCK_T).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    # the weighted sums [l, o_c, o2_c] = sum_r e_r [1, v_rc, v_rc^2]: the columns w of one product e @ [1, v, v^2]
    offs_w = tl.arange(0, BLOCK_W)
    is_v = (offs_w >= 1) & (offs_w <= C)
    if WANT_VAR:
        is_sq = (offs_w > C) & (offs_w <= 2 * C)
    else:
        is_sq = offs_w < 0
    is_one = offs_w == 0
    channel = tl.where(is_v, offs_w - 1, tl.where(is_sq, offs_w - 1 - C, 0)).to(tl.int64)

    dmin = tl.full((BLOCK_Y, BLOCK_X), float("inf"), tl.float32)
    sums = tl.full((BLOCK_Y, BLOCK_X, BLOCK_W), 0.0, tl.float32)
    l2_sum = tl.full((BLOCK_Y, BLOCK_X), 0.0, tl.float32)
    ls_sum = tl.full((BLOCK_Y, BLOCK_X), 0.0, tl.float32)

    n_terms = C * P
    # the first BLOCK_T terms (c, o_x) of a row block: (BLOCK_T, BLOCK_X) pointers into the query image at row 0
    c_t = terms // P
    ox_t = terms - c_t * P
    live_t = terms < n_terms
    a_img = a_ptr + img * C * a_chan + offs_x  # (BLOCK_X,): the query columns at row 0
    a_first = a_img[None, :] + (c_t * a_chan + ox_t)[:, None]
    a_first_mask = live_t[:, None] & valid_x[None, :]
    g0 = split * groups_per_split
    g1 = tl.minimum(tl.cast(n_groups, tl.int64), g0 + groups_per_split)
    k_grp = k_ptr + g0 * C * k_chan
    v_grp = v_ptr + g0 * C * v_chan
    lane0 = g0 * lanes  # the bank image in lane 0 of the group
    for _g in range(g0, g1):
        for r0 in range(0, width_r, BLOCK_R):
            p = r0 + offs_r
            in_row = p < width_r
            valid_r = in_row & (p % lanes < n_images - lane0)
            valid_rows = valid_r[None, :]
            k_cols = k_grp + p  # (BLOCK_R,): the key columns at row 0
            k_first = k_cols[None, :] + (c_t * k_chan + ox_t * lanes)[:, None]  # (BLOCK_T, BLOCK_R)
            k_first_mask = live_t[:, None] & in_row[None, :]
            v_cols = v_grp + channel[None, :] * v_chan + p[:, None]  # (BLOCK_R, BLOCK_W) values at row 0
            v_mask = valid_r[:, None] & (is_v | is_sq)[None, :]
            ring = tl.full((BLOCK_P, BLOCK_X, BLOCK_R), 0.0, tl.float32)
            for delta in range(iy0 - nby + 1, iy_hi):  # iy - jy
                jy0 = tl.maximum(0, iy0 - delta)
                jy1 = tl.minimum(tl.cast(nby, tl.int64), iy_hi - delta)
                for b in range(jy0, jy1 + P - 1):  # key row b against query row b + delta
                    a_at = (b + delta) * wa
                    k_at = b * k_row_stride
                    zq = tl.load(a_first + a_at, mask=a_first_mask, other=0.0)
                    kk = tl.load(k_first + k_at, mask=k_first_mask, other=0.0)
                    diff = zq[:, :, None] - kk[:, None, :]  # (BLOCK_T, BLOCK_X, BLOCK_R)
                    blk = tl.reduce(diff * diff, 0, ADD)
                    for t0 in range(BLOCK_T, n_terms, BLOCK_T):  # the further terms, BLOCK_T at a time
                        term = t0 + terms
                        c = term // P
                        ox = term - c * P
                        live = term < n_terms
                        zq = tl.load(a_img[None, :] + (a_at + c * a_chan + ox)[:, None],
                                     mask=live[:, None] & valid_x[None, :], other=0.0)
                        kk = tl.load(k_cols[None, :] + (k_at + c * k_chan + ox * lanes)[:, None],
                                     mask=live[:, None] & in_row[None, :], other=0.0)
                        diff = zq[:, :, None] - kk[:, None, :]
                        blk += tl.reduce(diff * diff, 0, ADD)
                    # slot b mod P: which slot holds which o_y depends on the key row only, not on the tile
                    ring = tl.where((slots == b % P)[:, None, None], blk[None, :, :], ring)
                    if b - jy0 >= P - 1:  # the ring holds the P row blocks of query row jy + delta, key row jy
                        jy = b - (P - 1)
                        sel = (offs_y == jy + delta - iy0)[:, None]
                        dist = tl.where(valid_rows, tl.reduce(ring, 0, ADD), float("inf"))
                        d_old = tl.reduce(tl.where(sel, dmin, float("inf")), 0, MIN)
                        d_new = tl.minimum(d_old, tl.reduce(dist, 1, MIN))
                        d_ref = tl.where(d_new < float("inf"), d_new, 0.0)
                        d_from = tl.where(d_old < float("inf"), d_old, d_ref)  # no row yet: the sums are 0
                        t = (d_from - d_ref) * scale
                        alpha = tl.exp2(t)
                        arg = (dist - d_ref[:, None]) * scale  # -inf on rows outside the bank
                        e = tl.exp2(arg)
                        if WANT_L2:
                            l2_new = alpha * alpha * l2_sum + tl.reduce(e * e, 1, ADD)[None, :]
                            l2_sum = tl.where(sel, l2_new, l2_sum)
                        if WANT_LS:
                            l_old = tl.reduce(tl.where(is_one, sums, 0.0), 2, ADD)
                            ls_new = alpha * (ls_sum + tl.maximum(t, -200.0) * l_old) \
                                + tl.reduce(e * tl.where(valid_rows, arg, 0.0), 1, ADD)[None, :]
                            ls_sum = tl.where(sel, ls_new, ls_sum)
                        vals = tl.load(v_cols + jy * width_r, mask=v_mask, other=0.0)
                        vals = tl.where(is_one[None, :], 1.0, tl.where(is_sq[None, :], vals * vals, vals))
                        weighted = tl.dot(e, vals, input_precision="ieee")  # (BLOCK_X, BLOCK_W)
                        sums = tl.where(sel[:, :, None], alpha[None, :, None] * sums + weighted[None, :, :], sums)
                        dmin = tl.where(sel, d_new[None, :], dmin)
        k_grp += C * k_chan
        v_grp += C * v_chan
        lane0 += lanes

    iy = iy0 + offs_y
    q_mask = (iy < nqy)[:, None] & valid_x[None, :]
    at = out_ptr + (((split * n_img + img) * nqy + iy[:, None]) * nqx + offs_x[None, :]) * F
    tl.store(at, dmin, mask=q_mask)
    n_sums = 1 + C * (1 + WANT_VAR)
    tl.store(at[:, :, None] + 1 + offs_w[None, None, :], sums, mask=q_mask[:, :, None] & (offs_w < n_sums)[None, None, :])
    if WANT_L2:
        tl.store(at + 1 + n_sums, l2_sum, mask=q_mask)
    if WANT_LS:
        tl.store(at + F - 1, ls_sum, mask=q_mask)


def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    return type(_sliding_kernel).__name__ == "InterpretedFunction"


def _power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def default_blocks(patch_size: int, channels: int) -> dict[str, int]:
    """The default tile: ``block_y`` × ``block_x`` = 16 × 16 query windows (``block_y`` 8 or 4 where the weighted
    sums of many channels make the per-query state large) against ``block_r`` = 32 rows, ``block_t`` = 8 of the
    :math:`CP` terms of a row block at a time (fewer where :math:`CP` is smaller), 4 warps.  Compiled for sm_90
    these keep every value in registers up to 3 channels (no spill); they are a starting point, not a tuning."""
    width = max(16, _power_of_two(1 + 2 * channels))  # the columns [1, v, v²] of the weighted sums
    return {"block_y": max(4, min(16, 4096 // (16 * width))), "block_x": 16, "block_r": 32,
            "block_t": min(8, _power_of_two(channels * patch_size)), "num_warps": 4}


def default_groups_per_split(n_groups: int) -> int:
    """Lane groups per range: at most :data:`MAX_SPLITS` ranges; a function of the bank only."""
    return max(1, -(-n_groups // MAX_SPLITS))


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return (f"a {'contiguous' if value.is_contiguous() else 'non-contiguous'} {value.dtype} tensor of shape "
                f"{tuple(value.shape)} on {value.device}")
    return f"a {type(value).__name__}"


def _positive_int(label: str, value: object, power_of_two: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (power_of_two and value & (value - 1)):
        kind = "a positive power of two" if power_of_two else "a positive integer"
        raise ValueError(f"{label} must be {kind}, got {value!r}")


def check_arguments(rows: SlidingRows, z: torch.Tensor, sigma: float, groups_per_split: int,
                    blocks: dict[str, int], max_floats: int) -> None:
    """Refuse (ValueError naming the argument, one line) a call of :func:`triton_sliding_partials` that would
    make the kernel read or write outside its buffers, or compute garbage.

    As :func:`lemmse_ray.kernels.sliding.check_arguments` for the compiled kernel, except that the tensors are
    on one device, CUDA (or the CPU under ``TRITON_INTERPRET=1``), and the interleaving width is any: the keys
    and values are contiguous 5-D float32 tensors, the values the windows of the keys, with at most
    :data:`~lemmse_ray.kernels.sliding.MAX_CHANNELS` channels and ``rows.n_images`` images in their groups;
    ``z`` a (B, C, H, W) tensor on the keys' device with their channels and images no smaller than a patch;
    ``sigma`` positive and finite; the ``blocks`` (those of :func:`default_blocks`) powers of two, ``block_x``
    and ``block_r`` at least 16 (the sizes of a Triton product), ``groups_per_split`` and ``max_floats`` positive
    integers.
    """
    if not isinstance(rows, SlidingRows):
        raise ValueError(f"rows must be SlidingRows, got {_describe(rows)}")  # noqa: TRY004 (as sliding.py)
    for label, t in (("rows.keys", rows.keys), ("rows.values", rows.values)):
        if not (isinstance(t, torch.Tensor) and t.ndim == 5 and t.dtype == torch.float32 and t.is_contiguous()):
            raise ValueError(f"{label} must be a contiguous 5-D float32 tensor, got {_describe(t)}")
    device = rows.keys.device
    if rows.values.device != device:
        raise ValueError(f"rows.values is on {rows.values.device}, rows.keys on {device}")
    if device.type != "cuda" and not interpreted():
        raise ValueError(f"rows.keys must be on a CUDA device for the Triton sliding kernel (on the CPU only under "
                         f"TRITON_INTERPRET=1 set before importing it), got {_describe(rows.keys)}")
    channels = check_layout(rows)[1]
    p = rows.patch_size
    if not isinstance(z, torch.Tensor) or z.ndim != 4:
        raise ValueError(f"z must be a (B, C, H, W) tensor, got {_describe(z)}")
    if z.device != device:
        raise ValueError(f"z must be on the rows' device {device}, got {_describe(z)}")
    if z.shape[1] != channels:
        raise ValueError(f"z has {z.shape[1]} channels, the rows {channels}")
    pad = p - 1 if rows.padding == "circular" else 0
    if min(z.shape[2], z.shape[3]) + pad < p:
        raise ValueError(f"z's images ({z.shape[2]}×{z.shape[3]}) are smaller than a patch ({p}×{p})")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    for label, value in (("groups_per_split", groups_per_split), ("max_floats", max_floats)):
        _positive_int(label, value)
    for label, value in blocks.items():
        _positive_int(label, value, power_of_two=True)
        if label in ("block_x", "block_r") and value < 16:
            raise ValueError(f"{label} must be at least 16 (a dimension of a Triton product), got {value}")


def triton_sliding_partials(rows: SlidingRows, z: torch.Tensor, sigma: float, stats: tuple[str, ...] = (), *,
                            groups_per_split: int | None = None, max_floats: int = 1 << 26,
                            **blocks: int) -> Partials:
    """Partials (float32, natural logarithms, on the rows' device) of every window of every estimator input
    ``z`` (B, C, H, W) over the rows of ``rows``, query order (image, window row, window column): what
    :func:`lemmse_ray.kernels.sliding.sliding_partials` returns, computed by the Triton kernel of the module
    docstring.

    ``rows`` and ``z`` are on one device: CUDA, or the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter,
    for tests); :meth:`SlidingRows.to` moves a bank's rows once.  ``stats``: any statistics of
    :data:`lemmse_ray.core.statistics.STATISTICS` but top-k.  ``groups_per_split``: lane groups per program
    along the bank (default :func:`default_groups_per_split`); ``blocks``: any of ``block_y``, ``block_x``
    (query windows), ``block_r`` (rows), ``block_t`` (terms) and ``num_warps`` (default
    :func:`default_blocks`).  These fix the reduction order, hence the last bits of the result; nothing else
    does.  Query images go through the kernel in batches of at most ``max_floats`` state floats.  A call the
    kernel cannot serve is refused first (:func:`check_arguments`).
    """
    if refused := unsupported(stats, "sliding"):
        raise ValueError(f"stats: the Triton sliding kernel does not compute {', '.join(refused)} (it keeps no "
                         "top-k rows)")
    keys, patch_size = getattr(rows, "keys", None), getattr(rows, "patch_size", 1)  # checked below
    shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) and keys.ndim == 5 else (1, 1)
    defaults = default_blocks(patch_size if isinstance(patch_size, int) and patch_size > 0 else 1, shape[1])
    if unknown := sorted(set(blocks) - set(defaults)):
        raise ValueError(f"blocks: unknown {', '.join(unknown)}; choose from {', '.join(defaults)}")
    blocks = {**defaults, **blocks}
    if groups_per_split is None:
        groups_per_split = default_groups_per_split(shape[0])
    check_arguments(rows, z, sigma, groups_per_split, blocks, max_floats)

    images = rows.query_images(z)
    n_img, channels, height_a, width_a = images.shape
    groups, _, height_b, width_b, lanes = rows.keys.shape
    p = rows.patch_size
    nqy, nqx = height_a - p + 1, width_a - p + 1
    nby, nbx = height_b - p + 1, width_b - p + 1
    sums = sums_of(stats)
    want_var, want_l2, want_ls = "o2" in sums, "l2" in sums, "ls" in sums
    n_fields = 2 + channels * (1 + want_var) + want_l2 + want_ls
    n_splits = -(-groups // groups_per_split)
    blocks_y, blocks_x = -(-nqy // blocks["block_y"]), -(-nqx // blocks["block_x"])
    per_call = max(1, max_floats // (nqy * nqx * n_fields * n_splits))
    scale = -LOG2E / (2.0 * sigma * sigma)
    parts = []
    for i0 in range(0, n_img, per_call):
        batch = images[i0:i0 + per_call]
        n_batch = batch.shape[0]
        out = torch.empty((n_splits, n_batch * nqy * nqx, n_fields), dtype=torch.float32, device=images.device)
        grid = (n_batch * blocks_y * blocks_x, n_splits)
        _sliding_kernel[grid](batch, rows.keys, rows.values, out, channels, height_a, width_a, height_b, width_b,
                              lanes, rows.n_images, groups, n_batch, nqy, nqx, nby, nbx, blocks_y, blocks_x,
                              groups_per_split, n_fields, scale, P=p, WANT_VAR=want_var, WANT_L2=want_l2,
                              WANT_LS=want_ls, BLOCK_P=_power_of_two(p), BLOCK_Y=blocks["block_y"],
                              BLOCK_X=blocks["block_x"], BLOCK_R=blocks["block_r"], BLOCK_T=blocks["block_t"],
                              BLOCK_W=max(16, _power_of_two(1 + channels * (1 + want_var))), num_warps=blocks["num_warps"])
        part = states_to_partials(out[0], rows, sigma, sums)
        for s in range(1, n_splits):  # the ranges of groups, in order
            part = merge(part, states_to_partials(out[s], rows, sigma, sums))
        parts.append(part)
    if len(parts) == 1:
        return parts[0].to(torch.float32)
    return Partials(**{f.name: None if getattr(parts[0], f.name) is None else
                       torch.cat([getattr(q, f.name) for q in parts]) for f in fields(Partials)}).to(torch.float32)
