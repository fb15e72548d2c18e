"""The statistics table (lemmse_ray.core.statistics.STATISTICS) drives finalize, Result, the result groups and
their reader; a statistic added with one register call works end to end.

References are explicit float64 loops over explicit logits, written from the formulas (docs/theory.md): with
weights w_r = e^{s_r} / sum_r' e^{s_r'} over the rows r a query meets, mean = sum w v, variance = sum w v^2 -
mean^2, ess = 1 / sum w^2, max_weight = max w, entropy = -sum w log w, log_evidence = log sum e^s - log N, top-k
= the k largest logits (row id ascending among ties).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import lemmse_ray as lm
from lemmse_ray.cluster.driver import result_arrays
from lemmse_ray.core import statistics
from lemmse_ray.core.statistics import (
    OUTPUTS,
    PIXELS,
    STATISTICS,
    STATS,
    Output,
    Statistic,
    finalize,
    register,
    sums_of,
    to_result,
)
from lemmse_ray.kernels.torch_kernels import matmul_partials
from lemmse_ray.storage.results import EstimateArrays, open_results, write_batch, write_inputs

B, C, H, W, R, K = 3, 2, 2, 3, 7, 3  # query images, channels, height, width, bank rows, top-k
GRIDS = {"channels": (C, H, W), "pixels": (H, W), "topk": (H, W, K)}  # per image


def reference(s: np.ndarray, v: np.ndarray, source: np.ndarray) -> dict[str, np.ndarray]:
    """Every output, (B, *grid), from logits s (B·H·W queries, R rows), values v (R, C) and the rows'
    (image, position) ``source``, by explicit loops in float64."""
    out = {"mean": np.zeros((B, C, H, W)), "variance": np.zeros((B, C, H, W))}
    for name in ("ess", "max_weight", "entropy", "log_evidence"):
        out[name] = np.zeros((B, H, W))
    for name in ("topk_image", "topk_position", "topk_logits"):
        out[name] = np.zeros((B, H, W, K))
    for q in range(s.shape[0]):
        b, h, w = q // (H * W), q // W % H, q % W
        top = max(s[q])
        z = sum(math.exp(s[q, r] - top) for r in range(R))
        weights = [math.exp(s[q, r] - top) / z for r in range(R)]
        for c in range(C):
            out["mean"][b, c, h, w] = sum(weights[r] * v[r, c] for r in range(R))
            out["variance"][b, c, h, w] = (sum(weights[r] * v[r, c] ** 2 for r in range(R))
                                           - out["mean"][b, c, h, w] ** 2)
        out["ess"][b, h, w] = 1 / sum(x * x for x in weights)
        out["max_weight"][b, h, w] = max(weights)
        out["entropy"][b, h, w] = -sum(x * math.log(x) for x in weights)
        out["log_evidence"][b, h, w] = top + math.log(z) - math.log(R)
        order = sorted(range(R), key=lambda r: (-s[q, r], r))[:K]
        out["topk_logits"][b, h, w] = [s[q, r] for r in order]
        out["topk_image"][b, h, w] = [source[r, 0] for r in order]
        out["topk_position"][b, h, w] = [source[r, 1] for r in order]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_statistic_round_trips_to_a_result_group_and_back(tmp_path, dtype):
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, (B * H * W, R))
    v = rng.random((R, C))
    source = np.stack([np.arange(R) // 3, 5 * np.arange(R) % (H * W)], axis=1)
    # logits s exactly: s @ I + 0 through the torch kernel, then finalize and the grids
    part = matmul_partials(torch.from_numpy(s).to(dtype), torch.eye(R, dtype=dtype), torch.from_numpy(v).to(dtype),
                           torch.zeros(B * H * W, dtype=dtype), None, STATS, K)
    res = to_result(finalize(part, R), torch.from_numpy(source), (B, C, H, W), STATS)

    assert [f.name for f in dataclasses.fields(res)] == [o.name for o in OUTPUTS] + ["info"]
    want = reference(s, v, source)
    assert set(want) == {o.name for o in OUTPUTS}  # the reference covers the whole table
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for o in OUTPUTS:
        got = getattr(res, o.name)
        assert tuple(got.shape) == (B, *GRIDS[o.grid])
        assert got.dtype == (torch.int64 if o.dtype == "int64" else dtype)
        np.testing.assert_allclose(got.double().numpy(), want[o.name], **tol, err_msg=o.name)

    x = torch.from_numpy(rng.random((B, C, H, W)))
    group = open_results(str(tmp_path / "out.zarr"), {"n_rows": R}, (B, C, H, W), 2, STATS, K,
                         str(dtype).replace("torch.", ""))
    write_inputs(group, x.float(), None, x.float())
    arrays = result_arrays(res)
    assert list(arrays) == [o.name for o in OUTPUTS]
    write_batch(group, 0, 0, {name: a[:2] for name, a in arrays.items()})
    with pytest.raises(ValueError, match="unfinished"):
        EstimateArrays.from_group(group)
    write_batch(group, 1, 2, {name: a[2:] for name, a in arrays.items()})

    read = EstimateArrays.from_group(group)
    assert read.n_rows == R and read.mask is None
    for o in OUTPUTS:
        stored = group[o.name]
        assert stored.shape == (B, *GRIDS[o.grid])
        assert stored.dtype == (np.int64 if o.dtype == "int64" else np.dtype(str(dtype).replace("torch.", "")))
        value = getattr(read, o.name)
        assert value.shape == (B, *GRIDS[o.grid]) and value.dtype == (np.int64 if o.dtype == "int64" else np.float64)
        np.testing.assert_array_equal(value, getattr(res, o.name).numpy(), err_msg=o.name)
    # the reader of a run's report: only the inputs and the mean
    inputs_only = EstimateArrays.from_group(group, stats=())
    assert all(getattr(inputs_only, o.name) is None for o in OUTPUTS[1:])
    np.testing.assert_array_equal(inputs_only.mean, read.mean)
    ess_only = EstimateArrays.from_group(group, stats=("ess",))
    assert ess_only.ess is not None and ess_only.variance is None and ess_only.topk_image is None

    # only what was asked for is laid out and stored
    some = to_result(finalize(part, R), torch.from_numpy(source), (B, C, H, W), ("ess",))
    assert some.ess is not None and all(getattr(some, o.name) is None for o in OUTPUTS if o.name not in ("mean", "ess"))


def test_sums_follow_the_table():
    assert sums_of(()) == sums_of(("max_weight", "log_evidence")) == ()
    assert sums_of(("entropy", "variance")) == ("o2", "ls")
    assert sums_of(STATS) == ("o2", "l2", "ls", "top_s", "top_r")
    empty = lm.Partials.empty(4, 2, sums_of(("ess", "topk")), 3, torch.float64)
    assert empty.o2 is None and empty.ls is None and empty.l2.shape == (4,) and empty.top_r.shape == (4, 3)
    with pytest.raises(ValueError, match="unknown"):
        lm.Partials.empty(4, 2, ("variance",), 3, torch.float64)  # statistic names are not sums
    with pytest.raises(ValueError, match="stats"):
        sums_of(("mean",))
    assert {name: s.backends for name, s in STATISTICS.items()} == {
        **{name: ("torch", "triton", "sliding") for name in STATS if name != "topk"}, "topk": ("torch",)}


# --- a statistic added in one place ---------------------------------------------------------------------------

#: The collision probability sum_r w_r^2 = l_2 / l^2: the chance that two independent draws from the weights pick
#: the same bank row.  It needs the sum l_2 (as ess does), so the kernels must accumulate it without "ess".
COLLISION = Statistic("collision", ("l2",), lambda part, mean, n_rows: {"collision": part.l2 / (part.l * part.l)},
                      (Output("collision", PIXELS),))


@pytest.fixture
def collision():
    register(COLLISION)
    yield COLLISION.name
    del STATISTICS[COLLISION.name]


def collision_reference(train: np.ndarray, z: np.ndarray, sigma: float, p: int) -> np.ndarray:
    """sum_r w_r^2 per query pixel for denoising with circular padding: the rows are every P×P patch of every
    training image, logits s_r = -|patch(z) - patch_r|^2 / (2 sigma^2) (the Gaussian's constants cancel)."""
    n, channels, height, width = train.shape

    def patch(image, r, c):
        return [image[ch, (r + a - p // 2) % height, (c + b - p // 2) % width]
                for ch in range(channels) for a in range(p) for b in range(p)]

    rows = [patch(train[i], r, c) for i in range(n) for r in range(height) for c in range(width)]
    out = np.zeros((z.shape[0], height, width))
    for b in range(z.shape[0]):
        for r in range(height):
            for c in range(width):
                q = patch(z[b], r, c)
                s = [-sum((q[t] - row[t]) ** 2 for t in range(len(q))) / (2 * sigma * sigma) for row in rows]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                out[b, r, c] = sum(x * x for x in e) / sum(e) ** 2
    return out


@pytest.mark.parametrize("dtype,kernel", [(torch.float64, "torch"), (torch.float32, "torch"),
                                          (torch.float32, "sliding"), (torch.float32, "triton")])
def test_a_statistic_registered_once_works_end_to_end(tmp_path, collision, dtype, kernel):
    rng = np.random.default_rng(1)
    train, x = rng.random((3, 1, 5, 5)), rng.random((2, 1, 5, 5))
    sigma = 0.3
    z = x + sigma * rng.standard_normal(x.shape)
    res = lm.estimate(torch.from_numpy(train), torch.from_numpy(z), lm.Denoising(), sigma, patch_size=3,
                      padding="circular", stats=(collision,), dtype=dtype, kernel=kernel)
    assert isinstance(res, lm.Result) and res.ess is None and res.variance is None
    assert res.collision.shape == (2, 5, 5) and res.collision.dtype == dtype
    want = collision_reference(train, z, sigma, 3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(res.collision.double().numpy(), want, rtol=tol, atol=tol)

    group = open_results(str(tmp_path / "out.zarr"), {"n_rows": 75}, tuple(z.shape), 2, (collision,), 5,
                         str(dtype).replace("torch.", ""))
    assert sorted(group.array_keys()) == ["collision", "done", "mean"]
    write_batch(group, 0, 0, result_arrays(res))
    np.testing.assert_array_equal(group["collision"][...], res.collision.numpy())
    assert group["collision"].dtype == np.dtype(str(dtype).replace("torch.", ""))


def test_registration_is_checked_and_undone(collision):
    assert collision in STATISTICS and statistics.check_stats((collision,), 5) == (collision,)
    for bad in (dataclasses.replace(COLLISION, outputs=(Output("other", PIXELS),)),  # the name is taken
                dataclasses.replace(COLLISION, name="other", outputs=(Output("ess", PIXELS),)),  # an output is
                dataclasses.replace(COLLISION, name="other", sums=("l2", "top_s")),  # top-k sums go together
                dataclasses.replace(COLLISION, name="other", outputs=(Output("other", "diagonal"),))):
        with pytest.raises(ValueError):
            register(bad)
    assert list(STATISTICS) == [*STATS, collision]


def test_without_registration_the_table_is_the_package_one():
    assert tuple(STATISTICS) == STATS == ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")
    with pytest.raises(ValueError, match="unknown statistic 'collision'"):
        lm.estimate(torch.rand(2, 1, 4, 4), torch.rand(1, 1, 4, 4), lm.Denoising(), 0.1, patch_size=3,
                    stats=("collision",))
