"""Speed-and-scale paths: problems sent to workers, the pipelined driver, streaming actors, ``plan`` counts and
the scaling study.  Every path must give the numbers of the simple one (bit for bit where stated)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ray import cloudpickle

import lemmse_ray as lm

F64 = torch.float64


def test_pickled_generic_problem_carries_no_dense_covariance():
    problem = lm.LinearInverseProblem(lambda x: x, None, label="identity")
    cov = problem.covariance((3, 64, 64))  # a dense (12288)² matrix, 1.2 GB, cached in the problem
    assert cov.matrix.nbytes > 10**9
    assert len(cloudpickle.dumps(problem)) <= 10**6
    # a copy re-probes what it needs: same covariance as the original's
    small = lm.LinearInverseProblem(lambda y: 2.0 * y, lambda y: 0.5 * y, label="half")
    original = small.covariance((1, 4, 4)).matrix
    copy = cloudpickle.loads(cloudpickle.dumps(small))
    assert copy._cov_cache == {}
    np.testing.assert_array_equal(copy.covariance((1, 4, 4)).matrix, np.eye(16) * 0.25)
    np.testing.assert_array_equal(original, np.eye(16) * 0.25)


SIGMA = 0.15
STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")
OUTPUTS = ("mean", "variance", "ess", "max_weight", "entropy", "log_evidence", "topk_image", "topk_position",
           "topk_logits")


@pytest.fixture(scope="module")
def digits():
    from lemmse_ray.data.loaders import load_dataset

    return load_dataset("digits", "train", n=24).double(), load_dataset("digits", "test", n=5).double()


def test_pipelined_equals_sequential_and_streaming_equals_resident(tmp_path, digits, ray_cluster):
    from lemmse_ray.cluster.build import build_bank
    from lemmse_ray.cluster.driver import estimate_on_ray
    from lemmse_ray.cluster.actors import start_actors

    train, queries = digits
    problem = lm.Denoising()
    _, z, _ = problem.measure(queries, SIGMA, torch.Generator().manual_seed(0))
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, shard_rows=300, progress=False)
    import ray

    runs, described = {}, []
    # two actors of each kind, one kind at a time (the session cluster has 2 CPUs)
    for actors, names in ((lambda: start_actors(bank, 2), (("sequential", 1), ("pipelined", 3))),
                          (lambda: start_actors(bank, 2, actor_memory=0), (("streaming", 2),))):
        actors = actors()  # actor_memory=0: nothing fits, every batch reads the shards again
        for name, depth in names:
            runs[name] = estimate_on_ray(bank, z, SIGMA, str(tmp_path / name), batch_images=1, actors=actors,
                                         stats=STATS, max_in_flight=depth, progress=False)
        described += ray.get([a.describe.remote() for a in actors])
        for actor in actors:
            ray.kill(actor)
    for name in OUTPUTS:  # the merge order depends neither on the batches in flight nor on where keys live
        np.testing.assert_array_equal(runs["pipelined"][name][...], runs["sequential"][name][...], err_msg=name)
        np.testing.assert_array_equal(runs["streaming"][name][...], runs["sequential"][name][...], err_msg=name)
    assert [d["streaming"] for d in described] == [False, False, True, True]
    image_bytes = 4 * 8 * 8  # a stored 8×8 grayscale image, float32
    for d in described[2:]:  # streaming: each shard read once per batch (5 batches)
        assert d["read_bytes"] == 5 * d["images"] * image_bytes
    for d in described[:2]:
        assert d["read_bytes"] == d["images"] * image_bytes
    entry = runs["pipelined"].attrs["history"][-1]
    assert len(entry["actor_busy_s"]) == 2 and all(s > 0 for s in entry["actor_busy_s"])
    assert 0 < entry["busy_fraction"] <= 1


def test_calibrating_resident_and_streaming_actors_measures_them_and_changes_no_result(tmp_path, digits, ray_cluster):
    from lemmse_ray.cluster.actors import calibrate_actors, start_actors
    from lemmse_ray.cluster.build import build_bank
    from lemmse_ray.cluster.driver import estimate_on_ray
    import ray

    train, queries = digits
    problem = lm.Denoising()
    _, z, _ = problem.measure(queries, SIGMA, torch.Generator().manual_seed(1))
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, shard_rows=300, progress=False)
    for memory in (None, 0):  # resident, then streaming (nothing fits)
        plain = estimate_on_ray(bank, z, SIGMA, str(tmp_path / f"plain{memory}"), batch_images=2, n_actors=2,
                                stats=STATS, actor_memory=memory, progress=False)
        actors = start_actors(bank, 2, actor_memory=memory)
        c = calibrate_actors(actors, bank, z, None, SIGMA, 2, STATS, 5)
        assert 0 < c["start_s"] < c["calibration_s"]
        assert c["pairs_per_s"] > 0 and c["prepare_s"] > 0 and c["read_mb_s"] > 0 and c["batch_overhead_s"] > 0
        calibrated = estimate_on_ray(bank, z, SIGMA, str(tmp_path / f"calibrated{memory}"), batch_images=2,
                                     actors=actors, stats=STATS, progress=False)
        assert [d["streaming"] for d in ray.get([a.describe.remote() for a in actors])] == [memory == 0] * 2
        for actor in actors:
            ray.kill(actor)
        for name in OUTPUTS:
            np.testing.assert_array_equal(calibrated[name][...], plain[name][...], err_msg=name)


def _pattern(h, w, height, width, p):
    """Offsets of a P×P patch at (h, w) that fall outside the image (zero padding)."""
    r = p // 2
    return frozenset((dh, dw) for dh in range(-r, r + 1) for dw in range(-r, r + 1)
                     if not (0 <= h + dh < height and 0 <= w + dw < width))


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_plan_counts_rows_pairs_bytes_and_memory(padding):
    from lemmse_ray.core.classes import plan_classes
    from lemmse_ray.core.patches import PatchGeometry
    from lemmse_ray.cluster.plan import count

    n_images, channels, height, width, p = 7, 2, 6, 5, 3
    gen = torch.Generator().manual_seed(0)
    z = torch.rand((3, channels, height, width), generator=gen, dtype=F64)
    problem = lm.Denoising()
    plan = plan_classes(problem, PatchGeometry((channels, height, width), p, padding, "all"))
    got = count(problem, plan, n_images, [(z, None), (z[:2], None)], n_actors=2, batch_images=2, shard_rows=40)
    # independently: every position is a bank candidate; a query pixel meets the rows of the positions with
    # its own border pattern (zero padding; denoising covariances are full rank), or all rows (circular)
    positions = [(h, w) for h in range(height) for w in range(width)]
    rows = n_images * len(positions)
    if padding == "zeros":
        same = {q: sum(_pattern(*q, height, width, p) == _pattern(*o, height, width, p) for o in positions)
                for q in positions}
    else:
        same = {q: len(positions) for q in positions}
    per_image = sum(n_images * same[q] for q in positions)
    assert got.rows == rows
    assert got.pairs == (3 + 2) * per_image
    assert got.pairs_per_batch == [2 * per_image, per_image, 2 * per_image]
    d = channels * p * p
    assert got.bank_bytes == n_images * channels * height * width * 4  # the images, float32
    # 30 rows per image: shards of 40 rows hold 1 image; actors get shards [0, 3) and [3, 7) -> 3 and 4 images.
    # The sliding kernel's class (circular: every position; zeros: the 4 x 3 interior) is held as images: key
    # images (circularly padded by 1 on each side) and value images in float32, in 16 lanes at most, and the
    # float64 images; the other rows as features [k, ½‖k‖²], values and a row id
    assert got.actors == 2
    if padding == "circular":
        sliding_bytes = 16 * channels * ((height + 2) * (width + 2) + height * width) * 4
        other_rows = 0
    else:
        sliding_bytes = 16 * channels * (height * width + 4 * 3) * 4
        other_rows = 4 * (height * width - 4 * 3)
    sliding_bytes += 4 * channels * height * width * 8
    assert got.actor_bytes == other_rows * ((d + 1 + channels) * 4 + 8) + sliding_bytes
    if padding == "zeros":
        assert got.pairs < (3 + 2) * len(positions) * rows  # border pixels meet only their own pattern's rows


def test_plan_counts_match_the_bank_and_the_run(tmp_path, digits, ray_cluster):
    """The stored bytes and the pairs of a real run equal the plan's."""
    from lemmse_ray.cluster.build import build_bank
    from lemmse_ray.cluster.driver import estimate_on_ray
    from lemmse_ray.cluster.plan import count

    train, queries = digits
    problem = lm.Inpainting(keep_prob=0.7, input="adjoint")  # masked kind: pairs depend on each mask
    _, z, mask = problem.measure(queries, SIGMA, torch.Generator().manual_seed(1))
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, shard_rows=500, progress=False)
    got = count(problem, bank.plan, len(train), [(z, mask)], n_actors=2, batch_images=2, shard_rows=500)
    assert bank.attrs["image_dtype"] == "float32"
    assert got.bank_bytes == bank.group["images"].nbytes == train.numel() * 4 and got.rows == bank.n_rows
    # pairs, counted independently: a query pixel meets a class when none of its kept pixels is padded there
    geometry = bank.plan.geometry
    kept = geometry.extract_mask(mask.double()).reshape(-1, p2 := geometry.patch_size ** 2)
    class_rows = np.diff(bank.layout.offsets)
    pairs = 0
    for q in range(kept.shape[0]):
        for c, cls in enumerate(bank.plan.classes):
            if all(not (cls.padded_pixels[a] and kept[q, a] > 0) for a in range(p2)):
                pairs += int(class_rows[c])
    assert got.pairs == pairs
    group = estimate_on_ray(bank, z, SIGMA, str(tmp_path / "out"), mask=mask, batch_images=2, n_actors=2,
                            stats=(), progress=False)
    assert group.attrs["history"][-1]["pairs"] == pairs


