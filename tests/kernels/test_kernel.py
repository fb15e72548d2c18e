"""lemmse_ray.core.partials, lemmse_ray.core.statistics and lemmse_ray.kernels.torch_kernels: partial log-sum-exp statistics, their merge, finalisation and chunking.

Every expectation here comes from an independent float64 numpy reference written in this file (explicit
logits, softmax, weighted sums, sorting) — never from the code under test.  Definitions matched (see
:func:`lemmse_ray.core.statistics.finalize`), with ``w = softmax(s)`` over all bank rows of a query:

* ``mean = Σ w v``; ``variance = Σ w v² − mean²`` (clamped at 0); ``ess = 1/Σ w²``; ``max_weight = max w``;
* ``entropy = −Σ w log w`` (nats);
* ``log_evidence = logsumexp(s) − log N_rows_total`` (the log-density of the query under the uniform
  mixture over the ``n_rows_total`` bank rows — *not* the bare ``logsumexp(s)``);
* ``topk``: the k largest logits, descending, ties broken by the smaller global row id, padded with
  ``(−inf, −1)`` when fewer than k rows exist.  ``torch.topk`` inside one row block does not promise the
  smaller row id on ties, so the property tests use continuous (tie-free) logits.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lemmse_ray.core.partials import Partials, merge, merge_into
from lemmse_ray.core.statistics import finalize, sums_of
from lemmse_ray.kernels.torch_kernels import matmul_partials, mixture_partials

ALL_STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")
F64 = torch.float64
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------------------
# independent float64 reference
# --------------------------------------------------------------------------------------------------------------
def reference(s: np.ndarray, v: np.ndarray, k: int, n_total: int | None = None) -> dict[str, np.ndarray]:
    """Statistics of the softmax over each row of logits ``s`` (M, R) with values ``v`` (R, C)."""
    s = np.asarray(s, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n_total = s.shape[1] if n_total is None else n_total
    top = s.max(axis=1, keepdims=True)
    e = np.exp(s - top)
    w = e / e.sum(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(e.sum(axis=1))
    mean = w @ v
    out = {
        "mean": mean,
        "variance": np.maximum(w @ (v * v) - mean ** 2, 0.0),
        "ess": 1.0 / (w * w).sum(axis=1),
        "max_weight": w.max(axis=1),
        "entropy": -(w * (s - lse[:, None])).sum(axis=1),  # −Σ w log w with log w = s − lse (exact)
        "log_evidence": lse - math.log(n_total),
    }
    rows = np.arange(s.shape[1])
    top_s = np.full((s.shape[0], k), -np.inf)
    top_r = np.full((s.shape[0], k), -1, dtype=np.int64)
    for i in range(s.shape[0]):
        order = np.lexsort((rows, -s[i]))[:k]  # logit descending, then row id ascending
        top_s[i, : len(order)] = s[i, order]
        top_r[i, : len(order)] = rows[order]
    out["topk_logits"], out["topk_rows"] = top_s, top_r
    return out


def mixture_logits(p: np.ndarray, mu: np.ndarray, keep_prob: float, sigma: float) -> np.ndarray:
    """Exact log Π_a [q N(p_a; μ_a, σ²I) + (1−q) N(p_a; 0, σ²I)] for p (M, A, C), μ (R, A, C) → (M, R)."""
    c = p.shape[2]
    norm = -0.5 * c * math.log(2 * math.pi * sigma ** 2)
    d_mu = ((p[:, None] - mu[None]) ** 2).sum(axis=3)  # (M, R, A)
    d_0 = (p ** 2).sum(axis=2)[:, None, :]  # (M, 1, A)
    comp = np.logaddexp(math.log(keep_prob) + norm - 0.5 * d_mu / sigma ** 2,
                        math.log1p(-keep_prob) + norm - 0.5 * d_0 / sigma ** 2)
    return comp.sum(axis=2)


def mixture_shift(p: np.ndarray, keep_prob: float, sigma: float) -> np.ndarray:
    """The per-query shift that makes ``mixture_partials`` logits exact mixture log-densities (queries.py)."""
    a, c = p.shape[1:]
    return (a * math.log1p(-keep_prob) - 0.5 * (p ** 2).sum(axis=(1, 2)) / sigma ** 2
            - 0.5 * c * a * math.log(2 * math.pi * sigma ** 2))


def assert_close(actual, expected, rtol: float, scale: float = 0.0, name: str = "") -> None:
    """|actual − expected| ≤ rtol·(|expected| + scale), elementwise; ±inf must match exactly."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    inf = ~np.isfinite(b)
    assert np.array_equal(a[inf], b[inf]), f"{name}: non-finite entries differ"
    err = np.abs(a[~inf].astype(np.float64) - b[~inf])
    bound = rtol * (np.abs(b[~inf]) + scale)
    assert (err <= bound).all(), f"{name}: max error {err.max()} (worst ratio {(err / bound).max():.3g})"


