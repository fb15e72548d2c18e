r"""Sliding-window patch distances: the logits of a translation-structured class without a matrix product.

When a class's whitening is a multiple of the identity, :math:`W_c = w I` (denoising; any problem whose
noise on the estimator input is white, e.g. agnostic inpainting or deblurring inputs), its rows are *all*
the :math:`P\times P` windows of the key images :math:`K_n = w\,BAx_n` (padded circularly for
``candidates="all"`` under circular padding) and its queries are all the windows of the query image
:math:`Z = w z` (padded the same way).  With :math:`i, j` the windows' top-left corners,

.. math:: D(i, j) = \lVert \Pi_i Z - \Pi_j K_n\rVert^2
                  = \sum_{o_y=0}^{P-1} R_{i_y+o_y,\ j_y+o_y}(i_x, j_x),\qquad
          R_{a,b}(i_x, j_x) = \sum_{o_x=0}^{P-1} E_{a,b}(i_x+o_x,\ j_x+o_x),\qquad
          E_{a,b}(u, v) = \sum_c (Z_{c,a,u} - K_{n,c,b,v})^2 .

Each :math:`E` term is shared by up to :math:`P^2` pairs, so a pair costs about :math:`2C + 2(P-1)`
additions and multiplications instead of the :math:`2CP^2` of a matrix product (for :math:`C=3, P=5`:
about 20 instead of 150).  The differences are formed directly, so there is no cancellation between
:math:`\lVert q\rVert^2`, :math:`\lVert k\rVert^2` and :math:`2q\cdot k` either.

The compiled C kernel below (float32, portable GCC/Clang vector extensions, OpenMP sharing torch's thread
pool as in :mod:`lemmse_ray.kernels.epilogue`) processes one bank image per vector lane — 16 with AVX-512, else 8 — so
every operation is a full vector operation without masks.  Work items are (query image, chunk of bank
images); for each diagonal :math:`i_y - j_y` an item walks the image rows, keeps the last :math:`P` row
blocks :math:`R` in a ring, and folds every :math:`D(i, j)` at once into per-query, per-lane online
log-sum-exp states (base 2, with the running *minimum distance* :math:`d_\min` in place of the maximum logit,
so that :math:`s - m = -(D - d_\min)\log_2 e / 2\sigma^2` is formed without cancellation):

.. math:: l = \sum 2^{s-m},\quad o_c = \sum 2^{s-m} v_c,\quad o_{2,c} = \sum 2^{s-m} v_c^2,\quad
          l_2 = \sum 2^{2(s-m)},\quad l_s = \sum 2^{s-m}(s-m),

with :math:`2^x` as in :mod:`lemmse_ray.kernels.epilogue`, except that terms below :math:`2^{-60}` of the running
maximum are dropped (not :math:`2^{-126}`): every operand then stays a normal float (subnormal arithmetic is
several times slower), and for any bank below :math:`2^{36}` rows the dropped terms change :math:`l \ge 1` by
less than float32's rounding unit.  Lanes, then chunks (whose size depends only on the bank), are merged in
a fixed order, so the result does not depend on the number of threads.  :func:`sliding_partials` converts
the states to :class:`~lemmse_ray.core.partials.Partials` (natural logarithms).  Top-k rows are not kept.
"""
from __future__ import annotations

import ctypes
import math
import numbers
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch

from ..core.partials import LN2, LOG2E, Partials
from ..core.statistics import sums_of, unsupported
from . import compiled

MAX_CHANNELS = 30

SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define MAX_CHANNELS 30
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf select_v(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
#if defined(__AVX512F__) && LANES == 16
#include <immintrin.h>
static inline int any_v(vi mask) { return _mm512_movepi32_mask((__m512i)mask) != 0; }
#elif defined(__AVX__) && LANES == 8
#include <immintrin.h>
static inline int any_v(vi mask) { return _mm256_movemask_ps((__m256)mask) != 0; }
#else
static inline int any_v(vi mask) {
    int32_t r = 0;
    for (int k = 0; k < LANES; ++k) r |= mask[k];
    return r != 0;
}
#endif

int64_t lemmse_sliding_lanes(void) { return LANES; }

/* 2^x for x <= 0; 0 where x < FLOOR or x is NaN.  Degree-7 Taylor polynomial of 2^f, |f| <= 1/2.
   Dropping terms below 2^FLOOR (of the lane's largest term, 1) keeps every operand and product of the sums
   normal (subnormal arithmetic is several times slower on some CPUs) and changes l >= 1 by less than
   n_rows * 2^FLOOR relative: below float32's rounding unit 2^-24 for any bank of fewer than 2^36 rows. */
#define FLOOR -60.0f
static inline vf exp2_v(vf x) {
    vi under = ~(x >= splat(FLOOR));
    x = select_v(under, splat(FLOOR), x);
    vf n = (x + splat(12582912.0f)) - splat(12582912.0f); /* round to nearest */
    vf f = x - n;
    vf p = splat(1.5252733804059840e-05f);
    p = p * f + splat(1.5403530393381609e-04f);
    p = p * f + splat(1.3333558146428443e-03f);
    p = p * f + splat(9.6181291076284772e-03f);
    p = p * f + splat(5.5504108664821580e-02f);
    p = p * f + splat(2.4022650695910071e-01f);
    p = p * f + splat(6.9314718055994531e-01f);
    p = p * f + splat(1.0f);
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)bits) & ~under);
}

typedef struct {
    int64_t C, HA, WA, HB, WB, P, nqy, nqx, nby, nbx, F, var, l2, ls;
    float scale; /* -log2(e) / (2 sigma^2) */
} geom_t;

/* R[ix * nbx + jx] = sum_ox sum_c (A[c, a, ix + ox] - K[c, b, jx + ox])^2, along the diagonals ix - jx. */
static inline __attribute__((always_inline)) void row_block(const geom_t *g, const float *A, const vf *K,
                                                            int64_t a, int64_t b, vf *R, vf *E,
                                                            const int64_t C, const int64_t P) {
    const int64_t WA = g->WA, WB = g->WB, nqx = g->nqx, nbx = g->nbx;
    const float *Ar = A + a * WA;
    const vf *Kr = K + b * WB;
    for (int64_t kappa = 1 - nbx; kappa < nqx; ++kappa) {
        const int64_t v0 = kappa < 0 ? -kappa : 0, v1 = WB < WA - kappa ? WB : WA - kappa;
        for (int64_t v = v0; v < v1; ++v) {
            vf d = splat(Ar[v + kappa]) - Kr[v];
            vf acc = d * d;
            for (int64_t c = 1; c < C; ++c) {
                d = splat(Ar[c * g->HA * WA + v + kappa]) - Kr[c * g->HB * WB + v];
                acc += d * d;
            }
            E[v] = acc;
        }
        const int64_t j1 = nbx < nqx - kappa ? nbx : nqx - kappa;
        for (int64_t jx = v0; jx < j1; ++jx) {
            vf s = E[jx];
            for (int64_t ox = 1; ox < P; ++ox) s += E[jx + ox];
            R[(jx + kappa) * nbx + jx] = s;
        }
    }
}

