"""Monte-Carlo exactness test of the LE-MMSE estimator via the orthogonality principle.

Setting (see the API/maths contract): the prior is the empirical training set, the patch position K
is uniform, and g* is the exact conditional expectation

    g*(p) = E[ x_I[:, K] | Pi_K z = p ],       (I, K) uniform, z from fresh noise (and fresh masks).

g* is characterised by the orthogonality principle: for EVERY test function h of the patch,

    E[ (x_I[:, K] - g*(Pi_K z)) h(Pi_K z) ] = 0.

One Monte-Carlo draw = one training image x_I drawn uniformly at random, one fresh measurement
(y, z, mask) = problem.measure(x_I, sigma, generator), the estimate at every pixel of z (every pixel
= K uniform), residual r = x_I - g*(z).  For a test function h we average r*h over the pixels and
channels of the image (pixels of one image are dependent, images are iid), and form the statistic

    T = mean over draws of the per-image averages,   se = std(per-image averages) / sqrt(n_draws),

z = T / se ~ N(0, 1) (CLT over iid draws) when the estimator is exact.

Test functions h: fixed local functions of the patch (constant 1, centre value, patch mean, a fixed
random linear projection, squared centre value, tanh of another projection) and the library's own
estimator at other noise levels, g*_{sigma/2} and g*_{2 sigma} evaluated on the same z (these are also
local functions of the patch).  For the aware random-mask case the observation is (patch, mask patch)
so h may also depend on the mask patch.  For candidates="interior" the prior over positions is uniform
over the interior positions, so K is uniform over the interior pixels and we average over those only.

Assertions:  with the true sigma, every |z| < 4 (86 z-scores in the file, 10 cases x 8-11 test
functions; under exactness P(any |z| > 4) <= 86 * 6.3e-5 ~ 0.5 %, and everything is seeded, so the test
is deterministic);
with a deliberately wrong estimator (the estimate computed with sigma/2 instead of sigma) at least one
|z| > 5 per case (the test has power to see a wrong estimator).

Run with ``pytest -s`` to see the tables of z-scores.
"""
import functools
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lemmse_ray as lm

Z_TRUE_MAX = 4.0  # every |z| of the exact estimator must stay below this
Z_WRONG_MIN = 5.0  # the sigma/2 estimator must be rejected with max |z| above this


# --------------------------------------------------------------------------------------------
# training data: real image tiles
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def camera_tiles(n, size, seed=0):
    """n grayscale size x size tiles of skimage's `camera`, 4x block-averaged (128x128), in [0, 1].

    Returned as a float32 torch tensor of shape (n, 1, size, size)."""
    from skimage.data import camera

    img = camera().astype(np.float64) / 255.0
    img = img.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    rng = np.random.RandomState(seed)
    rows = rng.randint(0, 128 - size + 1, size=n)
    cols = rng.randint(0, 128 - size + 1, size=n)
    tiles = np.stack([img[r:r + size, c:c + size] for r, c in zip(rows, cols)])
    return torch.from_numpy(tiles[:, None].astype(np.float32))


