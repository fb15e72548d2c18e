r"""A fused, compiled CPU epilogue for the reduction of :mod:`lemmse_ray.kernels.torch_kernels` (float32).

After the logits GEMM of a block, the pure-torch epilogue traverses the (queries × rows) block several times
(row max, subtract, ``exp2``, a values GEMM, squares for the statistics), each pass one parallel region and
one trip through memory.  This module compiles, at first use, a small C function that does all of it in one
parallel region, row by row while the row is in L1 cache: for query :math:`i` with base-2 logits
:math:`s_{ij}` it takes :math:`\mu=\max(m_i, \max_j s_{ij})`, :math:`\alpha=2^{m_i-\mu}`,
:math:`e_j=2^{s_{ij}-\mu}` and updates

.. math:: l \leftarrow \alpha l + \sum_j e_j,\quad o_c \leftarrow \alpha o_c + \sum_j e_j v_{jc},\quad
          o_{2,c} \leftarrow \alpha o_{2,c} + \sum_j e_j v_{jc}^2,\quad
          l_2 \leftarrow \alpha^2 l_2 + \sum_j e_j^2,\quad l_s \leftarrow \alpha l_s + \sum_j e_j s_{ij}

(the last three only when requested; a term with :math:`e_j = 0` adds nothing to :math:`l_s`, even for
:math:`s_{ij} = -\infty`).  :math:`2^x` for :math:`x\le 0` is evaluated as :math:`2^n\,p(f)`,
:math:`x=n+f`, :math:`|f|\le\tfrac12`, with the degree-7 Taylor polynomial of :math:`2^f` (truncation
error below :math:`6\cdot10^{-9}` relative, i.e. rounding-limited, about 1 ulp); terms below
:math:`2^{-126}` of the row's largest term (float32's normal range) are dropped, each changing :math:`l\ge1`
by less than :math:`10^{-38}`.  Sums are float32, in a different order than torch's: results agree with the
pure-torch epilogue to float32 rounding, not bit for bit.

The library is built (:mod:`lemmse_ray.kernels.compiled`) with the system C compiler (``$CC``, else ``cc``/``gcc``) with OpenMP — which resolves
to the OpenMP runtime torch has already loaded, so both share one thread pool and ``torch.get_num_threads()``
threads are used — and cached under ``$LEMMSE_RAY_CACHE`` (default ``~/.cache/lemmse_ray``), keyed by the
source, the flags and the CPU, privately and checked before it is loaded (:mod:`lemmse_ray.kernels.compiled`).  Where no compiler is found, the build fails, or ``LEMMSE_RAY_FUSED=0``,
:func:`load` returns ``None`` and the kernel uses its pure-torch epilogue.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from .compiled import cache_dir, compile_library, compiler, enabled

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* 2^x for x <= 0 (x = -inf gives 0); 0 below 2^-126.  Taylor coefficients ln(2)^k / k!. */
static inline float exp2_nonpositive(float x) {
    float n = rintf(x);
    float f = x - n;
    float p = 1.5252733804059840e-05f;
    p = p * f + 1.5403530393381609e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.6181291076284772e-03f;
    p = p * f + 5.5504108664821580e-02f;
    p = p * f + 2.4022650695910071e-01f;
    p = p * f + 6.9314718055994531e-01f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)(x < -126.0f ? -126.0f : n) + 127) << 23;
    union { int32_t i; float f; } scale = { bits };
    return x < -126.0f ? 0.0f : p * scale.f;
}

void lemmse_epilogue_f32(int64_t rows, int64_t cols, const float *s, int64_t lds,
                         int64_t channels, const float *vt, int64_t ldv,
                         float *m, float *acc, int64_t ldacc, int want_var, float *l2, float *ls,
                         int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *e = (float *)malloc((size_t)(cols > 0 ? cols : 1) * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
            const float *row = s + i * lds;
            float block_max = -INFINITY;
            #pragma omp simd reduction(max:block_max)
            for (int64_t j = 0; j < cols; ++j) block_max = row[j] > block_max ? row[j] : block_max;
            float m_old = m[i];
            float m_new = m_old > block_max ? m_old : block_max;
            float ref = isfinite(m_new) ? m_new : 0.0f;
            float alpha = exp2f(m_old - ref);
            float sum_l = 0.0f, sum_l2 = 0.0f, sum_ls = 0.0f;
            #pragma omp simd reduction(+:sum_l)
            for (int64_t j = 0; j < cols; ++j) {
                float t = exp2_nonpositive(row[j] - ref);
                e[j] = t;
                sum_l += t;
            }
            if (l2) {
                #pragma omp simd reduction(+:sum_l2)
                for (int64_t j = 0; j < cols; ++j) sum_l2 += e[j] * e[j];
                l2[i] = alpha * alpha * l2[i] + sum_l2;
            }
            if (ls) {
                #pragma omp simd reduction(+:sum_ls)
                for (int64_t j = 0; j < cols; ++j) sum_ls += e[j] > 0.0f ? e[j] * (row[j] - ref) : 0.0f;
                ls[i] = alpha * ls[i] + (sum_ls + ref * sum_l);
            }
            float *out = acc + i * ldacc;
            for (int64_t c = 0; c < channels; ++c) {
                const float *v = vt + c * ldv;
                float sum_o = 0.0f, sum_o2 = 0.0f;
                if (want_var) {
                    #pragma omp simd reduction(+:sum_o, sum_o2)
                    for (int64_t j = 0; j < cols; ++j) {
                        float ev = e[j] * v[j];
                        sum_o += ev;
                        sum_o2 += ev * v[j];
                    }
                    out[channels + 1 + c] = alpha * out[channels + 1 + c] + sum_o2;
                } else {
                    #pragma omp simd reduction(+:sum_o)
                    for (int64_t j = 0; j < cols; ++j) sum_o += e[j] * v[j];
                }
                out[c] = alpha * out[c] + sum_o;
            }
            out[channels] = alpha * out[channels] + sum_l;
            m[i] = m_new;
        }
        free(e);
    }
}
"""


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