def compare(out: dict[str, torch.Tensor], ref: dict[str, np.ndarray], rtol: float, logit_scale: float,
            value_scale: float) -> None:
    """Compare finalized statistics to the reference with scales that bound the cancellation in each one."""
    assert_close(out["mean"], ref["mean"], rtol, value_scale, "mean")
    assert_close(out["variance"], ref["variance"], rtol, value_scale ** 2, "variance")
    assert_close(out["ess"], ref["ess"], rtol, 0.0, "ess")
    assert_close(out["max_weight"], ref["max_weight"], rtol, 0.0, "max_weight")
    assert_close(out["entropy"], ref["entropy"], rtol, logit_scale, "entropy")
    assert_close(out["log_evidence"], ref["log_evidence"], rtol, logit_scale, "log_evidence")
    assert_close(out["topk_logits"], ref["topk_logits"], rtol, logit_scale, "topk_logits")
    np.testing.assert_array_equal(out["topk_rows"].numpy(), ref["topk_rows"])


def compare_outputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, logit_scale: float,
                    value_scale: float) -> None:
    """Two finalized outputs of the library (e.g. blocked vs single block) against each other."""
    compare(a, {name: (t.numpy() if name != "topk_rows" else t.numpy()) for name, t in b.items()}, rtol,
            logit_scale, value_scale)