/* Fold D(iy, ix; jy, jx) = the sum of the P ring blocks into the states of the queries (iy, ix). */
static inline __attribute__((always_inline)) void fold_row(const geom_t *g, const vf *ring, int64_t iy,
                                                           int64_t jy, const vf *V, vi valid, int full,
                                                           vf *state, const int64_t C, const int64_t P) {
    const int64_t F = g->F, block = g->nqx * g->nbx, nv = C * (1 + g->var), plane = g->nby * g->nbx;
    const vf scale = splat(g->scale), inf = splat(INFINITY);
    vf o[MAX_CHANNELS], o2[MAX_CHANNELS];
    for (int64_t ix = 0; ix < g->nqx; ++ix) {
        vf *st = state + (iy * g->nqx + ix) * F;
        vf dmin = st[0], l = st[1], l2 = g->l2 ? st[2 + nv] : splat(0.0f);
        vf ls = g->ls ? st[F - 1] : splat(0.0f);
        for (int64_t c = 0; c < C; ++c) {
            o[c] = st[2 + c];
            o2[c] = g->var ? st[2 + C + c] : splat(0.0f);
        }
        const vf *r = ring + ix * g->nbx;
        for (int64_t jx = 0; jx < g->nbx; ++jx) {
            vf d = r[jx];
            for (int64_t k = 1; k < P; ++k) d += r[k * block + jx];
            if (!full) d = select_v(valid, d, inf);
            vi lower = d < dmin;
            if (any_v(lower)) { /* a new running minimum in some lane: rescale that lane's sums */
                vf dnew = select_v(lower, d, dmin);
                vf t = (dmin - dnew) * scale; /* log2 of the factor, <= 0 (-inf on first sight) */
                vf alpha = exp2_v(t);
                if (g->ls) ls = alpha * (ls + select_v(t > splat(-200.0f), t, splat(-200.0f)) * l);
                l *= alpha;
                if (g->l2) l2 *= alpha * alpha;
                for (int64_t c = 0; c < C; ++c) {
                    o[c] *= alpha;
                    if (g->var) o2[c] *= alpha;
                }
                dmin = dnew;
            }
            vf arg = (d - dmin) * scale;
            if (!any_v(arg >= splat(FLOOR))) continue; /* every lane's term is dropped: nothing to add */
            vf e = exp2_v(arg);
            l += e;
            if (g->l2) l2 += e * e;
            if (g->ls) ls += e * select_v(arg >= splat(FLOOR), arg, splat(0.0f));
            const vf *v = V + jy * g->nbx + jx;
            for (int64_t c = 0; c < C; ++c) {
                vf ev = e * v[c * plane];
                o[c] += ev;
                if (g->var) o2[c] += ev * v[c * plane];
            }
        }
        st[0] = dmin;
        st[1] = l;
        for (int64_t c = 0; c < C; ++c) {
            st[2 + c] = o[c];
            if (g->var) st[2 + C + c] = o2[c];
        }
        if (g->l2) st[2 + nv] = l2;
        if (g->ls) st[F - 1] = ls;
    }
}

/* One work item: the windows of query image Ai against bank groups [k0, k1); lane-wise states in `state`. */
static inline __attribute__((always_inline)) void scan_item(const geom_t *g, const float *Ai, const vf *K,
                                                            const vf *V, int64_t k0, int64_t k1,
                                                            int64_t n_groups, int64_t last_lanes, vf *state,
                                                            vf *ring, vf *E, const int64_t C, const int64_t P) {
    const int64_t kimg = C * g->HB * g->WB, vimg = C * g->nby * g->nbx, block = g->nqx * g->nbx;
    vi lane, valid;
    for (int k = 0; k < LANES; ++k) lane[k] = k;
    valid = lane < ((vi){0} + (int32_t)last_lanes);
    for (int64_t grp = k0; grp < k1; ++grp) {
        const vf *Kg = K + grp * kimg, *Vg = V + grp * vimg;
        const int full = grp < n_groups - 1 || last_lanes == LANES;
        for (int64_t delta = 1 - g->nby; delta < g->nqy; ++delta) { /* iy - jy */
            const int64_t jy0 = delta < 0 ? -delta : 0, jy1 = g->nby < g->nqy - delta ? g->nby : g->nqy - delta;
            if (jy0 >= jy1) continue;
            for (int64_t b = jy0; b < jy1 + P - 1; ++b) {
                row_block(g, Ai, Kg, b + delta, b, ring + ((b - jy0) % P) * block, E, C, P);
                if (b - jy0 >= P - 1) fold_row(g, ring, b - P + 1 + delta, b - P + 1, Vg, valid, full, state, C, P);
            }
        }
    }
}

#define SCAN_CASE(c_, p_) \
    if (C == c_ && P == p_) { scan_item(g, Ai, K, V, k0, k1, n_groups, last_lanes, state, ring, E, c_, p_); return; }

