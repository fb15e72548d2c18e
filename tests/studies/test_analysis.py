"""Per-cell metrics (lemmse_ray.studies.analysis): every aggregate recomputed here with explicit float64 loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lemmse_ray as lm
from lemmse_ray.storage.results import EstimateArrays
from lemmse_ray.studies.analysis import binned_rows, cell_metrics, class_keys, class_rows, concentration_row, copied, copying_row, density_rows, duplicates_own, final_train_loss, floor_check, floor_rows, image_rows, interior_class, loss_floor, rows_met, topk_mass, within_class_centred, within_class_percentile
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.data.loaders import load_dataset
from lemmse_ray.core.patches import PatchGeometry

ALL_STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")


def loop_psnr(a, b):
    total = 0.0
    for value in np.nditer(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)):
        total += float(value) ** 2
    return 10 * math.log10(1.0 / (total / np.asarray(a).size))


def loop_quantile(values, q):
    """numpy's default ('linear') quantile, written out: interpolate at position q·(n − 1) of the sorted values."""
    ordered = sorted(float(v) for v in np.ravel(values))
    position = q * (len(ordered) - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])


def patch_at(image, r, c, p):
    """The (C, p, p) patch of a (C, H, W) image centred at (r, c), zeros outside."""
    channels, height, width = image.shape
    out = np.zeros((channels, p, p))
    for a in range(p):
        for b in range(p):
            rr, cc = r + a - p // 2, c + b - p // 2
            if 0 <= rr < height and 0 <= cc < width:
                out[:, a, b] = image[:, rr, cc]
    return out


def border_pattern(r, c, height, width, p):
    """Which offsets of the P×P patch at (r, c) fall outside the image (zero padding)."""
    h = p // 2
    return tuple(not (0 <= r + a - h < height and 0 <= c + b - h < width) for a in range(p) for b in range(p))


def synthetic(rng, batch=4, channels=1, height=5, width=5, k=3):
    x = rng.random((batch, channels, height, width))
    return EstimateArrays(
        x=x, z=x + 0.1 * rng.standard_normal(x.shape), mean=x + 0.05 * rng.standard_normal(x.shape),
        variance=rng.random(x.shape) * 0.01, ess=1 + rng.random((batch, height, width)) * 50,
        max_weight=rng.random((batch, height, width)), entropy=rng.random((batch, height, width)) * 3,
        log_evidence=rng.standard_normal((batch, height, width)),
        topk_image=rng.integers(0, 7, (batch, height, width, k)),
        topk_position=rng.integers(0, height * width, (batch, height, width, k)),
        topk_logits=-np.sort(rng.random((batch, height, width, k)), axis=-1), n_rows=7 * height * width)


# --- PSNR rows ------------------------------------------------------------------------------------------------

def test_image_rows_psnr_per_image_and_network():
    rng = np.random.default_rng(0)
    est = synthetic(rng, channels=3)
    net = est.mean + 0.01 * rng.standard_normal(est.shape)
    rows = image_rows(est, {"unet": torch.from_numpy(net).float()})
    assert [r["image"] for r in rows] == [0, 1, 2, 3] and {r["network"] for r in rows} == {"unet"}
    net32 = torch.from_numpy(net).float().double().numpy()
    for b, row in enumerate(rows):
        assert row["psnr_z_x"] == pytest.approx(loop_psnr(est.z[b], est.x[b]), abs=1e-9)
        assert row["psnr_lemmse_x"] == pytest.approx(loop_psnr(est.mean[b], est.x[b]), abs=1e-9)
        assert row["psnr_net_lemmse"] == pytest.approx(loop_psnr(net32[b], est.mean[b]), abs=1e-9)
        assert row["psnr_net_x"] == pytest.approx(loop_psnr(net32[b], est.x[b]), abs=1e-9)
        assert row["posterior_variance"] == pytest.approx(sum(est.variance[b].ravel()) / est.variance[b].size)
    plain = image_rows(est)
    assert len(plain) == 4 and all(r["network"] is None and "psnr_net_x" not in r for r in plain)
    with pytest.raises(ValueError, match="outputs"):
        image_rows(est, {"unet": net[:, :, :4]})


