"""Global limit: with P = 2H - 1 on square H x H images, zero padding and denoising, the LE-MMSE
estimate at every pixel equals the global empirical MMSE  sum_i softmax_i(-||z - x_i||^2/(2 s^2)) x_i.

Why: P//2 = H - 1, so the patch centred at ANY pixel k = (r, c) spans rows r-(H-1) .. r+(H-1) and
likewise for columns, which always contain the whole image: Pi_k z is the full image z placed at an
offset that depends on k, surrounded by (exactly zero) padded coordinates.  The support of a
component (i, j) is {patch : padded coordinates of j are 0}.  Two different positions j != k place
the H x H image window at different offsets, so neither window contains the other; a generic query
patch Pi_k z is nonzero on k's window and therefore lies outside the support of every j != k
(it is nonzero somewhere on a padded coordinate of j).  Only the rows (i, k) count, i = 1..N, and
for them ||Pi_k z - Pi_k x_i||^2 = ||z - x_i||^2 with the same normalising constant for every i.
Hence the per-position weights reduce to per-image weights softmax_i(-||z - x_i||^2 / (2 s^2)),
and the value v_ik = x_i[:, k] gives the global MMSE at pixel k.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/reference.py
import reference as ref  # noqa: E402

import lemmse_ray as lm  # noqa: E402


def global_mmse(train, z, sigma):
    """Written out independently of the reference: per-image softmax over whole-image distances."""
    d2 = ((z[:, None] - train[None]) ** 2).sum(axis=(2, 3, 4))          # (B, N)
    logits = -d2 / (2 * sigma ** 2)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("bn,nchw->bchw", w, train), w


@pytest.mark.parametrize("C,H,sigma", [(1, 4, 0.05), (1, 4, 0.2), (1, 4, 1.0), (3, 3, 0.05), (3, 3, 1.0),
                                       (2, 5, 0.2)])
def test_global_limit_float64(C, H, sigma):
    rng = np.random.default_rng(10 * C + H)
    train = rng.random((6, C, H, H))
    x = np.concatenate([rng.random((2, C, H, H)), train[2:3]])
    problem = lm.Denoising()
    y, z, _ = problem.measure(torch.from_numpy(x), sigma, torch.Generator().manual_seed(H))
    z = z.numpy()
    want, w = global_mmse(train, z, sigma)
    res = lm.estimate(train, z, problem, sigma=sigma, patch_size=2 * H - 1, padding="zeros",
                      stats=("ess", "max_weight"), dtype=torch.float64)
    np.testing.assert_allclose(res.mean.numpy(), want, rtol=0, atol=1e-9)
    # the weights are the same at every pixel: per-image weights
    ess = 1 / (w ** 2).sum(axis=1)
    np.testing.assert_allclose(res.ess.numpy(), np.broadcast_to(ess[:, None, None], res.ess.shape), rtol=1e-8)
    np.testing.assert_allclose(res.max_weight.numpy(),
                               np.broadcast_to(w.max(axis=1)[:, None, None], res.ess.shape), rtol=1e-8)


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_global_limit_float32(sigma):
    rng = np.random.default_rng(99)
    train = rng.random((5, 2, 4, 4))
    x = rng.random((2, 2, 4, 4))
    z = x + sigma * rng.standard_normal(x.shape)
    want, _ = global_mmse(train, z, sigma)
    res = lm.estimate(torch.tensor(train, dtype=torch.float32), torch.tensor(z, dtype=torch.float32),
                      lm.Denoising(), sigma=sigma, patch_size=7, padding="zeros", dtype=torch.float32)
    np.testing.assert_allclose(res.mean.numpy(), want, rtol=0, atol=1e-4)


def test_reference_global_limit():
    """Self-test of the brute-force reference on the same identity."""
    rng = np.random.default_rng(5)
    for C, H in [(1, 4), (2, 3)]:
        train = rng.random((4, C, H, H))
        z = rng.random((2, C, H, H)) + 0.2 * rng.standard_normal((2, C, H, H))
        for sigma in (0.05, 0.3):
            R = ref.estimate(train, z, ref.RefProblem("denoising"), sigma, 2 * H - 1, "zeros")
            np.testing.assert_allclose(R.mean, global_mmse(train, z, sigma)[0], atol=1e-12)
            assert all(R.queries[b][r][c].n_counted == 4 for b in range(2) for r in range(H) for c in range(H))