static void scan_dispatch(const geom_t *g, const float *Ai, const vf *K, const vf *V, int64_t k0, int64_t k1,
                          int64_t n_groups, int64_t last_lanes, vf *state, vf *ring, vf *E) {
    const int64_t C = g->C, P = g->P;
    SCAN_CASE(1, 3) SCAN_CASE(1, 5) SCAN_CASE(1, 7) SCAN_CASE(1, 9)
    SCAN_CASE(3, 3) SCAN_CASE(3, 5) SCAN_CASE(3, 7) SCAN_CASE(3, 9)
    scan_item(g, Ai, K, V, k0, k1, n_groups, last_lanes, state, ring, E, C, P);
}

/* Merge state b into a, scalar fields [dmin, l, o.., o2.., l2, ls] (a state with l = 0 saw no row). */
static void merge_scalar(const geom_t *g, float *a, const float *b) {
    if (!(b[1] > 0.0f)) return;
    if (!(a[1] > 0.0f)) { memcpy(a, b, (size_t)g->F * sizeof(float)); return; }
    const float dmin = a[0] < b[0] ? a[0] : b[0];
    const float ta = (a[0] - dmin) * g->scale, tb = (b[0] - dmin) * g->scale;
    const float fa = exp2f(ta), fb = exp2f(tb);
    const int64_t n = g->C * (1 + g->var);
    if (g->ls) {
        const float ca = ta > -200.0f ? ta : -200.0f, cb = tb > -200.0f ? tb : -200.0f;
        a[g->F - 1] = fa * (a[g->F - 1] + ca * a[1]) + fb * (b[g->F - 1] + cb * b[1]);
    }
    if (g->l2) a[2 + n] = fa * fa * a[2 + n] + fb * fb * b[2 + n];
    for (int64_t c = 0; c < n; ++c) a[2 + c] = fa * a[2 + c] + fb * b[2 + c];
    a[1] = fa * a[1] + fb * b[1];
    a[0] = dmin;
}

/* Queries: the windows of A (n_img, C, HA, WA); rows: the windows of the lane-interleaved key images
   K (n_groups, C, HB, WB, LANES) with values V (n_groups, C, HB-P+1, WB-P+1, LANES), last_lanes valid lanes in
   the last group.  Work items (query image, `chunk` groups) run in parallel; lanes, then chunks, are merged
   in a fixed order.  out: (n_img, nqy * nqx, F) states [dmin, l, o[C], (o2[C]), (l2), (ls)]. */