def test_scaling_study_writes_parquet_and_figures(tmp_path, ray_cluster):
    import pyarrow.parquet as pq

    from lemmse_ray.runs.config import Config
    from lemmse_ray.runs.pipeline import load_data, make_problem
    from lemmse_ray.studies.scaling import scaling_study

    cfg = Config(dataset="digits", n_train=8, n_queries=1, patch_size=3, batch_images=1, out=str(tmp_path))
    train, queries = load_data(cfg)
    rows = scaling_study(cfg, train, make_problem(cfg, tuple(train.shape[1:])), queries, max_actors=2)
    table = pq.read_table(tmp_path / "scaling" / "scaling.parquet").to_pylist()
    assert [(r["study"], r["actors"]) for r in table] == [("strong", 1), ("weak", 1), ("strong", 2), ("weak", 2)]
    assert table == rows
    strong = [r for r in table if r["study"] == "strong"]
    weak = [r for r in table if r["study"] == "weak"]
    assert strong[0]["rows"] == strong[1]["rows"] == 8 * train.shape[2] * train.shape[3]  # all positions
    assert weak[1]["rows"] == 2 * weak[0]["rows"] == strong[0]["rows"]  # 4 then 8 images
    for r in table:
        one = next(s for s in table if s["study"] == r["study"] and s["actors"] == 1)
        assert r["pairs_per_s"] == pytest.approx(r["pairs"] / r["seconds"])
        assert r["efficiency"] == pytest.approx(r["pairs_per_s"] / (r["actors"] * one["pairs_per_s"]))
    assert (tmp_path / "scaling" / "throughput.png").stat().st_size > 0
    assert (tmp_path / "scaling" / "efficiency.png").stat().st_size > 0