# --------------------------------------------------------------------------------------------------------------
# random problems
# --------------------------------------------------------------------------------------------------------------
def matmul_problem(seed: int, m: int, r: int, f: int, c: int, temperature: float):
    """Random features with logits s = Q Kᵀ + shift of spread ~``temperature`` and magnitude ≲ 100."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(m, f)) * temperature / math.sqrt(f)
    kf = rng.normal(size=(r, f))
    shift = rng.normal(size=m) * 20.0
    values = rng.uniform(-1.0, 2.0, size=(r, c))
    logits = q @ kf.T + shift[:, None]
    return q, kf, values, shift, logits


def mixture_problem(seed: int, m: int, r: int, a: int, c: int):
    rng = np.random.default_rng(seed)
    keep_prob = float(rng.uniform(0.1, 0.9))
    sigma = float(rng.uniform(0.3, 1.5))
    p = rng.normal(size=(m, a, c)) * 0.7
    mu = rng.normal(size=(r, a, c)) * 0.7
    values = rng.uniform(0.0, 1.0, size=(r, c))
    return p, mu, values, keep_prob, sigma


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=F64)


def matmul_block(q, kf, values, shift, rows: np.ndarray, topk: int, block_q: int, block_r: int) -> Partials:
    """Partials of the bank rows ``rows`` (global ids), any subset in any order."""
    return matmul_partials(t64(q), t64(kf[rows]), t64(values[rows]), t64(shift),
                           torch.as_tensor(rows, dtype=torch.int64), ALL_STATS, topk, block_q, block_r)


def mixture_block(p, mu, values, keep_prob, sigma, rows: np.ndarray, topk: int, block_q: int,
                  block_r: int) -> Partials:
    return mixture_partials(t64(p), t64(mu[rows]), t64(values[rows]), t64(mixture_shift(p, keep_prob, sigma)),
                            keep_prob, sigma, torch.as_tensor(rows, dtype=torch.int64), ALL_STATS, topk,
                            block_q, block_r)


# --------------------------------------------------------------------------------------------------------------
# splitting and merging strategies
# --------------------------------------------------------------------------------------------------------------
@st.composite
def partitions(draw, n_rows: int) -> list[np.ndarray]:
    """A partition of range(n_rows) into blocks (some possibly empty): contiguous ranges or arbitrary sets."""
    n_blocks = draw(st.integers(1, 6))
    if draw(st.booleans()):  # contiguous, cut points may coincide (empty blocks)
        cuts = sorted(draw(st.lists(st.integers(0, n_rows), min_size=n_blocks - 1, max_size=n_blocks - 1)))
        bounds = [0, *cuts, n_rows]
        return [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    owner = draw(st.lists(st.integers(0, n_blocks - 1), min_size=n_rows, max_size=n_rows))
    owner = np.asarray(owner, dtype=np.int64)
    blocks = [np.flatnonzero(owner == b) for b in range(n_blocks)]
    if draw(st.booleans()):  # rows of a block in a scrambled order (row ids travel with them)
        perm = np.random.default_rng(draw(st.integers(0, 2 ** 16))).permutation
        blocks = [perm(b) for b in blocks]
    return blocks


def merge_all(parts: list[Partials], data) -> Partials:
    """Merge in a random order, either as a left fold or as a random binary tree."""
    order = data.draw(st.permutations(range(len(parts))), label="order")
    pool = [parts[i] for i in order]
    if data.draw(st.booleans(), label="tree"):
        while len(pool) > 1:
            i = data.draw(st.integers(0, len(pool) - 1), label="left")
            left = pool.pop(i)
            j = data.draw(st.integers(0, len(pool) - 1), label="right")
            right = pool.pop(j)
            pool.insert(data.draw(st.integers(0, len(pool)), label="where"), merge(left, right))
        return pool[0]
    total = pool[0]
    for part in pool[1:]:
        total = merge(total, part)
    return total


# --------------------------------------------------------------------------------------------------------------
# merge invariance (property-based)
# --------------------------------------------------------------------------------------------------------------
@PROPERTY
@given(seed=st.integers(0, 2 ** 31 - 1), m=st.integers(1, 9), r=st.integers(1, 40), f=st.integers(1, 6),
       c=st.integers(1, 3), topk=st.integers(1, 7), temperature=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
       block_q=st.integers(1, 10), block_r=st.integers(1, 16), data=st.data())
def test_matmul_merge_invariance(seed, m, r, f, c, topk, temperature, block_q, block_r, data):
    q, kf, values, shift, logits = matmul_problem(seed, m, r, f, c, temperature)
    ref = reference(logits, values, topk, n_total=r)
    scale = 1.0 + float(np.abs(logits).max())

    single = finalize(matmul_partials(t64(q), t64(kf), t64(values), t64(shift), None, ALL_STATS, topk), r)
    compare(single, ref, 1e-12, scale, 2.0)

    blocks = data.draw(partitions(r), label="blocks")
    parts = [matmul_block(q, kf, values, shift, rows, topk, block_q, block_r) for rows in blocks]
    merged = finalize(merge_all(parts, data), r)
    compare_outputs(merged, single, 1e-12, scale, 2.0)
    compare(merged, ref, 1e-12, scale, 2.0)


@PROPERTY
@given(seed=st.integers(0, 2 ** 31 - 1), m=st.integers(1, 6), r=st.integers(1, 30), a=st.integers(1, 5),
       c=st.integers(1, 3), topk=st.integers(1, 6), block_q=st.integers(1, 8), block_r=st.integers(1, 12),
       data=st.data())
def test_mixture_merge_invariance(seed, m, r, a, c, topk, block_q, block_r, data):
    p, mu, values, keep_prob, sigma = mixture_problem(seed, m, r, a, c)
    logits = mixture_logits(p, mu, keep_prob, sigma)
    ref = reference(logits, values, topk, n_total=r)
    scale = 1.0 + float(np.abs(logits).max())

    single = finalize(mixture_partials(t64(p), t64(mu), t64(values), t64(mixture_shift(p, keep_prob, sigma)),
                                       keep_prob, sigma, None, ALL_STATS, topk), r)
    compare(single, ref, 1e-12, scale, 1.0)

    blocks = data.draw(partitions(r), label="blocks")
    parts = [mixture_block(p, mu, values, keep_prob, sigma, rows, topk, block_q, block_r) for rows in blocks]
    merged = finalize(merge_all(parts, data), r)
    compare_outputs(merged, single, 1e-12, scale, 1.0)
    compare(merged, ref, 1e-12, scale, 1.0)


@PROPERTY
@given(seed=st.integers(0, 2 ** 31 - 1), m=st.integers(1, 8), r=st.integers(1, 30), c=st.integers(1, 3),
       topk=st.integers(1, 5), data=st.data())
def test_empty_blocks_are_the_identity(seed, m, r, c, topk, data):
    q, kf, values, shift, logits = matmul_problem(seed, m, r, 3, c, 3.0)
    whole = matmul_block(q, kf, values, shift, np.arange(r), topk, 4, 8)
    none = np.arange(0)
    empties = [matmul_block(q, kf, values, shift, none, topk, 4, 8),
               Partials.empty(m, c, sums_of(ALL_STATS), topk, F64)]
    for empty in empties:
        assert torch.isneginf(empty.m).all() and (empty.l == 0).all()
        assert (empty.top_r == -1).all() and torch.isneginf(empty.top_s).all()
    parts = [whole, *data.draw(st.lists(st.sampled_from(empties), max_size=4), label="empties")]
    merged = merge_all(parts, data)
    # the identity is exact: scale factors are e^{-inf} = 0 and e^{0} = 1
    for name in ("m", "l", "o", "o2", "l2", "ls", "top_s", "top_r"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    # and an empty merged with an empty stays empty
    both = merge(empties[0], empties[1])
    assert torch.isneginf(both.m).all() and (both.l == 0).all() and (both.o == 0).all()
    assert not torch.isnan(both.ls).any() and not torch.isnan(both.l2).any()


# --------------------------------------------------------------------------------------------------------------
# contracts of the logit forms against densities written out in full
# --------------------------------------------------------------------------------------------------------------
def test_whitened_features_give_gaussian_log_density():
    """Q_f = [q/σ², −1/σ²], K_f = [k, ½‖k‖²], shift = −‖q‖²/2σ² − d/2·log 2πσ²: log-evidence = log mean N."""
    rng = np.random.default_rng(3)
    d, m, r, sigma = 6, 5, 50, 0.4
    qv, kv = rng.normal(size=(m, d)) * 0.5, rng.normal(size=(r, d)) * 0.5
    values = rng.uniform(size=(r, 2))
    qf = np.concatenate([qv / sigma ** 2, np.full((m, 1), -1 / sigma ** 2)], axis=1)
    kf = np.concatenate([kv, 0.5 * (kv ** 2).sum(axis=1, keepdims=True)], axis=1)
    shift = -0.5 * (qv ** 2).sum(axis=1) / sigma ** 2 - 0.5 * d * math.log(2 * math.pi * sigma ** 2)
    out = finalize(matmul_partials(t64(qf), t64(kf), t64(values), t64(shift), None, ALL_STATS, 3), r)
    sq = ((qv[:, None] - kv[None]) ** 2).sum(axis=2)
    log_n = -0.5 * sq / sigma ** 2 - 0.5 * d * math.log(2 * math.pi * sigma ** 2)
    ref = reference(log_n, values, 3)
    log_mean_density = np.log(np.exp(log_n).mean(axis=1))
    assert_close(out["log_evidence"], log_mean_density, 1e-10, 1.0, "log mean density")
    compare(out, ref, 1e-10, 1.0 + np.abs(log_n).max(), 1.0)


def test_kernel_is_not_trivially_agreeing():
    """Power check: the comparison machinery rejects a wrong logit (σ off by 2×) and a wrong row order."""
    q, kf, values, shift, logits = matmul_problem(11, 6, 25, 4, 2, 5.0)
    out = finalize(matmul_partials(t64(q), t64(kf), t64(values), t64(shift), None, ALL_STATS, 4), 25)
    with pytest.raises(AssertionError):
        compare(out, reference(2.0 * logits, values, 4), 1e-6, 100.0, 2.0)
    swapped = reference(logits, values, 4)
    swapped["topk_rows"] = swapped["topk_rows"][:, ::-1].copy()
    with pytest.raises(AssertionError):
        compare(out, swapped, 1e-6, 100.0, 2.0)


def test_topk_ties_break_by_smaller_row_id_across_blocks():
    """Equal logits in different blocks: the merge keeps the smaller global row ids, in any merge order."""
    m, r, k = 3, 12, 5
    kf = np.zeros((r, 1))  # every logit equals the shift: a full tie
    q, values, shift = np.ones((m, 1)), np.arange(r, dtype=float)[:, None], np.zeros(m)
    blocks = [np.arange(8, 12), np.arange(4, 8), np.arange(0, 4)]  # one row per block is in each block's top
    parts = [matmul_block(q, kf, values, shift, rows, k, 2, 2) for rows in blocks]
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        total = parts[order[0]]
        for i in order[1:]:
            total = merge(total, parts[i])
        np.testing.assert_array_equal(total.top_r.numpy(), np.tile(np.arange(k), (m, 1)))


def test_topk_scan_does_not_skip_a_block_that_ties_the_kth_logit():
    """Within one scan, row blocks whose maximum is below a query's current k-th logit are skipped; a block
    whose maximum *equals* it is not, since a smaller row id wins the tie.  Row ids descend along this scan,
    so the winners come last."""
    m, r, k = 2, 12, 3
    q, kf, values, shift = np.ones((m, 1)), np.zeros((r, 1)), np.arange(r, dtype=float)[:, None], np.zeros(m)
    rows = np.arange(r)[::-1].copy()
    part = matmul_block(q, kf, values, shift, rows, k, 2, 2)
    np.testing.assert_array_equal(part.top_r.numpy(), np.tile(np.arange(k), (m, 1)))
    # a strictly better row in the last block enters, strictly worse ones in between do not
    kf = np.full((r, 1), -1.0)
    kf[rows[:k]] = 0.0  # the first block(s) of the scan hold the k best so far ...
    kf[rows[-1]] = 1.0  # ... and the last block the best of all
    part = matmul_block(q, kf, values, shift, rows, k, 2, 2)
    np.testing.assert_array_equal(part.top_r.numpy(), np.tile([rows[-1], *sorted(rows[:k])[:k - 1]], (m, 1)))


# --------------------------------------------------------------------------------------------------------------
# merge edge cases
# --------------------------------------------------------------------------------------------------------------
def test_merge_with_partly_empty_partial():
    """Queries that saw no rows in one partial (m = −inf) take the other partial's statistics unchanged."""
    q, kf, values, shift, logits = matmul_problem(5, 6, 20, 3, 2, 4.0)
    full = matmul_block(q, kf, values, shift, np.arange(10, 20), 3, 4, 4)
    total = Partials.empty(6, 2, sums_of(ALL_STATS), 3, F64)
    seen = torch.tensor([0, 2, 5])
    merge_into(total, seen, matmul_partials(t64(q[seen.numpy()]), t64(kf[:10]), t64(values[:10]),
                                            t64(shift[seen.numpy()]), torch.arange(10), ALL_STATS, 3))
    unseen = torch.tensor([1, 3, 4])
    assert torch.isneginf(total.m[unseen]).all()
    merged = merge(total, full)
    out = finalize(merged, 20)
    ref_all = reference(logits, values, 3, n_total=20)
    ref_half = reference(logits[:, 10:], values[10:], 3, n_total=20)
    ref_half["topk_rows"] = ref_half["topk_rows"] + 10
    scale = 1.0 + np.abs(logits).max()
    for name in out:
        expected = ref_half[name].copy()
        expected[seen.numpy()] = ref_all[name][seen.numpy()]
        if name == "topk_rows":
            np.testing.assert_array_equal(out[name].numpy(), expected)
        else:
            scales = {"entropy": scale, "log_evidence": scale, "topk_logits": scale, "mean": 2.0, "variance": 4.0}
            assert_close(out[name], expected, 1e-12, scales.get(name, 0.0), name)
    # a query that met no row at all cannot be finalized
    with pytest.raises(ValueError, match="no bank rows"):
        finalize(total, 20)