# --- concentration --------------------------------------------------------------------------------------------

def test_topk_mass_both_forms_match_sorted_weights():
    rng = np.random.default_rng(1)
    n_rows, k, pixels = 40, 4, 25
    logits = rng.standard_normal((pixels, n_rows)) * 3 + 1e3  # a large offset, like small-σ logits
    expected, top, log_evidence, max_weight = [], [], [], []
    for s in logits:
        m = max(s)
        log_z = m + math.log(math.fsum(math.exp(v - m) for v in s))
        weights = sorted((math.exp(v - log_z) for v in s), reverse=True)
        expected.append(math.fsum(weights[:k]))
        top.append(sorted(s, reverse=True)[:k])
        log_evidence.append(log_z - math.log(n_rows))
        max_weight.append(weights[0])
    top = np.array(top).reshape(5, 5, k)
    got_w = topk_mass(top, max_weight=np.array(max_weight).reshape(5, 5))
    got_z = topk_mass(top, log_evidence=np.array(log_evidence).reshape(5, 5), n_rows=n_rows)
    np.testing.assert_allclose(got_w.ravel(), expected, rtol=1e-12)
    np.testing.assert_allclose(got_z.ravel(), expected, rtol=1e-9)
    with pytest.raises(ValueError, match="max_weight, or log_evidence"):
        topk_mass(top)
    with pytest.raises(ValueError, match="n_rows"):
        topk_mass(top, log_evidence=np.zeros((5, 5)), n_rows=0)


def test_concentration_per_class_with_the_interior_class_as_headline():
    rng = np.random.default_rng(2)
    est = synthetic(rng)  # 4 images of 5×5, bank of 7 images
    est.ess[0, 2, 1:4] = [1.0, 1.5, 1.99]
    train = rng.random((7, 1, 5, 5))
    plan = plan_classes(lm.Denoising(), PatchGeometry((1, 5, 5), 3))
    mass = topk_mass(est.topk_logits, max_weight=est.max_weight)
    patterns = {}  # the border pattern of each position, and the training values of each pattern's positions
    for r in range(5):
        for c in range(5):
            patterns.setdefault(border_pattern(r, c, 5, 5, 3), []).append((r, c))
    interior = border_pattern(2, 2, 5, 5, 3)
    assert plan.classes[interior_class(plan)].padded_pixels.sum() == 0
    rows = class_rows(est, plan, train)
    assert len(rows) == len(patterns) == 9 and sum(r["pixels"] for r in rows) == 4 * 25
    by_size = {r["positions"]: r for r in rows if r["interior"]}
    assert list(by_size) == [9]  # the 3×3 positions whose patch lies inside the image
    for row in rows:
        first = int(np.flatnonzero(plan.position_class == row["class"])[0])  # a position of the class
        pattern = border_pattern(*divmod(first, 5), 5, 5, 3)
        cells = patterns[pattern]  # every position of its border pattern, independently of the plan
        assert row["positions"] == len(cells) and row["padded_pixels"] == sum(pattern)
        assert row["interior"] == (pattern == interior)
        met = 7 * len(cells)  # rows met: every image at every position of the same pattern
        centre = [math.fsum(train[i, 0, r, c] for i in range(7) for r, c in cells) / met]
        for name, values in (("ess", est.ess), ("max_weight", est.max_weight), ("entropy", est.entropy),
                             ("topk_mass", mass), ("ess_fraction", est.ess / met)):
            picked = [values[b, r, c] for b in range(4) for r, c in cells]
            for label, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
                assert row[f"{name}_{label}"] == pytest.approx(loop_quantile(picked, q), rel=1e-12), (name, label)
        distance = [abs(est.mean[b, 0, r, c] - centre[0]) for b in range(4) for r, c in cells]
        assert row["class_mean_distance_median"] == pytest.approx(loop_quantile(distance, 0.5), rel=1e-12)
        assert row["rows_met_median"] == met
    head = concentration_row(est, plan, train)
    inner = [(b, r, c) for b in range(4) for r, c in patterns[interior]]
    assert head["ess_interior_median"] == pytest.approx(loop_quantile([est.ess[i] for i in inner], 0.5), rel=1e-12)
    assert head["interior_share"] == 9 / 25 and head["pixels"] == 100 and head["topk"] == 3
    all_fraction = [est.ess[b, r, c] / (7 * len(patterns[border_pattern(r, c, 5, 5, 3)]))
                    for b in range(4) for r in range(5) for c in range(5)]
    assert head["ess_fraction_median"] == pytest.approx(loop_quantile(all_fraction, 0.5), rel=1e-12)
    assert "ess_median" not in head  # ESS pooled over classes is not a column
    below = sum(1 for v in est.ess.ravel() if v < 2)
    assert head["frac_ess_lt2"] == below / est.ess.size and below >= 3


