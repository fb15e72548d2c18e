"""lemmse_ray.kernels.triton_kernel (fused Triton kernel) and the ``kernel=`` selection, on the CPU.

The kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before any import of the
kernel).  Expected values come from an independent float64 reference written here with explicit loops: the
logits are computed from the distances they stand for (whitened: :math:`-\\lVert q-k\\rVert^2/2\\sigma^2 + b`;
random-mask aware: :math:`-\\sum_i m_i (p_i-\\mu_i)^2/2\\sigma^2 + b`), not from the feature trick the kernel
uses, then softmax statistics per query.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lemmse_ray as lm
from lemmse_ray.kernels import resolver as backends
from lemmse_ray.core.statistics import finalize
from lemmse_ray.kernels.triton_kernel import _tf32, interpreted, triton_matmul_partials

STATS = ("variance", "ess", "entropy")  # with mean, max_weight and log_evidence: every statistic but top-k
NAMES = ("mean", "variance", "ess", "max_weight", "entropy", "log_evidence")
BLOCKS = {"block_m": 16, "block_n": 16, "block_f": 16}  # small tiles: partial blocks, several tiles and chunks


def test_runs_in_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1" and interpreted()


# --------------------------------------------------------------------------------------------------------------
# independent float64 reference
# --------------------------------------------------------------------------------------------------------------
def problem(form: str, m: int, r: int, d: int, c: int, seed: int):
    """Random queries/rows, the float64 logits (from distances) and the kernel's float32 features.

    Returns (logits (m, r), values (r, c), q_feat, k_feat, shift) — features as in lemmse_ray.bank.features.
    """
    rng = np.random.default_rng(seed)
    sigma = 0.5
    var = sigma * sigma
    p = rng.normal(size=(m, d)) * 0.4
    mu = rng.normal(size=(r, d)) * 0.4
    b = rng.normal(size=m) * 20.0  # per-query constant (class normalisation, log-prior)
    values = rng.uniform(0.0, 1.0, size=(r, c))
    mask = np.ones((m, d)) if form == "whitened" else (rng.uniform(size=(m, d)) < 0.6).astype(float)
    logits = np.empty((m, r))
    for i in range(m):
        for j in range(r):
            logits[i, j] = -sum(mask[i, t] * (p[i, t] - mu[j, t]) ** 2 for t in range(d)) / (2 * var) + b[i]
    if form == "whitened":
        q_feat = np.concatenate([p / var, np.full((m, 1), -1.0 / var)], axis=1)
        k_feat = np.concatenate([mu, 0.5 * (mu * mu).sum(axis=1, keepdims=True)], axis=1)
    else:
        q_feat = np.concatenate([mask * p, -0.5 * mask], axis=1) / var
        k_feat = np.concatenate([mu, mu * mu], axis=1)
    shift = -0.5 * (mask * p * p).sum(axis=1) / var + b
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return logits, values, f32(q_feat), f32(k_feat), f32(values), f32(shift)


def reference(logits: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """Softmax statistics of each query, one query at a time with explicit sums."""
    m, r = logits.shape
    out = {name: [] for name in NAMES}
    for i in range(m):
        s = logits[i]
        top = max(s)
        e = [math.exp(x - top) for x in s]
        z = sum(e)
        w = [x / z for x in e]
        lse = top + math.log(z)
        mean = [sum(w[j] * values[j, ch] for j in range(r)) for ch in range(values.shape[1])]
        out["mean"].append(mean)
        out["variance"].append([max(0.0, sum(w[j] * values[j, ch] ** 2 for j in range(r)) - mean[ch] ** 2)
                                for ch in range(values.shape[1])])
        out["ess"].append(1.0 / sum(x * x for x in w))
        out["max_weight"].append(max(w))
        out["entropy"].append(-sum(w[j] * (s[j] - lse) for j in range(r)))
        out["log_evidence"].append(lse - math.log(r))
    return {name: np.array(v) for name, v in out.items()}


def errors(out: dict[str, torch.Tensor], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest error of each statistic, relative to |reference| + 1 (values lie in [0, 1]; logits ~ 10–100)."""
    return {name: float((np.abs(out[name].double().numpy() - ref[name]) / (np.abs(ref[name]) + 1.0)).max())
            for name in NAMES}


def run(q_feat, k_feat, values, shift, n_rows, **kwargs) -> dict[str, torch.Tensor]:
    return finalize(triton_matmul_partials(q_feat, k_feat, values, shift, STATS, **kwargs), n_rows)


# --------------------------------------------------------------------------------------------------------------
# accuracy of every statistic, both logit forms, odd sizes
# --------------------------------------------------------------------------------------------------------------
CASES = [  # (m queries, r rows, d, channels): partial query/row blocks, one query, rows < one block, C = 1
    (19, 70, 10, 3),
    (1, 37, 10, 3),
    (33, 9, 7, 1),
]