int lemmse_sliding_f32(int64_t n_img, const float *A, int64_t C, int64_t HA, int64_t WA,
                       int64_t n_groups, const float *K, const float *V, int64_t HB, int64_t WB,
                       int64_t last_lanes, int64_t P, float scale, int64_t chunk, int var,
                       int want_l2, int want_ls, float *out, int threads) {
    const geom_t g = {C, HA, WA, HB, WB, P, HA - P + 1, WA - P + 1, HB - P + 1, WB - P + 1,
                      2 + C * (1 + (var != 0)) + (want_l2 != 0) + (want_ls != 0), var != 0, want_l2 != 0,
                      want_ls != 0, scale};
    const int64_t nq = g.nqy * g.nqx, n_chunks = (n_groups + chunk - 1) / chunk, items = n_img * n_chunks;
    /* every buffer is allocated before the parallel region: a failure is reported, never half-computed */
    float *partial = (float *)malloc((size_t)(items * nq * g.F) * sizeof(float));
    vf **buffers = (vf **)calloc((size_t)(3 * threads), sizeof(vf *));
    int failed = partial == NULL || buffers == NULL;
    const size_t sizes[3] = {(size_t)(nq * g.F), (size_t)(P * g.nqx * g.nbx), (size_t)(WB + 1)};
    for (int t = 0; !failed && t < 3 * threads; ++t)
        failed = posix_memalign((void **)&buffers[t], 64, sizes[t % 3] * sizeof(vf)) != 0;
    if (!failed) {
        #pragma omp parallel num_threads(threads)
        {
            vf *state = buffers[3 * omp_get_thread_num()], *ring = buffers[3 * omp_get_thread_num() + 1];
            vf *E = buffers[3 * omp_get_thread_num() + 2];
            #pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < items; ++item) {
                const int64_t img = item / n_chunks, k0 = (item % n_chunks) * chunk;
                const int64_t k1 = k0 + chunk < n_groups ? k0 + chunk : n_groups;
                for (int64_t q = 0; q < nq; ++q) {
                    state[q * g.F] = splat(INFINITY);
                    for (int64_t f = 1; f < g.F; ++f) state[q * g.F + f] = splat(0.0f);
                }
                scan_dispatch(&g, A + img * C * HA * WA, (const vf *)K, (const vf *)V, k0, k1, n_groups,
                              last_lanes, state, ring, E);
                float *dst = partial + item * nq * g.F, lanes[4 + 2 * MAX_CHANNELS];
                for (int64_t q = 0; q < nq; ++q) { /* merge the lanes, in lane order */
                    float *d = dst + q * g.F;
                    for (int64_t f = 0; f < g.F; ++f) d[f] = state[q * g.F + f][0];
                    for (int k = 1; k < LANES; ++k) {
                        for (int64_t f = 0; f < g.F; ++f) lanes[f] = state[q * g.F + f][k];
                        merge_scalar(&g, d, lanes);
                    }
                }
            }
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < n_img * nq; ++t) { /* merge the chunks, in chunk order */
                const int64_t img = t / nq, q = t % nq;
                float *d = out + t * g.F;
                memcpy(d, partial + (img * n_chunks * nq + q) * g.F, (size_t)g.F * sizeof(float));
                for (int64_t k = 1; k < n_chunks; ++k)
                    merge_scalar(&g, d, partial + ((img * n_chunks + k) * nq + q) * g.F);
            }
        }
    }
    for (int t = 0; buffers != NULL && t < 3 * threads; ++t) free(buffers[t]);
    free(buffers);
    free(partial);
    return failed;
}
"""
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {
    "lemmse_sliding_lanes": ([], ctypes.c_int64),
    "lemmse_sliding_f32": ([_i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_float,
                            _i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, _ptr, ctypes.c_int], ctypes.c_int),
}


@cache
def load() -> ctypes.CDLL | None:
    """The compiled library, built at first call (None: disabled by ``LEMMSE_RAY_FUSED=0``, or no compiler)."""
    if not compiled.enabled():
        return None
    return compiled.compile_library(compiled.compiler(), compiled.cache_dir(), "sliding", SOURCE, SIGNATURES)


def library() -> ctypes.CDLL:
    """:func:`load`'s library; ValueError where there is none."""
    lib = load()
    if lib is None:
        raise ValueError("the sliding kernel needs a working C compiler (see lemmse_ray.kernels.compiled)")
    return lib


def lanes() -> int:
    """Bank images per vector of the compiled kernel: 16 with AVX-512, else 8."""
    return int(library().lemmse_sliding_lanes())