# --- copying --------------------------------------------------------------------------------------------------

def copy_case():
    """A bank of 4 images of 5×5 (image 3 duplicates image 1) and a train query of image 1 (ids 1 and 3 hold
    its patches), P = 3."""
    rng = np.random.default_rng(4)
    bank = rng.random((4, 1, 5, 5))
    bank[3] = bank[1]
    return bank, bank[[1]] + 0.0, plan_classes(lm.Denoising(), PatchGeometry((1, 5, 5), 3))


def test_a_planted_tie_and_a_planted_duplicate_are_copies_whatever_the_order():
    bank, query, plan = copy_case()
    k = 3
    image = np.zeros((1, 5, 5, k), dtype=np.int64)
    position = np.zeros((1, 5, 5, k), dtype=np.int64)
    logits = np.tile(np.array([-1.0, -2.0, -3.0]), (1, 5, 5, 1))
    for r in range(5):
        for c in range(5):
            image[0, r, c] = [0, 2, 0]  # other images' patches: not copies
            position[0, r, c] = [(r * 5 + c + 1) % 25, r * 5 + c, r * 5 + c]
    # (1, 1): a tie at the top between another image's patch (listed first) and the own patch (listed second)
    image[0, 1, 1], logits[0, 1, 1] = [0, 1, 2], [-1.0, -1.0, -3.0]
    # (2, 2): the top row is the exact duplicate (image 3), not the own row
    image[0, 2, 2], position[0, 2, 2] = [3, 0, 2], [12, 12, 12]
    # (3, 3): the own patch second but *not* tied: not a copy
    image[0, 3, 3] = [0, 1, 2]
    # (0, 4): every stored entry tied and none a copy: undecided
    logits[0, 0, 4] = [-1.0, -1.0, -1.0]
    hit, undecided = copied(image, position, logits, query, bank, plan)
    own = duplicates_own(image, position, query, bank, plan)
    for r in range(5):
        for c in range(5):
            for j in range(k):  # a row is a copy when its patch equals the query's own, in the same class
                tr, tc = divmod(int(position[0, r, c, j]), 5)
                same = border_pattern(tr, tc, 5, 5, 3) == border_pattern(r, c, 5, 5, 3)
                equal = np.array_equal(patch_at(bank[image[0, r, c, j]], tr, tc, 3), patch_at(query[0], r, c, 3))
                assert own[0, r, c, j] == (same and equal), (r, c, j)
            tied = [j for j in range(k) if logits[0, r, c, j] == logits[0, r, c, 0]]
            assert hit[0, r, c] == any(own[0, r, c, j] for j in tied), (r, c)
    assert hit[0, 1, 1] and hit[0, 2, 2] and not hit[0, 3, 3] and not hit[0, 0, 0]
    assert undecided[0, 0, 4] and undecided.sum() == 1
    est = EstimateArrays(x=query, z=query, mean=query, topk_image=image, topk_position=position, topk_logits=logits)
    row = copying_row(est, query, bank, plan)
    assert row == {"copy_rate": float(hit.mean()), "copy_undecided": 1 / 25}
    with pytest.raises(ValueError, match="top_image"):
        copied(image + 4, position, logits, query, bank, plan)
    with pytest.raises(ValueError, match="top_logits"):
        copied(image, position, logits[..., :2], query, bank, plan)


