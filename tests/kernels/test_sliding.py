"""The sliding-window kernel (lemmse_ray.kernels.sliding) against float64 references written out with explicit loops."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/reference.py
import reference as ref  # noqa: E402

import lemmse_ray as lm  # noqa: E402
from lemmse_ray.kernels import sliding  # noqa: E402
from lemmse_ray.core.statistics import finalize  # noqa: E402

STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence")
HAVE_KERNEL = sliding.load() is not None
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="no C compiler: see test_sliding_kernel_builds")


def test_sliding_kernel_builds_where_a_compiler_exists():
    """With a C compiler (and LEMMSE_RAY_FUSED not 0) the kernel must build: no silent fallback in CI."""
    from lemmse_ray.kernels import compiled as fused
    assert HAVE_KERNEL == (fused.compiler() is not None and fused.enabled())


def windows_reference(train: np.ndarray, z: np.ndarray, sigma: float, patch: int, candidates: str) -> dict:
    """Circular padding, float64: every window of every training image (of the images padded by wrapping for
    ``candidates="all"``) against the window of the wrapped query image at every pixel, one query at a time."""
    half = patch // 2
    wrap = lambda a: np.pad(a, ((0, 0), (0, 0), (half, half), (half, half)), mode="wrap")  # noqa: E731
    n, channels, height, width = train.shape
    images = wrap(train) if candidates == "all" else train
    keys, values = [], []
    for i in range(n):
        for r in range(images.shape[2] - patch + 1):
            for c in range(images.shape[3] - patch + 1):
                keys.append(images[i, :, r:r + patch, c:c + patch].ravel())
                values.append(images[i, :, r + half, c + half])
    keys, values = np.array(keys), np.array(values)
    dim = keys.shape[1]
    padded = wrap(z)
    out = {name: np.zeros((z.shape[0], height, width)) for name in STATS if name != "variance"}
    out["mean"] = np.zeros(z.shape)
    out["variance"] = np.zeros(z.shape)
    for b in range(z.shape[0]):
        for r in range(height):
            for c in range(width):
                q = padded[b, :, r:r + patch, c:c + patch].ravel()
                s = -((keys - q) ** 2).sum(axis=1) / (2 * sigma ** 2) - 0.5 * dim * math.log(2 * math.pi * sigma ** 2)
                top = s.max()
                w = np.exp(s - top)
                p = w / w.sum()
                mean = p @ values
                out["mean"][b, :, r, c] = mean
                out["variance"][b, :, r, c] = p @ values ** 2 - mean ** 2
                out["ess"][b, r, c] = 1.0 / (p ** 2).sum()
                out["max_weight"][b, r, c] = p.max()
                out["entropy"][b, r, c] = -(p[p > 0] * np.log(p[p > 0])).sum()
                out["log_evidence"][b, r, c] = top + math.log(w.sum()) - math.log(len(keys))
    return out


UNIT = 2.0 ** -24  # float32's rounding unit
TOLERANCES = {"mean": 4, "variance": 2, "ess": 8, "max_weight": 8, "entropy": 16, "log_evidence": 16}
"""Error bounds in units of d·2^-24 (d = C·P²: rounding in the distances grows with the patch dimension),
relative to max(1, |reference|); the float32 matrix-product path stays within the same bounds here."""


def assert_close(got: lm.Result, want: dict, dim: int):
    for name, factor in TOLERANCES.items():
        g = getattr(got, name).to(torch.float64).numpy()
        w = want[name]
        err = float((np.abs(g - w) / np.maximum(1.0, np.abs(w))).max())
        assert err <= factor * dim * UNIT, f"{name}: {err:.2e} > {factor} d u = {factor * dim * UNIT:.1e}"


def images(seed: int, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth-ish random images (neighbouring pixels correlated, so that patches do not all look alike)."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, shape[0], shape[1] // 2 + 1, shape[2] // 2 + 1))
    up = base.repeat(2, axis=2).repeat(2, axis=3)[:, :, : shape[1], : shape[2]]
    return np.clip(0.7 * up + 0.3 * rng.random((n, *shape)), 0, 1)


@needs_kernel
@pytest.mark.parametrize("channels,patch,size,n_train", [(3, 5, 10, 21), (1, 3, 8, 5), (2, 3, 7, 16),
                                                         (1, 7, 9, 3), (3, 9, 11, 2), (1, 11, 12, 2)],
                         ids=["C3P5-tail", "C1P3", "C2-generic", "C1P7", "C3P9", "C1P11-generic"])
@pytest.mark.parametrize("candidates", ["interior", "all"])
def test_sliding_equals_float64_windows(channels, patch, size, n_train, candidates):
    """Every statistic but top-k, float32 sliding kernel vs explicit float64 loops: specialised and generic
    (channels, P), bank sizes that leave a partial last lane group, both candidate sets."""
    if candidates == "interior" and size - patch + 1 < 1:
        pytest.skip("no interior window")
    shape = (channels, size, size + 1)
    train = images(0, n_train, shape)
    x = images(1, 2, shape)
    sigma = 0.15
    z = x + sigma * np.random.default_rng(2).standard_normal(x.shape)
    bank = lm.PatchBank(torch.from_numpy(train), lm.Denoising(), patch, "circular", candidates)
    assert bank.sliding is not None
    got = bank.estimate(torch.from_numpy(z), sigma, stats=STATS)
    assert got.info["sliding_class"] == 0
    assert_close(got, windows_reference(train, z, sigma, patch, candidates), channels * patch ** 2)


@needs_kernel
@pytest.mark.parametrize("sigma", [0.01, 0.05, 30.0])
def test_sliding_at_extreme_noise_levels(sigma):
    """A very peaked posterior (one patch takes nearly all the weight, running minimum updated often) and a
    nearly flat one (every term counts)."""
    shape = (3, 8, 8)
    train = images(3, 19, shape)
    x = images(4, 1, shape)
    z = x + sigma * np.random.default_rng(5).standard_normal(x.shape)
    got = lm.estimate(torch.from_numpy(train), torch.from_numpy(z), lm.Denoising(), sigma, patch_size=5,
                      padding="circular", candidates="all", stats=STATS)
    assert got.info["sliding_class"] == 0
    assert_close(got, windows_reference(train, z, sigma, 5, "all"), 75)


@needs_kernel
@pytest.mark.parametrize("problem,padding", [
    (lambda: lm.Denoising(), "zeros"),
    (lambda: lm.Denoising(input="tikhonov", reg=0.5), "zeros"),
    (lambda: lm.Deblurring(lm.gaussian_kernel(3, 0.8)), "circular"),
    (lambda: lm.Inpainting(mask=np.array([[1, 1, 0, 1, 1, 1]] * 3 + [[1, 0, 1, 1, 1, 1]] * 3)), "zeros"),
], ids=["denoising-zeros", "denoising-tikhonov", "deblurring-agnostic", "inpainting-fixed-agnostic"])
def test_sliding_within_the_whole_estimate_matches_bruteforce(problem, padding):
    """Where the sliding kernel evaluates one class (white noise on the input, whitening w·I) and the matrix
    product the others (zero-padding border classes), the whole estimate matches the brute force of the
    library-independent reference (explicit matrices, float64)."""
    problem = problem()
    rng = np.random.default_rng(6)
    train, x = rng.random((5, 1, 6, 6)), rng.random((2, 1, 6, 6))
    sigma = 0.2
    _, z, _ = problem.measure(torch.from_numpy(x), sigma, torch.Generator().manual_seed(7))
    got = lm.estimate(torch.from_numpy(train), z, problem, sigma, patch_size=3, padding=padding, stats=STATS)
    assert got.info["sliding_class"] is not None
    want = ref.estimate(train, z.numpy(), ref_problem(problem), sigma, 3, padding)
    for name, factor in TOLERANCES.items():
        g, w = getattr(got, name).to(torch.float64).numpy(), getattr(want, name)
        assert float((np.abs(g - w) / np.maximum(1.0, np.abs(w))).max()) <= factor * 9 * UNIT, name


def ref_problem(problem):
    if isinstance(problem, lm.Denoising):
        return ref.RefProblem("denoising", problem.input, reg=problem.reg)
    if isinstance(problem, lm.Deblurring):
        return ref.RefProblem("deblurring", problem.input, kernel=problem.kernel.numpy(), reg=problem.reg)
    return ref.RefProblem("inpainting", problem.input, mask=problem.mask.numpy(), reg=problem.reg)


@needs_kernel
def test_threads_do_not_change_a_bit():
    """Work items, lanes and chunks are merged in a fixed order: 1, 2 or 3 threads give the same bits."""
    train = torch.from_numpy(images(8, 70, (3, 9, 9)))
    z = torch.from_numpy(images(9, 3, (3, 9, 9)))
    bank = lm.PatchBank(train, lm.Denoising(), 3, "circular", "all")
    runs = [sliding.sliding_partials(bank.sliding, z, 0.1, STATS, threads=t) for t in (1, 2, 3)]
    for run in runs[1:]:
        for name in ("m", "l", "o", "o2", "l2", "ls"):
            assert torch.equal(getattr(run, name), getattr(runs[0], name)), name


@needs_kernel
def test_auto_matches_the_matrix_product_and_topk_falls_back():
    train = torch.from_numpy(images(10, 9, (3, 8, 8)))
    z = torch.from_numpy(images(11, 2, (3, 8, 8)))
    bank = lm.PatchBank(train, lm.Denoising(), 5, "circular", "interior")
    auto = bank.estimate(z, 0.1, stats=STATS)
    torch_ = bank.estimate(z, 0.1, stats=STATS, kernel="torch")
    assert auto.info["sliding_class"] == 0 and torch_.info["sliding_class"] is None
    for name in STATS + ("mean",):
        a, b = getattr(auto, name), getattr(torch_, name)
        bound = 2 * TOLERANCES[name] * 75 * UNIT  # each within its bound of the exact value
        assert float(((a - b).abs() / b.abs().clamp(min=1.0)).max()) <= bound, name
    with_topk = bank.estimate(z, 0.1, stats=STATS + ("topk",), topk=2)
    assert with_topk.info["sliding_class"] is None and with_topk.topk_image is not None
    plain = bank.estimate(z, 0.1, stats=STATS + ("topk",), topk=2, kernel="torch")
    assert torch.equal(with_topk.mean, plain.mean) and torch.equal(with_topk.topk_position, plain.topk_position)
    # keys of the sliding class are built only when the matrix product needs them, and are the eager ones
    eager = lm.PatchBank(train, lm.Denoising(), 5, "circular", "interior", dtype=torch.float64).keys[0]
    assert torch.allclose(bank.keys[0].features.double(), eager.features, atol=1e-6)


@needs_kernel
def test_kernel_choice_is_checked():
    train = torch.from_numpy(images(12, 4, (1, 6, 6)))
    z = torch.from_numpy(images(13, 1, (1, 6, 6)))
    bank = lm.PatchBank(train, lm.Denoising(), 3, "circular", "all")
    with pytest.raises(ValueError, match="top-k"):
        bank.estimate(z, 0.1, stats=("topk",), kernel="sliding")
    with pytest.raises(ValueError, match="kernel must be one of"):
        bank.estimate(z, 0.1, kernel="fast")
    with pytest.raises(ValueError, match="float32"):
        lm.estimate(train, z, lm.Denoising(), 0.1, patch_size=3, dtype=torch.float64, kernel="sliding")
    masked = lm.PatchBank(train, lm.Inpainting(keep_prob=0.5), 3, "circular", "all")
    assert masked.sliding is None
    with pytest.raises(ValueError, match="kernel='sliding' needs"):
        masked.estimate(z, 0.1, mask=torch.ones(1, 1, 6, 6), kernel="sliding")


@needs_kernel
@pytest.mark.parametrize("make,patch,padding", [
    (lambda: lm.Denoising(), 3, "zeros"),  # eligible: the interior class
    (lambda: lm.Denoising(), 7, "circular"),  # P > H: coordinates repeat inside a patch, S is not I
    (lambda: lm.Deblurring(lm.gaussian_kernel(3, 0.8), input="pinv"), 3, "circular"),  # coloured noise
    (lambda: lm.Inpainting(keep_prob=0.6, input="adjoint"), 3, "zeros"),  # random masks
])
def test_eligibility(make, patch, padding):
    problem = make()
    train = torch.from_numpy(images(14, 3, (1, 6, 6)))
    bank = lm.PatchBank(train, problem, patch, padding)
    eligible = isinstance(problem, lm.Denoising) and patch <= 6
    assert (bank.sliding is not None) == eligible
    assert lm.PatchBank(train, problem, patch, padding, dtype=torch.float64).sliding is None


def test_without_compiled_kernel_the_matrix_product_serves(monkeypatch):
    monkeypatch.setattr(sliding, "load", lambda: None)
    train = torch.from_numpy(images(15, 4, (1, 6, 6)))
    z = torch.from_numpy(images(16, 1, (1, 6, 6)))
    bank = lm.PatchBank(train, lm.Denoising(), 3, "circular", "all")
    assert bank.sliding is None
    res = bank.estimate(z, 0.1, stats=STATS)
    assert res.info["sliding_class"] is None
    monkeypatch.undo()
    with_kernel = lm.PatchBank(train, lm.Denoising(), 3, "circular", "all")
    plain = with_kernel.estimate(z, 0.1, stats=STATS, kernel="torch")
    for name in STATS + ("mean",):
        assert torch.equal(getattr(res, name), getattr(plain, name)), name
    with pytest.raises(ValueError, match="kernel='sliding' needs"):
        bank.estimate(z, 0.1, kernel="sliding")


@needs_kernel
def test_partials_merge_like_the_matrix_product():
    """Sliding partials of two halves of a bank, merged, equal the float64 partials of the whole bank."""
    from lemmse_ray.core.partials import merge
    train = torch.from_numpy(images(17, 12, (3, 7, 7)))
    z = torch.from_numpy(images(18, 2, (3, 7, 7)))
    whole = lm.PatchBank(train, lm.Denoising(), 3, "circular", "all")
    halves = [lm.PatchBank(train[i:i + 6], lm.Denoising(), 3, "circular", "all") for i in (0, 6)]
    merged = merge(*(sliding.sliding_partials(h.sliding, z, 0.2, STATS) for h in halves))
    want = windows_reference(train.numpy(), z.numpy(), 0.2, 3, "all")
    got = finalize(merged.to(torch.float64), whole.n_rows)
    for name in STATS:
        g = got[name].reshape(want[name].shape[0], 7, 7, -1).squeeze(-1)
        w = want[name] if name != "variance" else np.moveaxis(want[name], 1, -1)
        g = g.numpy() if name != "variance" else got[name].reshape(2, 7, 7, 3).numpy()
        assert float((np.abs(g - w) / np.maximum(1.0, np.abs(w))).max()) <= TOLERANCES[name] * 27 * UNIT, name