def test_merge_rescales_by_exact_max():
    """Two one-row partials with logits far apart: the merged weights are the softmax of the two."""
    s_a, s_b = -700.0, -680.0  # e^{s} underflows nowhere after rescaling
    one = lambda s, v, row: matmul_partials(t64([[1.0]]), t64([[s]]), t64([[v]]), t64([0.0]),  # noqa: E731
                                            torch.tensor([row]), ALL_STATS, 2)
    out = finalize(merge(one(s_a, 3.0, 7), one(s_b, -1.0, 2)), 2)
    w_b = 1.0 / (1.0 + math.exp(s_a - s_b))
    assert out["mean"].item() == pytest.approx(3.0 * (1 - w_b) - w_b, rel=1e-12)
    assert out["log_evidence"].item() == pytest.approx(s_b + math.log1p(math.exp(s_a - s_b)) - math.log(2),
                                                       rel=1e-12)
    assert out["topk_rows"].tolist() == [[2, 7]]


def _float_pair(seed, path):
    if path == "matmul":
        q, kf, values, shift, logits = matmul_problem(seed, 40, 300, 8, 3, 3.0)
        values = np.abs(values) + 0.1

        def run(dtype, rows):
            t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)  # noqa: E731
            return matmul_partials(t(q), t(kf[rows]), t(values[rows]), t(shift), torch.as_tensor(rows),
                                   ALL_STATS, 4, 16, 64)
    else:
        p, mu, values, keep_prob, sigma = mixture_problem(seed, 30, 200, 4, 3)
        logits = mixture_logits(p, mu, keep_prob, sigma)
        values = values + 0.1

        def run(dtype, rows):
            t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)  # noqa: E731
            return mixture_partials(t(p), t(mu[rows]), t(values[rows]), t(mixture_shift(p, keep_prob, sigma)),
                                    keep_prob, sigma, torch.as_tensor(rows), ALL_STATS, 4, 16, 64)
    return logits, values, run