# --- loss floor -----------------------------------------------------------------------------------------------

def test_loss_floor_flags_a_clean_network_not_one_at_the_floor():
    rng = np.random.default_rng(5)
    batch, shape = 6, (6, 2, 4, 4)
    variance = rng.random(shape) * 0.02 + 0.001
    x = rng.random(shape)
    per_image = [math.fsum(variance[b].ravel()) / variance[b].size for b in range(batch)]
    mean = math.fsum(per_image) / batch
    se = math.sqrt(math.fsum((v - mean) ** 2 for v in per_image) / (batch - 1)) / math.sqrt(batch)
    floor, floor_se, values = loss_floor(variance)
    assert floor == pytest.approx(mean, rel=1e-12) and floor_se == pytest.approx(se, rel=1e-12)
    np.testing.assert_allclose(values, per_image, rtol=1e-12)

    clean = floor_check(variance, x, x, network="leak")  # returns the clean image: MSE 0 < floor
    assert clean["below_floor_mse"] and clean["below_floor"] and clean["mse_net_x"] == 0.0
    assert clean["mse_gap"] == pytest.approx(-mean, rel=1e-12)
    signs = rng.choice([-1.0, 1.0], size=shape)  # error² = v_b at every coordinate: MSE = v_b exactly
    at_floor = x + signs * np.sqrt(np.array(per_image))[:, None, None, None]
    honest = floor_check(variance, at_floor, x, network="honest")
    assert not honest["below_floor"] and honest["mse_gap"] == pytest.approx(0.0, abs=1e-15)
    assert floor_check(variance, at_floor, x, train_loss=mean - 4 * se)["below_floor_train_loss"]
    assert not floor_check(variance, at_floor, x, train_loss=mean - 2 * se)["below_floor_train_loss"]
    assert final_train_loss({"metrics": [{"train_loss": 0.5}, {"train_loss": 0.25}]}) == 0.25
    with pytest.raises(ValueError, match="output"):
        floor_check(variance, x[:3], x)
    with pytest.raises(ValueError, match="checkpoint"):
        final_train_loss({"metrics": []})


# --- density: within-class keys -------------------------------------------------------------------------------

def same_partition(keys, labels):
    """keys[i] == keys[j] exactly when labels[i] == labels[j]."""
    keys, labels = list(keys), list(labels)
    for i in range(len(keys)):
        for j in range(len(keys)):
            assert (keys[i] == keys[j]) == (labels[i] == labels[j]), (i, j)


def test_class_keys_and_rows_met_zero_padding_border_classes():
    height = width = 5
    plan = plan_classes(lm.Denoising(), PatchGeometry((1, height, width), 3))
    keys = class_keys(plan, 2)
    patterns = [border_pattern(r, c, height, width, 3) for r in range(height) for c in range(width)]
    assert len(set(patterns)) == 9  # 4 corners, 4 edges, the interior
    for b in range(2):
        same_partition(keys[b].ravel(), patterns)
    met = rows_met(plan, n_images=7)
    for r in range(height):
        for c in range(width):
            assert met[r, c] == 7 * patterns.count(border_pattern(r, c, height, width, 3))