def test_plan_command_prints_counts_and_a_calibrated_prediction(tmp_path, ray_cluster, capsys):
    from lemmse_ray.cli import main

    argv = ["plan", "--dataset", "digits", "--n-train", "8", "--n-queries", "1", "--patch-size", "3",
            "--n-actors", "2", "--shard-rows", "128", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    height, width = 8, 8  # digits
    assert f"plan: {8 * height * width:,} bank rows" in out
    assert "2 actors, 0.0 MB of bank parts each (resident)" in out  # 4 shards of 2 images (128 rows)
    assert "pairs/s per actor" in out and "predicted estimate time" in out
    assert not (tmp_path / "bank.zarr").exists()  # planning writes nothing


def test_estimate_command_calibrates_on_its_own_actors_and_only_when_it_starts_them(tmp_path, ray_cluster, capsys):
    from lemmse_ray.cli import main

    argv = ["estimate", "--dataset", "digits", "--n-train", "8", "--n-queries", "1", "--patch-size", "3",
            "--n-actors", "2", "--shard-rows", "128", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plan: 512 bank rows" in out
    line = next(text for text in out.splitlines() if "calibration" in text)
    assert "calibration on the 2 actors (started, shards loaded, in " in line
    start = float(line.split("shards loaded, in ")[1].split(" s)")[0])
    predicted = float(line.split("predicted estimate time ")[1].split(" s")[0])
    measured = next(text for text in out.splitlines() if text.startswith("measured: "))
    assert 0 < start < predicted  # the measured start is part of the prediction
    assert f"predicted {predicted:.1f} s" in measured
    # a second invocation finds every batch done: no actor is started, so nothing is calibrated
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "plan: 512 bank rows" in again and "calibration" not in again and "measured: " not in again


def test_predicted_time_counts_a_measured_start_as_measured_and_else_the_shard_load():
    from lemmse_ray.cluster.plan import Plan, predict

    plan = Plan(rows=1000, pairs=700, bank_bytes=8_000_000, actors=2, actor_bytes=0, actor_memory=None,
                streaming=False, batches=3, outputs=2, pairs_per_batch=[400, 200, 100])
    before = {"pairs_per_s": 50.0, "prepare_s": 0.5, "read_mb_s": 2.0, "batch_overhead_s": 1.5}
    # start: 8 MB / 2 actors at 2 MB/s = 2 s; batches: max(0.5 + 4, 1.5) + max(0.5 + 2, 1.5) + max(0.5 + 1, 1.5)
    assert predict(plan, before) == pytest.approx(2.0 + 4.5 + 2.5 + 1.5 + 2 * 1.5)
    assert predict(plan, {**before, "read_mb_s": None}) == pytest.approx(4.5 + 2.5 + 1.5 + 2 * 1.5)
    on_actors = {**before, "start_s": 3.0, "calibration_s": 4.25}
    assert predict(plan, on_actors) == pytest.approx(4.25 + 4.5 + 2.5 + 1.5 + 2 * 1.5)