@pytest.mark.parametrize("path", ["matmul", "mixture"])
def test_float32_agrees_with_float64(path):
    """Moderate data: blocked float32 (partials merged in float32) within 1e-5 relative of float64."""
    logits, values, run = _float_pair(7, path)
    r = values.shape[0]
    blocks = [np.arange(0, 90), np.arange(90, 91), np.arange(91, r - 50), np.arange(r - 50, r)]
    total32 = None
    for rows in blocks[::-1]:
        part = run(torch.float32, rows)
        assert part.m.dtype == torch.float32 and part.o.dtype == torch.float32
        total32 = part if total32 is None else merge(total32, part)
    out32 = finalize(total32, r)
    out64 = finalize(run(F64, np.arange(r)), r)
    ref = reference(logits, values, 4, n_total=r)
    for name in ("mean", "ess", "max_weight", "log_evidence"):
        assert_close(out32[name], ref[name], 1e-5, 0.0, name)
        assert_close(out32[name], out64[name].numpy(), 1e-5, 0.0, name)
    assert_close(out32["variance"], ref["variance"], 1e-5, float((values ** 2).max()), "variance")
    assert_close(out32["entropy"], ref["entropy"], 1e-5, 1.0, "entropy")
    assert_close(out32["topk_logits"], ref["topk_logits"], 1e-5, 1.0, "topk_logits")