@pytest.mark.parametrize("aware", [True, False])
def test_class_keys_and_rows_met_random_masks(aware):
    height = width = 5
    rng = np.random.default_rng(6)
    mask = (rng.random((3, 1, height, width)) < 0.5).astype(np.float64)
    problem = lm.Inpainting(keep_prob=0.5, input="adjoint" if aware else "direct")
    plan = plan_classes(problem, PatchGeometry((1, height, width), 3))
    keys = class_keys(plan, 3, mask)
    met = np.broadcast_to(rows_met(plan, 2, mask), (3, height, width))  # (H, W) without per-query masks
    positions = [(r, c) for r in range(height) for c in range(width)]
    patterns = [border_pattern(r, c, height, width, 3) for r, c in positions]
    for b in range(3):
        def kept(r, c):
            return sum(1 for a in range(3) for d in range(3) if 0 <= r + a - 1 < height and 0 <= c + d - 1 < width
                       and mask[b, 0, r + a - 1, c + d - 1] == 1)
        labels = [(pattern, kept(r, c)) if aware else pattern for pattern, (r, c) in zip(patterns, positions)]
        same_partition(keys[b].ravel(), labels)
        for r, c in positions:
            if aware:  # every border class whose padded offsets the query does not observe
                expected = 0
                for pattern in set(patterns):
                    hidden = all(not (0 <= r + a - 1 < height and 0 <= c + d - 1 < width)
                                 or mask[b, 0, r + a - 1, c + d - 1] == 0
                                 for i, (a, d) in enumerate((a, d) for a in range(3) for d in range(3)) if pattern[i])
                    expected += 2 * patterns.count(pattern) if hidden else 0
            else:
                expected = 2 * patterns.count(border_pattern(r, c, height, width, 3))
            assert met[b, r, c] == expected, (b, r, c)
    with pytest.raises(ValueError, match="mask"):
        class_keys(plan, 3) if aware else rows_met(plan_classes(lm.Inpainting(keep_prob=0.5, input="adjoint"),
                                                                  PatchGeometry((1, height, width), 3)), 2)


def test_within_class_percentile_and_centred_against_loops():
    rng = np.random.default_rng(7)
    values = rng.integers(0, 6, (3, 4, 4)).astype(np.float64)  # many ties
    keys = rng.integers(0, 3, (3, 4, 4))
    pct = within_class_percentile(values, keys)
    centred = within_class_centred(values, keys)
    flat_v, flat_k = values.ravel(), keys.ravel()
    for i, (v, k) in enumerate(zip(flat_v, flat_k)):
        group = [flat_v[j] for j in range(len(flat_v)) if flat_k[j] == k]
        rank = sum(1 for g in group if g < v) + (sum(1 for g in group if g == v) + 1) / 2
        assert pct.ravel()[i] == pytest.approx((rank - 0.5) / len(group), rel=1e-12)
        assert centred.ravel()[i] == pytest.approx(v - math.fsum(group) / len(group), abs=1e-12)
    with pytest.raises(ValueError, match="keys"):
        within_class_percentile(values, keys[:2])


