"""Bad input must raise ValueError naming the offending parameter."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import lemmse_ray as lm

RNG = np.random.default_rng(0)
TRAIN = RNG.random((4, 1, 5, 5))
Z = RNG.random((2, 1, 5, 5))
MASK = (RNG.random((2, 1, 5, 5)) < 0.6).astype(np.float64)


def call(train=TRAIN, z=Z, problem=None, **kw):
    kw.setdefault("sigma", 0.1)
    kw.setdefault("patch_size", 3)
    return lm.estimate(train, z, problem if problem is not None else lm.Denoising(), **kw)


def raises(names, fn):
    """fn() (construction and/or estimation) must raise ValueError naming one of `names`."""
    names = (names,) if isinstance(names, str) else names
    pattern = "|".join(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])" for n in names)
    with pytest.raises(ValueError, match=pattern):
        fn()


@pytest.mark.parametrize("sigma", [0.0, -0.1, math.nan, math.inf, -math.inf])
def test_sigma(sigma):
    raises("sigma", lambda: call(sigma=sigma))


@pytest.mark.parametrize("P", [2, 4, 0, -1, 11])
def test_patch_size(P):
    raises("patch_size", lambda: call(patch_size=P))


def test_patch_size_nonsquare_limit():
    train, z = RNG.random((3, 1, 4, 6)), RNG.random((1, 1, 4, 6))
    call(train, z, patch_size=7)                      # 2*min(H,W)-1 = 7 is allowed
    raises("patch_size", lambda: call(train, z, patch_size=9))


def test_random_mask_circular_patch_too_big():
    train, z = RNG.random((3, 1, 4, 4)), RNG.random((2, 1, 4, 4))
    m = np.ones((2, 1, 4, 4))
    prob = lm.Inpainting(keep_prob=0.6, input="adjoint")
    call(train, z, prob, patch_size=5, padding="zeros", mask=m)   # fine under zero padding
    raises("patch_size", lambda: call(train, z, prob, patch_size=5, padding="circular", mask=m))


def test_channel_mismatch():
    raises(("z", "train"), lambda: call(z=RNG.random((2, 2, 5, 5))))


@pytest.mark.parametrize("shape", [(2, 1, 5, 4), (2, 1, 4, 5), (2, 1, 6, 6)])
def test_spatial_mismatch(shape):
    raises(("z", "train"), lambda: call(z=RNG.random(shape)))


@pytest.mark.parametrize("mode", ["direct", "adjoint"])
@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (3, 1, 5, 5), (2, 1, 5, 4), (2, 2, 5, 5)])
def test_mask_shape(mode, shape):
    prob = lm.Inpainting(keep_prob=0.6, input=mode)
    raises("mask", lambda: call(problem=prob, mask=np.ones(shape)))


def test_mask_missing_for_random_aware():
    raises("mask", lambda: call(problem=lm.Inpainting(keep_prob=0.6, input="adjoint")))


def test_fixed_mask_shape():
    raises("mask", lambda: call(problem=lm.Inpainting(mask=np.ones((4, 4)), input="adjoint")))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_train(bad):
    t = TRAIN.copy()
    t[1, 0, 2, 3] = bad
    raises("train", lambda: call(train=t))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_z(bad):
    z = Z.copy()
    z[0, 0, 4, 4] = bad
    raises("z", lambda: call(z=z))
    raises("z", lambda: call(z=torch.from_numpy(z)))


def test_empty_train():
    raises("train", lambda: call(train=np.zeros((0, 1, 5, 5))))


@pytest.mark.parametrize("kernel", [np.ones((2, 2)) / 4, np.ones((3, 4)) / 12, np.ones((2, 3)) / 6,
                                    np.ones(3) / 3, np.ones((1, 3, 3)) / 9])
def test_bad_kernel(kernel):
    def go():
        prob = lm.Deblurring(kernel=torch.from_numpy(kernel))
        call(problem=prob)
    raises("kernel", go)


@pytest.mark.parametrize("q", [0.0, -0.2, 1.5, math.nan])
def test_keep_prob(q):
    def go():
        prob = lm.Inpainting(keep_prob=q)
        call(problem=prob, mask=MASK)
    raises("keep_prob", go)


@pytest.mark.parametrize("padding", ["reflect", "zero", ""])
def test_padding(padding):
    raises("padding", lambda: call(padding=padding))


@pytest.mark.parametrize("factory", [
    lambda: lm.Denoising(input="bogus"),
    lambda: lm.Inpainting(mask=np.ones((5, 5)), input="adj"),
    lambda: lm.Inpainting(keep_prob=0.5, input="Pinv"),
    lambda: lm.Deblurring(kernel=torch.ones(3, 3) / 9, input="wiener"),
])
def test_input_mode(factory):
    raises("input", lambda: call(problem=factory(), mask=MASK))


def test_candidates_interior_needs_circular():
    raises("candidates", lambda: call(padding="zeros", candidates="interior"))
    raises("candidates", lambda: call(padding="circular", candidates="some"))


@pytest.mark.parametrize("stats", [("median",), ("variance", "esss")])
def test_stats(stats):
    raises("stats", lambda: call(stats=stats))