# --------------------------------------------------------------------------------------------------------------
# chunking: results do not depend on the block sizes
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_q,block_r,m,r", [(7, 13, 50, 333), (13, 7, 50, 333), (1000, 50, 50, 333),
                                                 (1, 1, 9, 40)])
def test_chunking_matmul(block_q, block_r, m, r):
    q, kf, values, shift, logits = matmul_problem(21, m, r, 5, 3, 8.0)
    rows = np.arange(r)
    default = finalize(matmul_partials(t64(q), t64(kf), t64(values), t64(shift), torch.as_tensor(rows),
                                       ALL_STATS, 6), r)
    chunked = finalize(matmul_block(q, kf, values, shift, rows, 6, block_q, block_r), r)
    scale = 1.0 + np.abs(logits).max()
    compare_outputs(chunked, default, 1e-12, scale, 2.0)
    compare(chunked, reference(logits, values, 6), 1e-12, scale, 2.0)
    # without row ids, the top-k rows are still the positions in the whole (chunked) row range
    no_ids = finalize(matmul_partials(t64(q), t64(kf), t64(values), t64(shift), None, ALL_STATS, 6,
                                      block_q, block_r), r)
    compare(no_ids, reference(logits, values, 6), 1e-12, scale, 2.0)


@pytest.mark.parametrize("block_q,block_r", [(7, 13), (1, 3)])
def test_chunking_mixture(block_q, block_r):
    p, mu, values, keep_prob, sigma = mixture_problem(4, 20, 150, 5, 2)
    logits = mixture_logits(p, mu, keep_prob, sigma)
    rows = np.arange(150)
    chunked = finalize(mixture_block(p, mu, values, keep_prob, sigma, rows, 4, block_q, block_r), 150)
    default = finalize(mixture_partials(t64(p), t64(mu), t64(values), t64(mixture_shift(p, keep_prob, sigma)),
                                        keep_prob, sigma, torch.as_tensor(rows), ALL_STATS, 4), 150)
    scale = 1.0 + np.abs(logits).max()
    compare_outputs(chunked, default, 1e-12, scale, 1.0)
    compare(chunked, reference(logits, values, 4), 1e-12, scale, 1.0)
    no_ids = finalize(mixture_partials(t64(p), t64(mu), t64(values), t64(mixture_shift(p, keep_prob, sigma)),
                                       keep_prob, sigma, None, ALL_STATS, 4, block_q, block_r), 150)
    compare(no_ids, reference(logits, values, 4), 1e-12, scale, 1.0)