def test_binned_rows_against_loop():
    rng = np.random.default_rng(8)
    pct = rng.random(200)
    pct[:3] = [0.0, 1.0, 0.5]
    error = rng.random(200)
    other = rng.standard_normal(200)
    rows = binned_rows(pct, error, 4, {"o": other})
    assert [r["bin"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        members = [i for i in range(200) if row["lo"] <= pct[i] < row["hi"] or (row["bin"] == 3 and pct[i] == 1.0)]
        sel = [error[i] for i in members]
        mean = math.fsum(sel) / len(sel)
        se = math.sqrt(math.fsum((e - mean) ** 2 for e in sel) / (len(sel) - 1) / len(sel))
        assert row["pixels"] == len(sel)
        assert row["mean"] == pytest.approx(mean, rel=1e-12) and row["se"] == pytest.approx(se, rel=1e-12)
        assert row["mean_extra_o"] == pytest.approx(math.fsum(other[i] for i in members) / len(members), abs=1e-12)
    empty = binned_rows(np.full(5, 0.05), np.ones(5), 2)
    assert empty[1]["pixels"] == 0 and math.isnan(empty[1]["mean"])
    with pytest.raises(ValueError, match="percentile"):
        binned_rows(pct + 1, error)
    with pytest.raises(ValueError, match="n_bins"):
        binned_rows(pct, error, 0)


def test_estimate_arrays_validation_and_zarr_group(tmp_path):
    from lemmse_ray.storage.results import open_results, write_batch, write_inputs

    rng = np.random.default_rng(9)
    est = synthetic(rng)
    with pytest.raises(ValueError, match="mean"):
        EstimateArrays(x=est.x, z=est.z, mean=est.mean[:, :, :4])
    with pytest.raises(ValueError, match="ess"):
        EstimateArrays(x=est.x, z=est.z, mean=est.mean, ess=est.ess[:2])
    with pytest.raises(ValueError, match="topk_image"):
        EstimateArrays(x=est.x, z=est.z, mean=est.mean, topk_logits=est.topk_logits, topk_image=est.topk_image[..., :2])
    with pytest.raises(ValueError, match="ess_fraction|not stored"):
        copying_row(EstimateArrays(x=est.x, z=est.z, mean=est.mean), est.x, est.x,
                    plan_classes(lm.Denoising(), PatchGeometry((1, 5, 5), 3)))

    group = open_results(str(tmp_path / "est.zarr"), {"n_rows": est.n_rows}, est.shape, 2,
                         ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk"), 3, "float32")
    write_inputs(group, torch.from_numpy(est.z), None, torch.from_numpy(est.x))
    names = ("mean", "variance", "ess", "max_weight", "entropy", "log_evidence", "topk_image", "topk_position",
             "topk_logits")
    write_batch(group, 0, 0, {name: getattr(est, name)[:2] for name in names})
    with pytest.raises(ValueError, match="unfinished"):
        EstimateArrays.from_group(group)
    write_batch(group, 1, 2, {name: getattr(est, name)[2:] for name in names})
    read = EstimateArrays.from_group(group)
    assert read.n_rows == est.n_rows and read.mask is None
    np.testing.assert_array_equal(read.topk_position, est.topk_position)
    np.testing.assert_allclose(read.ess, est.ess.astype(np.float32))


# --- real estimates -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train", n=30), load_dataset("digits", "test", n=10)


def estimate_arrays(train, images, sigma, seed=0):
    problem = lm.Denoising()
    _, z, _ = problem.measure(images.double(), sigma, torch.Generator().manual_seed(seed))
    res = lm.estimate(train, z, problem, sigma, patch_size=3, stats=ALL_STATS, topk=5)
    return EstimateArrays.from_result(res, z, images)


def test_real_estimates_copy_at_tiny_sigma(digits):
    train, test = digits
    height, width = train.shape[2:]
    plan = plan_classes(lm.Denoising(), PatchGeometry(tuple(train.shape[1:]), 3))
    est = estimate_arrays(train, train[:10], 1e-3)
    row = copying_row(est, train[:10], train, plan)
    assert row["copy_rate"] == 1.0  # σ → 0 on train queries: every pixel copies its own patch or a duplicate
    # the own row wins unless an exact duplicate (same border class, same patch) precedes it; ESS = multiplicity
    bank = train.double().numpy()
    rows = [(border_pattern(r, c, height, width, 3), patch_at(bank[i], r, c, 3))
            for i in range(len(bank)) for r in range(height) for c in range(width)]
    for b in range(10):
        for r in range(height):
            for c in range(width):
                own = patch_at(bank[b], r, c, 3)
                pattern = border_pattern(r, c, height, width, 3)
                copies = sum(1 for p, patch in rows if p == pattern and np.array_equal(patch, own))
                assert est.ess[b, r, c] == pytest.approx(copies, rel=1e-3)
                if copies == 1:
                    assert est.topk_image[b, r, c, 0] == b and est.topk_position[b, r, c, 0] == r * width + c
    test_est = estimate_arrays(train, test, 1e-3, seed=1)
    test_row = copying_row(test_est, test, train, plan)
    assert test_row["copy_rate"] < 0.5


def test_real_estimates_uniform_weights_at_large_sigma_and_floor(digits):
    train, _ = digits
    height, width = train.shape[2:]
    plan = plan_classes(lm.Denoising(), PatchGeometry(tuple(train.shape[1:]), 3))
    est = estimate_arrays(train, train[:10], 100.0)
    for r in range(height):
        for c in range(width):
            pattern = border_pattern(r, c, height, width, 3)
            class_rows = len(train) * sum(1 for rr in range(height) for cc in range(width)
                                          if border_pattern(rr, cc, height, width, 3) == pattern)
            assert (est.ess[:, r, c] > 0.99 * class_rows).all() and (est.ess[:, r, c] <= class_rows * 1.0001).all()
    row = concentration_row(est, plan, train)
    assert row["ess_fraction_q25"] > 0.99 and row["frac_ess_lt2"] == 0.0
    assert row["ess_fraction_interior_q25"] > 0.99 and row["class_mean_distance_interior_q75"] < 0.01  # σ → ∞
    mass_z = topk_mass(est.topk_logits, log_evidence=est.log_evidence, n_rows=est.n_rows)
    np.testing.assert_allclose(mass_z, topk_mass(est.topk_logits, max_weight=est.max_weight), rtol=1e-4)

    mid = estimate_arrays(train, train[:10], 0.3)  # the LE-MMSE itself sits at the floor; a leak is below it
    assert concentration_row(mid, plan, train)["class_mean_distance_interior_median"] > \
        10 * row["class_mean_distance_interior_median"]
    assert not floor_check(mid.variance, mid.mean, mid.x, network="LE-MMSE")["below_floor"]
    assert floor_check(mid.variance, mid.x, mid.x, network="leak")["below_floor"]
    rows = density_rows(mid, plan, {"leak": mid.x})
    assert {(r["metric"], r["network"]) for r in rows} == {("mse_lemmse_x", None), ("mse_net_lemmse", "leak")}
    assert sum(r["pixels"] for r in rows if r["network"] is None) == 10 * height * width

    floor = floor_rows(mid, {"leak": mid.x}, {"leak": 0.0})  # a planted leak: it returns the clean image
    assert [r["network"] for r in floor] == ["LE-MMSE", "leak"]
    assert [r["below_floor"] for r in floor] == [False, True] and floor[1]["below_floor_train_loss"]
    cell = cell_metrics(mid, plan, {"leak": mid.x}, train[:10], train, train)
    assert len(cell["images"]) == 10 and len(cell["cell"]) == 1 and cell["cell"][0]["copy_rate"] <= 1
    assert len(cell["density"]) == 20 and {r["network"] for r in cell["density"]} == {None, "leak"}
    assert sum(r["pixels"] for r in cell["classes"]) == 10 * height * width


@pytest.mark.parametrize("input_mode", ["adjoint", "direct"])
def test_real_random_mask_estimates_stay_within_rows_met(digits, input_mode):
    train, _ = digits
    problem = lm.Inpainting(keep_prob=0.7, input=input_mode)
    plan = plan_classes(problem, PatchGeometry(tuple(train.shape[1:]), 3))
    _, z, mask = problem.measure(train[:5].double(), 0.05, torch.Generator().manual_seed(0))
    res = lm.estimate(train, z, problem, 0.05, patch_size=3, mask=mask, stats=ALL_STATS, topk=5)
    est = EstimateArrays.from_result(res, z, train[:5], mask)
    assert (est.ess <= rows_met(plan, len(train), est.mask) * (1 + 1e-4)).all()
    row = {**concentration_row(est, plan), **copying_row(est, train[:5], train, plan)}
    assert 0 < row["ess_fraction_median"] <= 1 and 0 <= row["copy_rate"] <= 1
    rows = density_rows(est, plan)
    assert sum(r["pixels"] for r in rows) == 5 * 64
