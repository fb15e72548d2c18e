"""The compiled fused epilogue (lemmse_ray.kernels.epilogue) against the pure-torch epilogue and explicit float64 sums."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from lemmse_ray.kernels import compiled
from lemmse_ray.kernels import epilogue as fused
from lemmse_ray.core.statistics import finalize
from lemmse_ray.kernels.torch_kernels import matmul_partials, mixture_partials
from lemmse_ray.core.partials import merge

STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")
HAVE_COMPILER = compiled.compiler() is not None and os.environ.get("LEMMSE_RAY_FUSED", "1") != "0"


def test_library_builds_where_a_compiler_exists():
    """With a C compiler on PATH (and LEMMSE_RAY_FUSED not 0) the library must build: no silent fallback in CI."""
    assert (fused.load() is not None) == HAVE_COMPILER


def test_build_failure_falls_back(tmp_path):
    assert fused.build(None, str(tmp_path)) is None
    with pytest.warns(UserWarning, match="pure-torch"):
        assert fused.build(str(tmp_path / "no-such-cc"), str(tmp_path)) is None
    with pytest.raises(ValueError, match="epilogue"):  # float64 has no compiled epilogue
        matmul_partials(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64),
                        torch.zeros(4, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                        epilogue="compiled")
    with pytest.raises(ValueError, match="epilogue"):
        matmul_partials(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4, 1), torch.zeros(2), epilogue="fast")


def _data(seed, m=37, r=500, f=9, c=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, f, generator=g, dtype=torch.float64)
    k = torch.randn(r, f, generator=g, dtype=torch.float64)
    values = torch.rand(r, c, generator=g, dtype=torch.float64)
    shift = torch.randn(m, generator=g, dtype=torch.float64)
    return q, k, values, shift


def _close(a: dict, b: dict, rtol: float):
    for name in ("mean", "variance", "ess", "max_weight", "entropy", "log_evidence", "topk_logits"):
        x, y = a[name].to(torch.float64), b[name].to(torch.float64)
        scale = max(1.0, float(y.abs().max()))
        assert float((x - y).abs().max()) <= rtol * scale, name
    assert torch.equal(a["topk_rows"], b["topk_rows"])


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: covered by test_library_builds_where_a_compiler_exists")
@pytest.mark.parametrize("block_q,block_r", [(1024, 1024), (7, 13), (16, 1)])
def test_compiled_equals_torch_epilogue(block_q, block_r):
    """Matrix-product and mixture logits: both float32 epilogues agree with each other and with float64."""
    q, k, values, shift = _data(0)
    rows = torch.arange(100, 600)
    run = lambda dtype, ep: finalize(matmul_partials(  # noqa: E731
        q.to(dtype), k.to(dtype), values.to(dtype), shift.to(dtype), rows, STATS, 4, block_q, block_r,
        epilogue=ep), 500)
    exact = run(torch.float64, "torch")
    compiled, plain = run(torch.float32, "compiled"), run(torch.float32, "torch")
    _close(compiled, exact, 1e-5)
    _close(plain, exact, 1e-5)
    _close(compiled, plain, 1e-5)
    p, mu = torch.rand(20, 4, 2, dtype=torch.float64), torch.rand(60, 4, 2, dtype=torch.float64)
    mix = lambda dtype, ep: finalize(mixture_partials(  # noqa: E731
        p.to(dtype), mu.to(dtype), values[:60].to(dtype), shift[:20].to(dtype), 0.6, 0.3, None, STATS, 3,
        block_q, block_r, epilogue=ep), 60)
    _close(mix(torch.float32, "compiled"), mix(torch.float64, "torch"), 1e-5)


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: covered by test_library_builds_where_a_compiler_exists")
def test_compiled_underflow_and_minus_infinity():
    """Logits −inf, far below the max (2^-126 and beyond) and across blocks: sums as written out in float64."""
    logits = np.array([0.0, -math.inf, -1000.0, -0.5, -80.0, -90.0, -3.0, 2.0, -math.inf])
    values = np.arange(1.0, 10.0)[:, None]
    # logits s_r = q·k_r with q = [1]: one query, keys = the logits
    part = matmul_partials(torch.ones(1, 1), torch.tensor(logits, dtype=torch.float32)[:, None],
                           torch.tensor(values, dtype=torch.float32), torch.zeros(1), None,
                           ("variance", "ess", "entropy"), 0, 1, 4, epilogue="compiled")
    m = logits.max()
    w = np.exp(logits - m)
    l = w.sum()
    np.testing.assert_allclose(float(part.m), m, rtol=1e-6)
    np.testing.assert_allclose(float(part.l), l, rtol=1e-6)
    np.testing.assert_allclose(float(part.o), (w * values[:, 0]).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(part.o2), (w * values[:, 0] ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(part.l2), (w * w).sum(), rtol=1e-6)
    finite = np.isfinite(logits)
    np.testing.assert_allclose(float(part.ls), (w[finite] * logits[finite]).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: covered by test_library_builds_where_a_compiler_exists")
def test_compiled_result_does_not_depend_on_threads():
    q, k, values, shift = (t.to(torch.float32) for t in _data(1, m=64, r=300))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matmul_partials(q, k, values, shift, None, STATS, 3, 64, 128, epilogue="compiled")
        torch.set_num_threads(2)
        two = matmul_partials(q, k, values, shift, None, STATS, 3, 64, 128, epilogue="compiled")
    finally:
        torch.set_num_threads(threads)
    for name in ("m", "l", "o", "o2", "l2", "ls", "top_s", "top_r"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    merged = merge(one, two)  # a partial merged with itself: same mean
    torch.testing.assert_close(merged.o / merged.l[:, None], one.o / one.l[:, None], rtol=1e-6, atol=0)