@pytest.mark.parametrize("form", ["whitened", "masked"])
@pytest.mark.parametrize("m,r,d,c", CASES)
def test_matches_float64_reference(form, m, r, d, c):
    logits, values, q_feat, k_feat, v, shift = problem(form, m, r, d, c, seed=m * 100 + r)
    ref = reference(logits, values)
    for kwargs in (BLOCKS, {}):  # feature chunks of 16 (masked: 2 chunks), and the defaults (one chunk)
        err = errors(run(q_feat, k_feat, v, shift, r, **kwargs), ref)
        assert max(err.values()) < 2e-5, (kwargs, err)


def test_reference_is_not_trivially_met():
    """A wrong logit (one row's logit off by 0.05) is caught by the tolerance above."""
    logits, values, q_feat, k_feat, v, shift = problem("whitened", 19, 70, 10, 3, seed=1970)
    k_bad = k_feat.clone()
    k_bad[5, -1] += 0.05 * 0.25  # feature ½|k|², times σ²: logit of row 5 lowered by 0.05
    err = errors(run(q_feat, k_bad, v, shift, 70, **BLOCKS), reference(logits, values))
    assert max(err.values()) > 1e-4


@pytest.mark.parametrize("form", ["whitened", "masked"])
def test_split_invariance(form):
    """Row ranges (split-K) merged exactly: any number of ranges gives the same statistics (float32 rounding)."""
    logits, values, q_feat, k_feat, v, shift = problem(form, 17, 100, 9, 3, seed=7)
    ref = reference(logits, values)
    outs = {n: run(q_feat, k_feat, v, shift, 100, n_splits=n, **BLOCKS) for n in (1, 2, 3, 7)}
    for n, out in outs.items():
        assert max(errors(out, ref).values()) < 2e-5, n
        for name in NAMES:
            assert torch.allclose(out[name], outs[1][name], rtol=2e-5, atol=2e-6), (n, name)


@pytest.mark.parametrize("form", ["whitened", "masked"])
def test_tf32x3_within_twice_ieee_error(form):
    """The three-product TF32 split keeps float32-level accuracy: every statistic's error within 2× of the
    ieee kernel's, plus 4 float32 ulps (2⁻²²) of slack — at the ulp level which of two runs errs more is luck,
    and a split product errs by up to 3·2⁻²⁴ relative against 2⁻²⁴ for an exact product.  The emulation is
    faithful to the GPU's products (every product input is an exact TF32 value, and TF32 × TF32 products are
    exact in float32), not to a tensor core's accumulation order."""
    for seed in (11, 12, 13):
        logits, values, q_feat, k_feat, v, shift = problem(form, 20, 60, 12, 3, seed=seed)
        ref = reference(logits, values)
        ieee = run(q_feat, k_feat, v, shift, 60, precision="ieee", **BLOCKS)
        tf32x3 = run(q_feat, k_feat, v, shift, 60, precision="tf32x3", **BLOCKS)
        assert not torch.equal(ieee["mean"], tf32x3["mean"]), "tf32x3 took the ieee path"
        e_ieee, e_tf = errors(ieee, ref), errors(tf32x3, ref)
        for name in NAMES:
            assert e_tf[name] <= 2 * e_ieee[name] + 2 ** -22, (seed, name, e_tf[name], e_ieee[name])