def fixed_mask(size, keep=0.7, seed=3):
    rng = np.random.RandomState(seed)
    return (rng.rand(size, size) < keep).astype(np.float32)


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
# name -> dict(problem factory, sigma, patch size, padding, candidates, number of training tiles,
#              tile size, number of MC draws, random mask?, aware random mask?, seed)
CASES = {
    "denoise-zeros": dict(
        problem=lambda: lm.Denoising(input="direct"),
        sigma=0.2, P=3, padding="zeros", candidates="all", N=32, size=12, draws=600, seed=11),
    "denoise-circular-interior": dict(
        problem=lambda: lm.Denoising(input="direct"),
        sigma=0.2, P=3, padding="circular", candidates="interior", N=32, size=10, draws=400, seed=12),
    "deblur-tikhonov-zeros": dict(
        problem=lambda: lm.Deblurring(kernel=lm.gaussian_kernel(5, 1.0), input="tikhonov", reg=0.05),
        sigma=0.2, P=5, padding="zeros", candidates="all", N=32, size=12, draws=400, seed=13),
    "inpaint-fixed-aware-zeros": dict(
        problem=lambda: lm.Inpainting(mask=fixed_mask(12), input="adjoint"),
        sigma=0.2, P=3, padding="zeros", candidates="all", N=32, size=12, draws=400, seed=14),
    "inpaint-random-agnostic-zeros": dict(
        problem=lambda: lm.Inpainting(keep_prob=0.7, input="direct"),
        sigma=0.2, P=3, padding="zeros", candidates="all", N=16, size=8, draws=300, seed=15,
        random_mask=True),
    "inpaint-random-aware-zeros": dict(
        problem=lambda: lm.Inpainting(keep_prob=0.7, input="adjoint"),
        sigma=0.2, P=3, padding="zeros", candidates="all", N=24, size=8, draws=400, seed=16,
        random_mask=True, aware=True),
    "inpaint-random-aware-circular": dict(
        problem=lambda: lm.Inpainting(keep_prob=0.6, input="adjoint"),
        sigma=0.2, P=3, padding="circular", candidates="all", N=24, size=8, draws=400, seed=17,
        random_mask=True, aware=True),
    # pinv with a threshold that removes 35 of the 64 frequencies: rank(S_j) <= 29 < 49 = P*P, so every
    # component is degenerate (pseudo-inverse / pseudo-determinant path)
    "deblur-pinv-circular-degenerate": dict(
        problem=lambda: lm.Deblurring(kernel=lm.gaussian_kernel(5, 1.0), input="pinv", threshold=0.05),
        sigma=0.3, P=7, padding="circular", candidates="all", N=32, size=8, draws=800, seed=18),
    # generic path: nonlinear A, linear B with correlated (and globally rank-deficient) B B^T
    "generic-nonlinear-zeros": dict(
        problem=lambda: lm.LinearInverseProblem(forward=lambda x: torch.tanh(3.0 * x - 1.5),
                                                input_op=lambda y: 0.5 * (y + torch.roll(y, 1, dims=-1))),
        sigma=0.4, P=3, padding="zeros", candidates="all", N=32, size=10, draws=400, seed=19),
    # P > H with circular padding: pixels appear twice in a patch (duplicated coordinates, degenerate S)
    "denoise-circular-wrapping": dict(
        problem=lambda: lm.Denoising(input="direct"),
        sigma=0.5, P=5, padding="circular", candidates="all", N=32, size=4, draws=1000, seed=20),
}


# --------------------------------------------------------------------------------------------
# patches and test functions
# --------------------------------------------------------------------------------------------
def patches(x, P, padding):
    """(B, C, H, W) -> (B, C*P*P, H*W): Pi_k x for every pixel k, (channel, row, col) order."""
    r = P // 2
    if padding == "circular":
        x = F.pad(x, (r, r, r, r), mode="circular")
        return F.unfold(x, P)
    return F.unfold(x, P, padding=r)