def _scan_case(problem_name):
    """The whole in-memory scan of a small case (bank, queries, every statistic), as a function of the block
    sizes passed through :func:`lemmse_ray.bank.features.scan`."""
    import lemmse_ray as lm
    from lemmse_ray.bank.rows import class_centers, memory_bank
    from lemmse_ray.core.classes import plan_classes
    from lemmse_ray.core.patches import PatchGeometry
    from lemmse_ray.bank.features import key_features, prepare_queries, scan

    gen = torch.Generator().manual_seed(0)
    train = torch.rand((5, 2, 7, 7), generator=gen, dtype=F64)
    x = torch.rand((2, 2, 7, 7), generator=gen, dtype=F64)
    problem = lm.Denoising() if problem_name == "denoising" else lm.Inpainting(keep_prob=0.7)
    _, z, mask = problem.measure(x, 0.3, gen)
    plan = plan_classes(problem, PatchGeometry((2, 7, 7), 3, "zeros", "all"))
    centers = class_centers(train, problem, plan)
    arrays = memory_bank(train, problem, plan, centers)
    keys = key_features(arrays, plan, centers)
    queries = prepare_queries(z, mask, problem, plan, centers, 0.3, F64)
    return lambda **blocks: finalize(scan(keys, plan, queries, ALL_STATS, 4, **blocks), len(arrays))


@pytest.mark.parametrize("problem_name", ["denoising", "random-mask agnostic inpainting"])
def test_estimate_does_not_depend_on_block_sizes(problem_name):
    run = _scan_case(problem_name)
    default = run()
    small = run(block_q=7, block_r=13)
    # the small blocks reached the kernel: another reduction order leaves a trace in the last bits
    assert any(not torch.equal(small[name], default[name]) for name in ("mean", "variance", "ess", "entropy"))
    for name in ("mean", "variance", "ess", "max_weight", "entropy", "log_evidence", "topk_logits"):
        a, b = small[name], default[name]
        scale = 1.0 + float(b.abs().max())
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * scale), name
    assert torch.equal(small["topk_rows"], default["topk_rows"])


def test_block_topk_breaks_ties_by_column():
    """The block top-k keeps, among logits tied at the k-th value, the leftmost columns (the smallest row ids):
    checked against an explicit sort on integer-valued blocks full of ties."""
    from lemmse_ray.core.partials import block_topk

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows, cols = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(1, 40, (1,), generator=generator))
        k = int(torch.randint(1, cols + 1, (1,), generator=generator))
        s = torch.randint(-3, 3, (rows, cols), generator=generator).to(torch.float32)
        values, columns = block_topk(s, k)
        for m in range(rows):
            expected = sorted(range(cols), key=lambda j: (-float(s[m, j]), j))[:k]
            assert sorted(columns[m].tolist()) == sorted(expected)
            assert torch.equal(values[m], s[m, columns[m]])