def test_tf32_rounding():
    """``_tf32`` rounds to the nearest value with 11 significant bits (ties away from zero), in a tiny kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def apply(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, _tf32(tl.load(x_ptr + offs)))

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=60) * 10.0 ** rng.integers(-6, 6, size=60),
                        [1 + 2 ** -11, -(1 + 3 * 2 ** -11), 1 + 2 ** -12, 0.0]]).astype(np.float32)
    y = torch.empty(64)
    apply[(1,)](torch.from_numpy(x), y, N=64)
    mant, expo = np.frexp(x.astype(np.float64))  # |mant| in [0.5, 1): 11 significant bits = mant·2¹¹
    expected = np.sign(mant) * np.floor(np.abs(mant) * 2 ** 11 + 0.5) / 2 ** 11 * 2.0 ** expo
    np.testing.assert_array_equal(y.numpy().astype(np.float64), expected)
    assert (y.numpy().view(np.int32) & 0x1FFF == 0).all()


# --------------------------------------------------------------------------------------------------------------
# selection (kernel=) and validation
# --------------------------------------------------------------------------------------------------------------
def test_kernel_validation():
    with pytest.raises(ValueError, match="kernel"):
        backends.check_kernel("cuda")
    with pytest.raises(ValueError, match="kernel"):
        backends.check_kernel("triton", torch.float64)
    with pytest.raises(ValueError, match="precision"):
        triton_matmul_partials(*problem("whitened", 2, 3, 2, 1, 0)[2:], precision="tf32")
    with pytest.raises(ValueError, match="top-k"):
        triton_matmul_partials(*problem("whitened", 2, 3, 2, 1, 0)[2:], stats=("topk",))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1, 5, 5), generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernel"):
        lm.estimate(x, x, lm.Denoising(), sigma=0.2, patch_size=3, kernel="fast")
    with pytest.raises(ValueError, match="kernel"):
        lm.estimate(x, x, lm.Denoising(), sigma=0.2, patch_size=3, dtype=torch.float64, kernel="triton")
    from lemmse_ray.cluster.actors import start_actors

    with pytest.raises(ValueError, match="kernel"):  # validated before Ray is touched
        start_actors(None, 1, "float32", kernel="gpu")
    with pytest.raises(ValueError, match="kernel"):
        start_actors(None, 1, "float64", kernel="triton")


def _plan(problem=None):
    from lemmse_ray.core.classes import plan_classes
    from lemmse_ray.core.patches import PatchGeometry

    return plan_classes(problem or lm.Denoising(), PatchGeometry((1, 5, 5), 3, "zeros", "all"))


def test_triton_unavailable_is_a_clear_error(monkeypatch):
    import lemmse_ray.kernels.triton_kernel as tk

    monkeypatch.setattr(tk, "interpreted", lambda: False)  # as on a CPU without the interpreter
    with pytest.raises(ValueError, match="CUDA"):
        backends.resolve("triton", _plan(), dtype=torch.float32, device="cpu")
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="triton package"):
        backends.resolve("triton", _plan(), dtype=torch.float32, device="cpu")


def test_auto_selection():
    plan = _plan()
    chosen = lambda kernel, stats=(): {c.backend for c in backends.resolve(  # noqa: E731
        kernel, plan, dtype=torch.float32, device="cpu", stats=stats).values()}
    assert chosen("auto") == {"torch"}  # CPU: torch, even under the interpreter
    assert chosen("torch") == {"torch"}
    assert chosen("triton") == {"triton"}
    assert chosen("triton", ("variance", "topk")) == {"torch"}  # top-k: the torch kernel


@pytest.mark.parametrize("name", ["denoising", "aware random-mask inpainting"])
def test_estimate_with_triton_matches_torch(name):
    """``estimate(kernel="triton")`` (through scan) against ``kernel="torch"`` in float64, every statistic,
    and top-k (computed by the torch kernel) identical to the torch float32 run."""
    gen = torch.Generator().manual_seed(1)
    train = torch.rand((3, 2, 6, 6), generator=gen, dtype=torch.float64)
    x = torch.rand((1, 2, 6, 6), generator=gen, dtype=torch.float64)
    problem_ = lm.Denoising() if name == "denoising" else lm.Inpainting(keep_prob=0.7, input="adjoint")
    _, z, mask = problem_.measure(x, 0.3, gen)
    common = dict(sigma=0.3, patch_size=3, mask=mask, stats=("variance", "ess", "max_weight", "entropy",
                                                               "log_evidence"))
    ref = lm.estimate(train, z, problem_, dtype=torch.float64, kernel="torch", **common)
    fused = lm.estimate(train, z, problem_, kernel="triton", **common)
    for stat in NAMES:
        a, b = getattr(fused, stat).double(), getattr(ref, stat)
        assert ((a - b).abs() / (b.abs() + 1)).max() < 2e-5, stat
    common["stats"] = ("topk",)
    top_torch = lm.estimate(train, z, problem_, kernel="torch", **common)
    top_fused = lm.estimate(train, z, problem_, kernel="triton", **common)
    assert torch.equal(top_fused.topk_position, top_torch.topk_position)


def test_ray_actors_with_triton(tmp_path, ray_cluster):
    """``estimate_on_ray(kernel="triton")``: the shard actors (which inherit TRITON_INTERPRET=1 from this
    session; without it kernel="triton" raises on the CPU) scan with the fused kernel and give the in-memory
    float64 numbers."""
    from lemmse_ray.cluster.build import build_bank
    from lemmse_ray.cluster.driver import estimate_on_ray

    gen = torch.Generator().manual_seed(2)
    train = torch.rand((4, 1, 6, 6), generator=gen, dtype=torch.float64)
    x = torch.rand((2, 1, 6, 6), generator=gen, dtype=torch.float64)
    problem_ = lm.Denoising()
    _, z, _ = problem_.measure(x, 0.3, gen)
    bank = build_bank(str(tmp_path / "bank"), train, problem_, patch_size=3, shard_rows=64, progress=False)
    group = estimate_on_ray(bank, z, 0.3, str(tmp_path / "out"), stats=("variance", "ess"), n_actors=2,
                            progress=False, kernel="triton")
    ref = lm.estimate(train, z, problem_, sigma=0.3, patch_size=3, stats=("variance", "ess"), dtype=torch.float64)
    np.testing.assert_allclose(group["mean"][...], ref.mean.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(group["ess"][...], ref.ess.numpy(), rtol=2e-5)


def test_gpu_check_plumbing_on_cpu():
    """scripts/gpu_check.py --allow-cpu (interpreter, tiny sizes) runs without importing ray or zarr."""
    root = Path(__file__).resolve().parents[2]
    blocker = ("import sys, runpy\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('ray', 'zarr'):\n"
               "            raise ImportError(f'{name} is blocked: gpu_check must not need it')\n"
               "sys.meta_path.insert(0, Block())\n"
               f"sys.argv = ['gpu_check.py', '--allow-cpu']\n"
               f"runpy.run_path({str(root / 'scripts' / 'gpu_check.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: OK" in proc.stdout