def make_test_functions(z, P, padding, est_other, mp=None):
    """Dictionary name -> h of shape (B, 1 or C, H*W): local functions of the patch of z (and of the
    mask patch for the aware random-mask case).  est_other: name -> (B, C, H, W) estimates g*_{s'}(z)."""
    B, C, H, W = z.shape
    D = C * P * P
    pz = patches(z.double(), P, padding)  # (B, D, HW)
    gen = torch.Generator().manual_seed(1234)  # fixed projections (same for every case with same D)
    a1 = torch.randn(D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    a2 = torch.randn(D, generator=gen, dtype=torch.float64) * (2.0 / math.sqrt(D))
    centre = z.double().reshape(B, C, H * W)  # centre coordinate of each channel's patch
    h = {
        "1": torch.ones(B, 1, H * W, dtype=torch.float64),
        "centre": centre,
        "patch mean": pz.mean(1, keepdim=True),
        "projection": torch.einsum("d,bdk->bk", a1, pz)[:, None],
        "centre^2": centre ** 2,
        "tanh(proj)": torch.tanh(torch.einsum("d,bdk->bk", a2, pz - 0.5 * (pz != 0)))[:, None],
    }
    for name, g in est_other.items():
        h[name] = g.double().reshape(B, C, H * W)
    if mp is not None:  # aware random-mask case: h may depend on the mask patch (B, P*P, HW)
        n_obs = mp.sum(1, keepdim=True)
        h["mask centre"] = mp[:, (P * P) // 2][:, None]
        h["obs fraction"] = n_obs / (P * P)
        h["obs mean"] = (pz.reshape(B, C, P * P, H * W) * mp[:, None]).sum(2) / n_obs.clamp(min=1)
    return h


def region(H, W, P, candidates):
    """Pixels over which K is uniform: all of them, or the interior ones for candidates='interior'."""
    if candidates == "interior":
        r = P // 2
        m = torch.zeros(H, W, dtype=torch.bool)
        m[r:H - r, r:W - r] = True
        return m.flatten()
    return torch.ones(H * W, dtype=torch.bool)


def zscores(resid, h, sel):
    """resid (B, C, HW); h name -> (B, 1|C, HW).  z-score of mean over draws of per-image mean(r*h)."""
    out = {}
    for name, hv in h.items():
        per_draw = (resid * hv)[..., sel].mean(dim=(1, 2))  # (B,) iid over draws
        n = per_draw.numel()
        T = per_draw.mean().item()
        se = per_draw.std(correction=1).item() / math.sqrt(n)
        out[name] = (T / se if se > 0 else (0.0 if T == 0 else math.inf), T, se)
    return out


# --------------------------------------------------------------------------------------------
# Monte Carlo (one batched run per case, shared by the calibration and the power test)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def run_case(name):
    cfg = CASES[name]
    t0 = time.perf_counter()
    problem = cfg["problem"]()
    train = camera_tiles(cfg["N"], cfg["size"])
    sigma, P, padding, cand = cfg["sigma"], cfg["P"], cfg["padding"], cfg["candidates"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    idx = torch.randint(cfg["N"], (cfg["draws"],), generator=gen)
    x = train[idx]  # (B, C, H, W): x_I drawn from the (empirical) prior
    y, z, mask = problem.measure(x, sigma, gen)
    mask_arg = mask if cfg.get("random_mask") else None

    def est(s):
        res = lm.estimate(train, z, problem, sigma=s, patch_size=P, padding=padding,
                          candidates=cand, mask=mask_arg)
        return res.mean.double()

    g = {s: est(s) for s in (sigma, sigma / 2, 2 * sigma)}
    B, C, H, W = z.shape
    mp = None
    if cfg.get("aware"):
        mp = patches(mask.double().reshape(B, 1, H, W), P, padding)  # zero-padded mask patch
    h = make_test_functions(z, P, padding, {"g*(sigma/2)": g[sigma / 2], "g*(2 sigma)": g[2 * sigma]}, mp)
    sel = region(H, W, P, cand)
    xs = x.double().reshape(B, C, H * W)
    z_true = zscores(xs - g[sigma].reshape(B, C, H * W), h, sel)
    z_wrong = zscores(xs - g[sigma / 2].reshape(B, C, H * W), h, sel)
    elapsed = time.perf_counter() - t0

    lines = [f"\n=== {name}: N={cfg['N']} tiles {H}x{W}, P={P}, padding={padding}, candidates={cand}, "
             f"sigma={sigma}, draws={B}, {elapsed:.1f}s ===",
             f"{'test function h':<16}{'z (true sigma)':>16}{'z (sigma/2 est.)':>18}"]
    for k in h:
        lines.append(f"{k:<16}{z_true[k][0]:>16.2f}{z_wrong[k][0]:>18.2f}")
    print("\n".join(lines))
    return z_true, z_wrong


@pytest.mark.parametrize("name", list(CASES))
def test_orthogonality_exact_estimator(name):
    z_true, _ = run_case(name)
    bad = {k: round(v[0], 2) for k, v in z_true.items() if not abs(v[0]) < Z_TRUE_MAX}
    assert not bad, f"{name}: residual of the exact estimator correlates with test functions: {bad}"


@pytest.mark.parametrize("name", list(CASES))
def test_orthogonality_detects_wrong_sigma(name):
    _, z_wrong = run_case(name)
    zmax = max(abs(v[0]) for v in z_wrong.values())
    assert zmax > Z_WRONG_MIN, f"{name}: no power against the sigma/2 estimator (max |z| = {zmax:.2f})"
