"""PatchBank: one in-memory bank, reused for several σ and query batches, gives lm.estimate's numbers."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/reference.py
import reference as ref  # noqa: E402

import lemmse_ray as lm  # noqa: E402
from lemmse_ray.bank.rows import CENTER_IMAGES, centers_from_inputs  # noqa: E402
from lemmse_ray.core.classes import plan_classes  # noqa: E402
from lemmse_ray.core.patches import PatchGeometry  # noqa: E402

ALL_STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")
FIELDS = ("mean", "variance", "ess", "max_weight", "entropy", "log_evidence", "topk_image", "topk_position",
          "topk_logits")
CASES = {  # (problem, patch size, padding, candidates): one per kernel kind and whitening shape
    "denoising-circular-interior": (lambda: lm.Denoising(), 3, "circular", "interior"),
    "denoising-tikhonov-zeros": (lambda: lm.Denoising(input="tikhonov", reg=0.3), 3, "zeros", "all"),
    "deblurring-pinv-circular": (lambda: lm.Deblurring(lm.gaussian_kernel(3, 0.8), input="pinv"), 3,
                                 "circular", "all"),
    "inpainting-masked": (lambda: lm.Inpainting(keep_prob=0.7, input="adjoint"), 3, "zeros", "all"),
    "inpainting-mixture": (lambda: lm.Inpainting(keep_prob=0.7), 3, "circular", "all"),
}


def data(seed=0, n_train=5, n_query=3, shape=(2, 6, 6)):
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(rng.random((n_train, *shape)))
    x = torch.from_numpy(rng.random((n_query, *shape)))
    return train, x


def assert_same(a: lm.Result, b: lm.Result):
    for name in FIELDS:
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None) == (v is None), name
        if u is not None:
            assert u.dtype == v.dtype and torch.equal(u, v), f"{name} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_bank_serves_several_sigmas_and_batches(case, dtype):
    """A bank built once gives, for every σ and query batch, the bits of a fresh lm.estimate call."""
    make, patch, padding, candidates = CASES[case]
    problem = make()
    train, x = data()
    bank = lm.PatchBank(train, problem, patch, padding, candidates, dtype=dtype)
    assert bank.n_rows == sum(len(k.row_ids) for k in bank.keys.values())
    for sigma in (0.3, 0.1):
        _, z, mask = problem.measure(x, sigma, torch.Generator().manual_seed(1))
        for batch in (slice(0, 1), slice(1, 3), slice(0, 3)):
            m = None if mask is None else mask[batch]
            got = bank.estimate(z[batch], sigma, mask=m, stats=ALL_STATS, topk=3)
            want = lm.estimate(train, z[batch], problem, sigma, patch, padding, candidates, mask=m,
                               stats=ALL_STATS, topk=3, dtype=dtype)
            assert_same(got, want)
            assert got.mean.shape == z[batch].shape


def test_reused_bank_against_bruteforce():
    """The second σ of a reused float64 bank still matches the independent float64 brute force."""
    train, x = data(seed=3, shape=(1, 5, 5))
    bank = lm.PatchBank(train, lm.Denoising(), 3, "circular", "all", dtype=torch.float64)
    for sigma in (0.05, 0.2):
        _, z, _ = lm.Denoising().measure(x, sigma, torch.Generator().manual_seed(2))
        res = bank.estimate(z, sigma, stats=("variance", "ess"))
        want = ref.estimate(train.numpy(), z.numpy(), ref.RefProblem("denoising", "direct"), sigma, 3, "circular",
                            "all")
        np.testing.assert_allclose(res.mean.numpy(), want.mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(res.ess.numpy(), want.ess, rtol=1e-8)


def test_centers_are_mean_keys_of_first_images():
    """Centre of a denoising class = the mean patch over the first images and the class's positions, computed
    here with explicit loops."""
    train, _ = data(seed=4, n_train=4, shape=(1, 5, 5))
    geometry = PatchGeometry((1, 5, 5), 3, "zeros", "all")
    plan = plan_classes(lm.Denoising(), geometry)
    centers = centers_from_inputs(train, plan)
    img = train.numpy()[:CENTER_IMAGES, 0]
    for c, cls in enumerate(plan.classes):
        patches = []
        for r in range(5):
            for col in range(5):
                if plan.position_class[r * 5 + col] != c:
                    continue
                for i in range(img.shape[0]):
                    patch = [img[i, r + a, col + b] if 0 <= r + a < 5 and 0 <= col + b < 5 else 0.0
                             for a in (-1, 0, 1) for b in (-1, 0, 1)]
                    patches.append([patch[k] for k in cls.random])  # whitening = identity on the random ones
        np.testing.assert_allclose(centers[c, : cls.rank], np.mean(patches, axis=0), rtol=0, atol=1e-12)


def test_patchbank_validates_before_building():
    train, x = data()
    with pytest.raises(ValueError, match="dtype"):
        lm.PatchBank(train, lm.Denoising(), dtype=torch.float16)
    with pytest.raises(ValueError, match="padding"):
        lm.PatchBank(train, lm.Denoising(), 3, padding="reflect")
    bank = lm.PatchBank(train, lm.Denoising(), 3)
    with pytest.raises(ValueError, match="sigma"):
        bank.estimate(x, 0.0)
    with pytest.raises(ValueError, match="channels"):
        bank.estimate(x[:, :1], 0.1)
    with pytest.raises(ValueError, match="stats"):
        bank.estimate(x, 0.1, stats=("median",))
    with pytest.raises(ValueError, match="mask"):
        bank.estimate(x, 0.1, mask=torch.ones(3, 6, 6))