SIGNATURES = {"lemmse_epilogue_f32": ([_i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, ctypes.c_int,
                                       _ptr, _ptr, ctypes.c_int], None)}


def build(cc: str | None, cache_dir: str) -> ctypes.CDLL | None:
    """Compile (or reuse) the epilogue library with ``cc`` in ``cache_dir``; None if that is impossible."""
    return compile_library(cc, cache_dir, "epilogue", SOURCE, SIGNATURES)


@lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled library, built at first call (None: disabled, or no working compiler)."""
    return build(compiler(), cache_dir()) if enabled() else None


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}, strides {value.stride()}, on {value.device.type}"
    return f"a {type(value).__name__}"


def check_arguments(s: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor, acc: torch.Tensor, want_var: bool,
                    l2: torch.Tensor | None, ls: torch.Tensor | None) -> None:
    """Refuse (ValueError naming the argument) a call of :func:`epilogue` that would make the C function read or
    write outside its buffers, or read them as what they are not.

    The C function reads ``cols`` values of every row of ``s`` and of ``values_t`` and writes ``m[i]``,
    ``acc[i, :C+1(+C)]``, ``l2[i]``, ``ls[i]`` for every row ``i``, all as float32 in host memory, from the
    sizes of ``s`` alone.  A torch view's elements all lie in its storage, so it is enough that: every tensor
    is float32 on the CPU; ``s`` (Mq, n) and ``values_t`` (C, n) are 2-D with the same n and unit stride along
    it (their rows may be strided: blocks of wider matrices); ``m``, ``l2``, ``ls`` are (Mq,) and ``acc``
    (Mq, C+1[+C]) contiguous (outputs, written by several threads).
    """
    for label, t in (("s", s), ("values_t", values_t)):
        if not (isinstance(t, torch.Tensor) and t.ndim == 2 and t.dtype == torch.float32 and t.device.type == "cpu"
                and (t.shape[1] <= 1 or t.stride(1) == 1)):
            raise ValueError(f"{label} must be a 2-D float32 CPU tensor with unit stride along its last dimension, "
                             f"got {_describe(t)}")
    rows, cols = s.shape
    channels = values_t.shape[0]
    if values_t.shape[1] != cols:
        raise ValueError(f"values_t must have {cols} columns, one per column of the logits s, got {values_t.shape[1]}")
    width = channels + 1 + (channels if want_var else 0)
    for label, t, shape in (("m", m, (rows,)), ("acc", acc, (rows, width)), ("l2", l2, (rows,)),
                            ("ls", ls, (rows,))):
        if t is None and label in ("l2", "ls"):
            continue
        if not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == torch.float32
                and t.device.type == "cpu" and t.is_contiguous()):
            raise ValueError(f"{label} must be a contiguous float32 CPU tensor of shape {shape}, got {_describe(t)}")


def epilogue(lib: ctypes.CDLL, s: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor, acc: torch.Tensor,
             want_var: bool, l2: torch.Tensor | None, ls: torch.Tensor | None) -> None:
    """In place: fold the block of base-2 logits ``s`` (Mq, n) with values ``values_t`` (C, n) into the running
    max ``m`` (Mq,), sums ``acc`` (Mq, C+1[+C]) = [o, l, o2] and optional ``l2``, ``ls`` (Mq,).

    All float32 CPU tensors with unit stride along their last dimension; ``acc``, ``m``, ``l2``, ``ls``
    contiguous.  Anything else is refused before the C call (:func:`check_arguments`).
    """
    check_arguments(s, values_t, m, acc, want_var, l2, ls)
    rows, cols = s.shape
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    lib.lemmse_epilogue_f32(rows, cols, s.data_ptr(), s.stride(0), values_t.shape[0], values_t.data_ptr(),
                            values_t.stride(0), m.data_ptr(), acc.data_ptr(), acc.stride(0), int(want_var),
                            ptr(l2), ptr(ls), torch.get_num_threads())
