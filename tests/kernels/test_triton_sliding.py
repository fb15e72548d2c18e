"""lemmse_ray.kernels.triton_sliding (the Triton sliding-window kernel), its dispatch and its choice by the resolver.

The kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before any import of a kernel,
as for test_triton_kernel.py); triton is imported at the top, so that without it this file fails to collect
rather than skip.  Expected values come from float64 references written here: every window of every key image
and of the query image cut out with explicit loops into explicit matrices, the distances formed from the
differences, then the softmax statistics of each query; the kernel's input, the layout of
:class:`~lemmse_ray.kernels.sliding.SlidingRows`, is filled here pixel by pixel too.

Tolerances are relative to max(1, |reference|), in units of d·2⁻²⁴ with d = C·P² the number of terms summed in
a distance (float32 rounds each term and each partial sum): the factors of tests/kernels/test_sliding.py, which
the compiled C kernel meets.  The interpreter is slow (about 0.3 ms per Triton operation): tiny 7×9 images, one
query image, a few bank images, and tiles covering each image (``block_y=8``, ``block_r=128``, ``block_t=64``)
except where the tiling itself is tested.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import triton  # noqa: F401  (a missing triton fails this file)

import lemmse_ray as lm
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.core.patches import PatchGeometry
from lemmse_ray.core.statistics import finalize
from lemmse_ray.kernels import resolver, sliding, triton_sliding
from lemmse_ray.kernels.resolver import (
    SLIDING_COMPILED,
    SLIDING_TRITON,
    Choice,
    KernelUnavailable,
    image_class,
    resolve,
    sliding_backend_partials,
)
from lemmse_ray.kernels.sliding import SlidingRows
from lemmse_ray.kernels.triton_sliding import triton_sliding_partials

STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence")
NAMES = ("mean", *STATS)
UNIT = 2.0 ** -24
TOLERANCES = {"mean": 4, "variance": 2, "ess": 8, "max_weight": 8, "entropy": 16, "log_evidence": 16}
WHOLE = {"block_y": 8, "block_r": 128, "block_t": 64}  # one tile per 7×9 image: few interpreted operations
F32 = torch.float32
# the PatchBank's SlidingRows (their lane width) and the CPU choice need the compiled sliding library, as in
# test_sliding.py, whose test_sliding_kernel_builds_where_a_compiler_exists fails where a compiler is present
# and the library does not build
needs_compiled = pytest.mark.skipif(sliding.load() is None, reason="no C compiler: see test_sliding.py")


def test_runs_in_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_sliding.interpreted()


# --------------------------------------------------------------------------------------------------------------
# float64 reference, explicit loops
# --------------------------------------------------------------------------------------------------------------
def wrap(images: np.ndarray, pad: int) -> np.ndarray:
    """Circular padding by ``pad`` on each side of the last two axes, pixel by pixel (any pad)."""
    n, channels, height, width = images.shape
    out = np.empty((n, channels, height + 2 * pad, width + 2 * pad))
    for r in range(height + 2 * pad):
        for c in range(width + 2 * pad):
            out[:, :, r, c] = images[:, :, (r - pad) % height, (c - pad) % width]
    return out


def windows(image: np.ndarray, patch: int) -> np.ndarray:
    """(number of windows, C·P²): every P×P window of ``image`` (C, H, W), row-major top-left corners."""
    rows = []
    for r in range(image.shape[1] - patch + 1):
        for c in range(image.shape[2] - patch + 1):
            rows.append(image[:, r:r + patch, c:c + patch].ravel())
    return np.array(rows)


def reference(train: np.ndarray, z: np.ndarray, patch: int, padding: str, sigma: float, weight: float, rank: int,
              log_pdet: float) -> dict[str, np.ndarray]:
    """Per-query statistics (query order: image, window row, window column), float64.

    Rows: every window of the key images ``weight·train`` (wrapped by P//2 under circular padding), valued by the
    training image's pixel at the window's centre; queries: every window of ``weight·z`` (wrapped likewise);
    logits :math:`-\\lVert q-k\\rVert^2/2\\sigma^2 - \\tfrac{r}{2}\\log 2\\pi\\sigma^2 - \\tfrac12\\log\\mathrm{pdet}`.
    """
    half = patch // 2
    keys = weight * train
    if padding == "circular":
        keys, centres = wrap(keys, half), wrap(train, half)
    else:
        centres = train
    key_rows, values = [], []
    for n in range(len(train)):
        key_rows.append(windows(keys[n], patch))
        for r in range(keys.shape[2] - patch + 1):
            for c in range(keys.shape[3] - patch + 1):
                values.append(centres[n, :, r + half, c + half])
    key_rows, values = np.concatenate(key_rows), np.array(values)
    queries = weight * (wrap(z, half) if padding == "circular" else z)
    out = {name: [] for name in NAMES}
    shift = -0.5 * rank * math.log(2 * math.pi * sigma ** 2) - 0.5 * log_pdet
    for b in range(len(z)):
        for q in windows(queries[b], patch):
            s = np.array([-((q - k) ** 2).sum() for k in key_rows]) / (2 * sigma ** 2) + shift
            top = s.max()
            w = np.exp(s - top)
            p = w / w.sum()
            mean = p @ values
            out["mean"].append(mean)
            out["variance"].append(p @ values ** 2 - mean ** 2)
            out["ess"].append(1.0 / (p ** 2).sum())
            out["max_weight"].append(p.max())
            out["entropy"].append(-(p[p > 0] * np.log(p[p > 0])).sum())
            out["log_evidence"].append(top + math.log(w.sum()) - math.log(len(key_rows)))
    return {name: np.array(v) for name, v in out.items()} | {"n_rows": len(key_rows)}


def make_rows(train: np.ndarray, patch: int, padding: str, weight: float, rank: int, log_pdet: float,
              width: int) -> SlidingRows:
    """The layout of :class:`SlidingRows`, filled here pixel by pixel: key images ``weight·train`` (wrapped by
    P//2 under circular padding) and the values (training pixels at the windows' centres), image n in lane
    n mod ``width`` of group n // ``width``, zeros in the lanes beyond the last image."""
    half = patch // 2
    keys = wrap(weight * train, half) if padding == "circular" else weight * train
    centres = wrap(train, half) if padding == "circular" else train
    n, channels, height, width_k = keys.shape
    groups, nby, nbx = -(-n // width), height - patch + 1, width_k - patch + 1
    k = np.zeros((groups, channels, height, width_k, width), dtype=np.float32)
    v = np.zeros((groups, channels, nby, nbx, width), dtype=np.float32)
    for i in range(n):
        k[i // width, :, :, :, i % width] = keys[i]
        for r in range(nby):
            for c in range(nbx):
                v[i // width, :, r, c, i % width] = centres[i, :, r + half, c + half]
    return SlidingRows(0, torch.from_numpy(k), torch.from_numpy(v), n, weight, rank, log_pdet, padding, patch)


def assert_matches(part, want: dict, dim: int, factor: float = 1.0) -> None:
    got = finalize(part.to(torch.float64), want["n_rows"])
    for name in NAMES:
        g = got[name].numpy()
        w = want[name].reshape(g.shape)
        err = float((np.abs(g - w) / np.maximum(1.0, np.abs(w))).max())
        bound = factor * TOLERANCES[name] * dim * UNIT
        assert err <= bound, f"{name}: {err:.2e} > {factor * TOLERANCES[name]} d 2^-24 = {bound:.1e}"


def images(seed: int, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth-ish random images (neighbouring pixels correlated, so that windows differ in how close they are)."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, shape[0], shape[1] // 2 + 1, shape[2] // 2 + 1))
    up = base.repeat(2, axis=2).repeat(2, axis=3)[:, :, : shape[1], : shape[2]]
    return np.clip(0.7 * up + 0.3 * rng.random((n, *shape)), 0, 1)


# --------------------------------------------------------------------------------------------------------------
# exactness against float64
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding,channels,patch,n_train", [
    ("circular", 1, 3, 2), ("circular", 3, 5, 2), ("circular", 1, 7, 2), ("circular", 3, 9, 1),
    ("circular", 1, 11, 2), ("circular", 3, 13, 1), ("circular", 1, 15, 2),
    ("zeros", 1, 5, 3), ("zeros", 3, 3, 2), ("zeros", 3, 7, 3),
], ids=lambda v: str(v))
def test_equals_float64_windows(padding, channels, patch, n_train):
    """Every statistic but top-k of one 7×9 query image: P = 3 … 15, 1 and 3 channels, circular padding (the
    query image wrapped, P beyond the image size included) and zero padding's interior class; a whitening
    weight w ≠ 1 and a non-zero log-pseudo-determinant, so that every term of the logits is checked."""
    shape = (channels, 7, 9)
    train, z = images(patch, n_train, shape), images(100 + patch, 1, shape)
    weight, rank, log_pdet, sigma = 1.3, channels * patch ** 2, -0.7, 0.35
    rows = make_rows(train, patch, padding, weight, rank, log_pdet, width=4)
    part = triton_sliding_partials(rows, torch.from_numpy(z), sigma, STATS, **WHOLE)
    assert part.m.dtype == F32 and len(part) == (63 if padding == "circular" else (8 - patch) * (10 - patch))
    assert_matches(part, reference(train, z, patch, padding, sigma, weight, rank, log_pdet), channels * patch ** 2)


def test_several_lane_groups_ranges_and_tiles():
    """A bank of 5 images in 2 lane groups of 4 (the last one holding 1), one group per program (2 ranges
    merged), and small tiles: 2 programs along the window rows, 2 tiles of rows and 2 of the C·P² = 9 terms."""
    shape = (1, 5, 5)
    train, z = images(7, 5, shape), images(8, 1, shape)
    rows, zt = make_rows(train, 3, "circular", 0.8, 9, 0.0, width=4), torch.from_numpy(z)
    assert rows.keys.shape[0] == 2
    tiles = {"groups_per_split": 1, "block_r": 16, "block_t": 8}
    part = triton_sliding_partials(rows, zt, 0.3, STATS, block_y=4, **tiles)
    assert_matches(part, reference(train, z, 3, "circular", 0.3, 0.8, 9, 0.0), 9)


@needs_compiled
def test_equals_the_compiled_kernel_through_the_dispatch():
    """A PatchBank's own SlidingRows (the compiled kernel's lanes; more images than one lane group holds): the
    Triton and the compiled kernels, each called through sliding_backend_partials with its Choice, agree with
    each other and with float64 within their bounds."""
    shape = (3, 7, 9)
    n_train = sliding.lanes() + 1
    train, z = images(9, n_train, shape), images(10, 1, shape)
    bank = lm.PatchBank(torch.from_numpy(train), lm.Denoising(), 5, "circular", "all")
    rows = bank.sliding
    assert rows is not None and rows.keys.shape[0] == 2 and rows.to("cpu") is rows
    zt = torch.from_numpy(z)
    fast = sliding_backend_partials(SLIDING_TRITON, rows, zt, 0.2, STATS, **WHOLE)
    compiled = sliding_backend_partials(SLIDING_COMPILED, rows, zt, 0.2, STATS)
    want = reference(train, z, 5, "circular", 0.2, rows.weight, rows.rank, rows.log_pdet)
    assert want["n_rows"] == bank.n_rows
    assert_matches(fast, want, 75)
    assert_matches(compiled, want, 75)
    a, b = finalize(fast.to(torch.float64), bank.n_rows), finalize(compiled.to(torch.float64), bank.n_rows)
    for name in NAMES:  # each within its bound of the exact value
        assert float(((a[name] - b[name]).abs() / b[name].abs().clamp(min=1.0)).max()) \
            <= 2 * TOLERANCES[name] * 75 * UNIT, name


def test_requested_sums_and_query_tiles():
    """Without statistics only m, l and o come back; each optional sum alone is the one of the full request; and
    the number of programs along the window rows changes no bit (each query's folds come in one order)."""
    shape = (3, 5, 5)
    train, z = images(11, 2, shape), torch.from_numpy(images(12, 1, shape))
    rows = make_rows(train, 3, "zeros", 1.0, 27, 0.0, width=4)
    plain = triton_sliding_partials(rows, z, 0.2, (), **WHOLE)
    assert plain.o2 is None and plain.l2 is None and plain.ls is None and plain.o.shape == (9, 3)
    full = triton_sliding_partials(rows, z, 0.2, ("variance", "ess", "entropy"), **WHOLE)
    assert torch.equal(plain.m, full.m) and torch.equal(plain.l, full.l) and torch.equal(plain.o, full.o)
    entropy = triton_sliding_partials(rows, z, 0.2, ("entropy",), **WHOLE)
    assert torch.equal(entropy.ls, full.ls)
    tiled = triton_sliding_partials(rows, z, 0.2, ("variance", "ess", "entropy"), **{**WHOLE, "block_y": 2})
    for name in ("m", "l", "o", "o2", "l2", "ls"):
        assert torch.equal(getattr(tiled, name), getattr(full, name)), name


# --------------------------------------------------------------------------------------------------------------
# refusals: one line each, naming the argument, before any launch
# --------------------------------------------------------------------------------------------------------------
def _good():
    train = images(13, 2, (1, 5, 5))
    return make_rows(train, 3, "circular", 1.0, 9, 0.0, width=4), torch.from_numpy(images(14, 1, (1, 5, 5)))


def _with(rows: SlidingRows, **changes) -> SlidingRows:
    return replace(rows, **changes)


@pytest.mark.parametrize("case,pattern", [
    ("rows", "^rows must be SlidingRows"),
    ("keys dtype", "^rows.keys must be a contiguous 5-D float32 tensor"),
    ("keys strided", "^rows.keys must be a contiguous 5-D float32 tensor"),
    ("values device", "^rows.values is on meta, rows.keys on cpu"),
    ("values shape", "^rows.values must have the shape"),
    ("patch even", "^rows.patch_size must be odd"),
    ("n_images", "^rows.n_images must be the number of images"),
    ("channels", f"^rows.keys has 31 channels: the sliding kernel handles at most {sliding.MAX_CHANNELS}"),
    ("z ndim", r"^z must be a \(B, C, H, W\) tensor"),
    ("z channels", "^z has 2 channels, the rows 1"),
    ("z device", "^z must be on the rows' device cpu"),
    ("z small", "^z's images .* are smaller than a patch"),
    ("sigma", "^sigma must be a positive finite number"),
    ("topk", "^stats: the Triton sliding kernel does not compute topk"),
    ("groups_per_split", "^groups_per_split must be a positive integer"),
    ("block_r", r"^block_r must be at least 16"),
    ("block_y", "^block_y must be a positive power of two"),
    ("unknown block", "^blocks: unknown block_q"),
])
def test_refuses_bad_arguments_on_one_line(case, pattern):
    rows, z = _good()
    args, kwargs = [rows, z, 0.2, ()], {}
    if case == "rows":
        args[0] = "bank"
    elif case == "keys dtype":
        args[0] = _with(rows, keys=rows.keys.double())
    elif case == "keys strided":
        args[0] = _with(rows, keys=rows.keys.transpose(2, 3))
    elif case == "values device":
        args[0] = _with(rows, values=rows.values.to("meta"))
    elif case == "values shape":
        args[0] = _with(rows, values=rows.values[:, :, 1:])
    elif case == "patch even":
        args[0] = _with(rows, patch_size=4)
    elif case == "n_images":
        args[0] = _with(rows, n_images=5)
    elif case == "channels":
        args[0] = _with(rows, keys=rows.keys.expand(-1, 31, -1, -1, -1).contiguous(),
                        values=rows.values.expand(-1, 31, -1, -1, -1).contiguous())
    elif case == "z ndim":
        args[1] = z[0]
    elif case == "z channels":
        args[1] = z.expand(-1, 2, -1, -1)
    elif case == "z device":
        args[1] = z.to("meta")
    elif case == "z small":
        args[0] = _with(rows, padding="zeros")
        args[1] = z[:, :, :2, :2]
    elif case == "sigma":
        args[2] = float("nan")
    elif case == "topk":
        args[3] = ("variance", "topk")
    elif case == "groups_per_split":
        kwargs["groups_per_split"] = 0
    elif case == "block_r":
        kwargs["block_r"] = 8
    elif case == "block_y":
        kwargs["block_y"] = 3
    elif case == "unknown block":
        kwargs["block_q"] = 16
    with pytest.raises(ValueError, match=pattern) as info:
        triton_sliding_partials(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_needs_cuda_outside_the_interpreter(monkeypatch):
    rows, z = _good()
    monkeypatch.setattr(triton_sliding, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="^rows.keys must be on a CUDA device for the Triton sliding kernel"):
        triton_sliding_partials(rows, z, 0.2)


def test_dispatch_refuses_other_backends():
    rows, z = _good()
    for choice in (Choice("torch"), Choice("triton"), "sliding"):
        with pytest.raises(ValueError, match="^choice must be a Choice of the sliding backend"):
            sliding_backend_partials(choice, rows, z, 0.2)


# --------------------------------------------------------------------------------------------------------------
# the resolver: Triton on CUDA (named only: nothing runs there), the compiled kernel on the CPU
# --------------------------------------------------------------------------------------------------------------
def _plan(padding="zeros"):
    return plan_classes(lm.Denoising(), PatchGeometry((1, 6, 6), 3, padding, "all"))


@needs_compiled
def test_resolver_takes_triton_sliding_on_cuda_and_the_compiled_kernel_on_the_cpu(monkeypatch):
    p = _plan()
    interior = image_class(p, F32)
    assert interior is not None and image_class(p, F32, "cuda") == interior
    common = {"dtype": F32, "images": interior}
    on_cuda = resolve("auto", p, device="cuda", **common)
    assert on_cuda == {c: SLIDING_TRITON if c == interior else Choice("triton") for c in range(p.n_classes)}
    assert SLIDING_TRITON == Choice("sliding", "triton")
    explicit = resolve("sliding", p, device=torch.device("cuda", 0), **common)
    assert explicit == {c: SLIDING_TRITON if c == interior else Choice("torch", "torch") for c in range(p.n_classes)}
    on_cpu = resolve("auto", p, device="cpu", **common)
    assert on_cpu[interior] == SLIDING_COMPILED == Choice("sliding")
    assert {on_cpu[c].backend for c in range(p.n_classes) if c != interior} == {"torch"}
    # the Triton one on the CPU: asked for explicitly, under the interpreter (tests)
    assert resolve("sliding", p, device="cpu", sliding_variant="triton", **common)[interior] == SLIDING_TRITON
    with pytest.raises(ValueError, match="^sliding_variant must be one of"):
        resolve("auto", p, device="cpu", sliding_variant="gpu", **common)
    import lemmse_ray.kernels.triton_kernel as tk

    monkeypatch.setattr(tk, "interpreted", lambda: False)  # as on a CPU without the interpreter
    with pytest.raises(KernelUnavailable, match="the Triton sliding kernel runs on CUDA devices, not cpu"):
        resolve("sliding", p, device="cpu", sliding_variant="triton", **common)
    assert resolve("auto", p, device="cpu", **common)[interior] == SLIDING_COMPILED
    monkeypatch.setattr(resolver, "triton_installed", lambda: False)
    with pytest.raises(KernelUnavailable, match="the Triton sliding kernel needs the triton package"):
        resolve("sliding", p, device="cuda", sliding_variant="triton", **common)
    assert image_class(p, F32, "cuda") is None
    assert resolve("auto", p, device="cuda", **common)[interior] == Choice("torch", "torch")  # auto never fails