def wrap_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Circular padding by ``pad`` pixels on each side of the last two dimensions (any ``pad``, even beyond
    the image size, where ``F.pad`` refuses)."""
    height, width = images.shape[-2:]
    rows = torch.arange(-pad, height + pad) % height
    cols = torch.arange(-pad, width + pad) % width
    return images[..., rows[:, None], cols[None, :]]


def interleave(images: torch.Tensor, width: int) -> torch.Tensor:
    """(N, C, H, W) → (⌈N/L⌉, C, H, W, L) float32 with ``L = width``: image ``Lg + k`` in lane ``k`` of group
    ``g`` (zeros beyond N)."""
    n = images.shape[0]
    groups = -(-n // width)
    padded = torch.zeros((groups * width, *images.shape[1:]), dtype=torch.float32)
    padded[:n] = images
    return padded.reshape(groups, width, *images.shape[1:]).movedim(1, -1).contiguous()


def interior(shape: tuple[int, int, int], patch_size: int) -> np.ndarray:
    """(H·W,) bool: positions whose patch lies inside the image."""
    _, height, width = shape
    half = patch_size // 2
    r, c = np.divmod(np.arange(height * width), width)
    return (r >= half) & (r < height - half) & (c >= half) & (c < width - half)


def query_windows(padding: str, shape: tuple[int, int, int], patch_size: int) -> np.ndarray:
    """(H·W,) bool: query positions whose patch is a window of the sliding kernel's query image — every
    position under circular padding (the image is padded circularly), the interior under zero padding."""
    if padding == "circular":
        return np.ones(shape[1] * shape[2], dtype=bool)
    return interior(shape, patch_size)


def eligible_class(plan) -> int | None:
    """The class of ``plan`` (a :class:`~lemmse_ray.core.classes.ClassPlan`) the sliding kernel evaluates, or None.

    It must be whitened by a multiple of the identity on every coordinate, its rows must be every window of
    the (circularly padded, for ``candidates="all"`` under circular padding) key images, and the queries that
    meet it exactly the windows of the query image (:func:`query_windows`)."""
    if plan.kind != "whitened":
        return None
    geometry = plan.geometry
    _, height, width = geometry.shape
    dim = geometry.dim
    windows = query_windows(geometry.padding, geometry.shape, geometry.patch_size)
    all_rows = geometry.padding == "circular" and geometry.candidates == "all"
    row_windows = np.ones(height * width, dtype=bool) if all_rows else interior(geometry.shape, geometry.patch_size)
    if not row_windows.any():
        return None
    for c, cls in enumerate(plan.classes):
        w = cls.whitening
        if cls.deterministic.any() or w is None or w.shape != (dim, dim) or not w[0, 0] > 0:
            continue
        if not np.array_equal(w, w[0, 0] * np.eye(dim)):
            continue
        if (np.array_equal(plan.meets[c][plan.position_class], windows)
                and np.array_equal(plan.positions(c), np.flatnonzero(row_windows))):
            return c
    return None


@dataclass
class SlidingRows:
    """The rows of one eligible class (:func:`eligible_class`) as lane-interleaved images, for
    :func:`sliding_partials`: key images :math:`w\\,BAx_n` (padded circularly by ``P//2`` for
    ``candidates="all"`` under circular padding) and the values (clean centre pixels) of every window."""

    index: int  # the class
    keys: torch.Tensor  # (G, C, HB, WB, L) float32, L = lanes()
    values: torch.Tensor  # (G, C, HB-P+1, WB-P+1, L) float32
    n_images: int
    weight: float  # w
    rank: int
    log_pdet: float
    padding: str
    patch_size: int

    @staticmethod
    def build(train: torch.Tensor, inputs: torch.Tensor, plan, index: int) -> SlidingRows:
        """From float64 training images ``train`` and their noiseless inputs ``inputs`` (N, C, H, W)."""
        geometry, cls = plan.geometry, plan.classes[index]
        half = geometry.patch_size // 2
        weight = float(cls.whitening[0, 0])
        keys = inputs * weight
        if geometry.padding == "circular" and geometry.candidates == "all":
            keys, values = wrap_pad(keys, half), train
        else:
            values = train[:, :, half:train.shape[2] - half, half:train.shape[3] - half]
        width = lanes()
        return SlidingRows(index, interleave(keys, width), interleave(values, width), train.shape[0], weight, cls.rank,
                           cls.log_pdet, geometry.padding, geometry.patch_size)

    def query_images(self, z: torch.Tensor) -> torch.Tensor:
        """The sliding kernel's query images for estimator inputs ``z`` (B, C, H, W): :math:`w z`, padded
        circularly under circular padding (float32, contiguous)."""
        images = z * self.weight
        if self.padding == "circular":
            images = wrap_pad(images, self.patch_size // 2)
        return images.to(torch.float32).contiguous()

    def to(self, device: torch.device | str) -> SlidingRows:
        """These rows with their key images and values on ``device`` (``self`` where they already are), for the
        Triton sliding kernel (:mod:`lemmse_ray.kernels.triton_sliding`), which reads the same layout."""
        device = torch.device(device)
        if self.keys.device == device and self.values.device == device:
            return self
        return replace(self, keys=self.keys.to(device), values=self.values.to(device))


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return (f"a {'contiguous' if value.is_contiguous() else 'non-contiguous'} {value.dtype} tensor of shape "
                f"{tuple(value.shape)} on {value.device.type}")
    return f"a {type(value).__name__}"


def check_layout(rows: SlidingRows) -> tuple[int, int, int, int, int]:
    """``(groups, channels, height, width, lanes)`` of the 5-D key tensor of ``rows`` once its layout is checked
    (``ValueError`` naming the field): at most :data:`MAX_CHANNELS` channels, an odd patch size no larger than
    the key images, values the windows of the keys, and ``n_images`` images in the lane groups.  Both sliding
    kernels (compiled and Triton) trust these sizes."""
    groups, channels, height, width, lanes = rows.keys.shape
    if channels > MAX_CHANNELS:
        raise ValueError(f"rows.keys has {channels} channels: the sliding kernel handles at most {MAX_CHANNELS}")
    p = rows.patch_size
    if not isinstance(p, int) or isinstance(p, bool) or p < 1 or p % 2 == 0 or p > min(height, width):
        raise ValueError(f"rows.patch_size must be odd, from 1 to the key images' size {min(height, width)}, "
                         f"got {p!r}")
    windows = (groups, channels, height - p + 1, width - p + 1, lanes)
    if tuple(rows.values.shape) != windows:
        raise ValueError(f"rows.values must have the shape {windows} of the windows of rows.keys, "
                         f"got {tuple(rows.values.shape)}")
    n = rows.n_images
    if not isinstance(n, int) or isinstance(n, bool) or not max(1, (groups - 1) * lanes + 1) <= n <= groups * lanes:
        raise ValueError(f"rows.n_images must be the number of images in the {groups} groups of {lanes} of "
                         f"rows.keys ({(groups - 1) * lanes + 1} to {groups * lanes}), got {n!r}")
    return groups, channels, height, width, lanes


def check_arguments(rows: SlidingRows, z: torch.Tensor, sigma: float, threads: int | None, max_floats: int,
                    lanes: int) -> None:
    """Refuse (ValueError naming the argument) a call of :func:`sliding_partials` that would make the compiled
    kernel ``lanes`` wide read or write outside its buffers, or compute garbage.

    The C function trusts every size it is given: the query images' channels are read as the keys' (30 query
    channels against a 1-channel bank read past the key buffer), the window counts follow from the patch
    size, and every tensor is read as contiguous float32 in host memory.  So, before the call: the keys and
    values are contiguous 5-D float32 CPU tensors, the values the windows of the keys, interleaved by the
    kernel's lanes, with at most :data:`MAX_CHANNELS` channels and ``rows.n_images`` images in their groups;
    ``z`` a (B, C, H, W) CPU tensor with the keys' channels and images no smaller than a patch; ``sigma``
    positive and finite; ``threads`` and ``max_floats`` positive.
    """
    if not isinstance(rows, SlidingRows):
        raise ValueError(f"rows must be SlidingRows, got {_describe(rows)}")  # noqa: TRY004 (the kernels' one error type)
    for label, t in (("rows.keys", rows.keys), ("rows.values", rows.values)):
        if not (isinstance(t, torch.Tensor) and t.ndim == 5 and t.dtype == torch.float32 and t.device.type == "cpu"
                and t.is_contiguous()):
            raise ValueError(f"{label} must be a contiguous 5-D float32 tensor on the CPU, got {_describe(t)}")
    interleaved = rows.keys.shape[-1]
    if interleaved != lanes:
        raise ValueError(f"rows.keys is interleaved by {interleaved}, the compiled kernel has {lanes} lanes")
    _, channels, _, _, _ = check_layout(rows)
    p = rows.patch_size
    if not isinstance(z, torch.Tensor) or z.ndim != 4:
        raise ValueError(f"z must be a (B, C, H, W) tensor, got {_describe(z)}")
    if z.device.type != "cpu":
        raise ValueError(f"z must be on the CPU, got {_describe(z)}")
    if z.shape[1] != channels:
        raise ValueError(f"z has {z.shape[1]} channels, the rows {channels}")
    pad = p - 1 if rows.padding == "circular" else 0
    if min(z.shape[2], z.shape[3]) + pad < p:
        raise ValueError(f"z's images ({z.shape[2]}×{z.shape[3]}) are smaller than a patch ({p}×{p})")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    for label, value in (("threads", 1 if threads is None else threads), ("max_floats", max_floats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")


def sliding_partials(rows: SlidingRows, z: torch.Tensor, sigma: float, stats: tuple[str, ...] = (),
                     threads: int | None = None, max_floats: int = 1 << 23) -> Partials:
    """Partials (natural logarithms, as :mod:`lemmse_ray.core.partials`) of every window of every estimator input
    ``z`` (B, C, H, W) over the rows of ``rows``, query order (image, window row, window column).

    ``stats``: any statistics of :data:`lemmse_ray.core.statistics.STATISTICS` but top-k (it accumulates the
    sums they need).  ``threads``: OpenMP threads (default ``torch.get_num_threads()``); the result does not depend
    on it.  Query images go through the kernel in batches of at most ``max_floats`` output floats.  A call
    the kernel cannot serve within its buffers is refused first (:func:`check_arguments`).
    """
    lib = library()
    check_arguments(rows, z, sigma, threads, max_floats, int(lib.lemmse_sliding_lanes()))
    if refused := unsupported(stats, "sliding"):
        raise ValueError(f"the sliding kernel does not compute {', '.join(refused)} (it keeps no top-k rows)")
    images = rows.query_images(z)
    n_img, channels, height_a, width_a = images.shape
    groups, _, height_b, width_b, _ = rows.keys.shape
    p = rows.patch_size
    n_q = (height_a - p + 1) * (width_a - p + 1)
    sums = sums_of(stats)
    want_var, want_l2, want_ls = "o2" in sums, "l2" in sums, "ls" in sums
    n_fields = 2 + channels * (1 + want_var) + want_l2 + want_ls
    chunk = max(2, -(-groups // 64))  # bank groups per work item: independent of the number of threads
    n_chunks = -(-groups // chunk)
    per_call = max(1, max_floats // (n_q * n_fields * (n_chunks + 1)))
    scale = -LOG2E / (2.0 * sigma * sigma)
    width = rows.keys.shape[-1]
    last = rows.n_images - (groups - 1) * width
    out = torch.empty((n_img, n_q, n_fields), dtype=torch.float32)
    threads = threads or torch.get_num_threads()
    for i0 in range(0, n_img, per_call):
        i1 = min(n_img, i0 + per_call)
        failed = lib.lemmse_sliding_f32(i1 - i0, images[i0:i1].data_ptr(), channels, height_a, width_a, groups,
                                        rows.keys.data_ptr(), rows.values.data_ptr(), height_b, width_b, last, p,
                                        scale, chunk, int(want_var), int(want_l2), int(want_ls),
                                        out[i0:i1].data_ptr(), threads)
        if failed:
            raise MemoryError("the sliding kernel could not allocate its buffers")
    return states_to_partials(out.reshape(n_img * n_q, n_fields), rows, sigma, sums).to(torch.float32)


def states_to_partials(states: torch.Tensor, rows: SlidingRows, sigma: float, sums: tuple[str, ...]) -> Partials:
    r"""float64 :class:`~lemmse_ray.core.partials.Partials` (natural logarithms) from per-query sliding states
    ``states`` (M, F) ``[d_min, l, o[C], (o_2[C]), (l_2), (l_s)]`` (base 2, reference :math:`d_\min`, the optional
    fields those of ``sums``), the layout of both the compiled and the Triton sliding kernels:
    :math:`m = -d_\min/2\sigma^2 - \tfrac12 r\log(2\pi\sigma^2) - \tfrac12\log\operatorname{pdet}` and
    :math:`l_s = \ln 2\, l_{s,2} + m\,l`."""
    channels = rows.keys.shape[1]
    out = states.to(torch.float64)
    shift = -0.5 * rows.rank * math.log(2 * math.pi * sigma * sigma) - 0.5 * rows.log_pdet
    m = -out[:, 0] / (2.0 * sigma * sigma) + shift
    part = Partials(m=m, l=out[:, 1], o=out[:, 2:2 + channels])
    at = 2 + channels
    if "o2" in sums:
        part.o2, at = out[:, at:at + channels], at + channels
    if "l2" in sums:
        part.l2, at = out[:, at], at + 1
    if "ls" in sums:
        part.ls = LN2 * out[:, at] + m * part.l
    return part
