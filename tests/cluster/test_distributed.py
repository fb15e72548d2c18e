"""Sharded Zarr banks and Ray estimation give the in-memory API's numbers, whatever the split, and survive faults."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import lemmse_ray as lm
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.data.loaders import load_dataset
from lemmse_ray.cluster.build import build_bank
from lemmse_ray.cluster.driver import estimate_on_ray
from lemmse_ray.cluster.actors import start_actors
from lemmse_ray.bank.rows import row_source
from lemmse_ray.core.patches import PatchGeometry
from lemmse_ray.storage.bank_store import FORMAT_VERSION, fingerprint, open_bank

pytestmark = pytest.mark.usefixtures("ray_cluster")
REPO = Path(__file__).resolve().parents[2]
STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")
SIGMA = 0.15


@pytest.fixture(scope="module")
def data():
    train = load_dataset("digits", "train", n=24).double()
    queries = load_dataset("digits", "test", n=5).double()
    return train, queries


def measure(problem, x, seed=0):
    return problem.measure(x, SIGMA, torch.Generator().manual_seed(seed))


def compare(group, ref, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(group["mean"][...], ref.mean.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(group["variance"][...], ref.variance.numpy(), rtol=0, atol=tol)
    # a partial merged twice would double l and l2: ess and log-evidence would move
    np.testing.assert_allclose(group["ess"][...], ref.ess.numpy(), rtol=tol * 10)
    np.testing.assert_allclose(group["log_evidence"][...], ref.log_evidence.numpy(), rtol=0, atol=tol * 100)
    np.testing.assert_allclose(group["entropy"][...], ref.entropy.numpy(), rtol=0, atol=tol * 100)
    np.testing.assert_allclose(group["max_weight"][...], ref.max_weight.numpy(), rtol=tol * 10)
    np.testing.assert_allclose(group["topk_logits"][...], ref.topk_logits.numpy(), rtol=0, atol=tol * 100)
    assert (group["topk_image"][...] == ref.topk_image.numpy()).mean() > 0.99  # ties may order differently
    assert (group["topk_position"][...] == ref.topk_position.numpy()).mean() > 0.99


PROBLEMS = [
    lm.Denoising(),
    lm.Inpainting(keep_prob=0.7, input="adjoint"),
    lm.Inpainting(keep_prob=0.7, input="direct"),
    lm.Deblurring(lm.gaussian_kernel(3, 0.8), input="tikhonov", reg=0.05),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: repr(p))
def test_ray_matches_in_memory(tmp_path, data, problem, dtype):
    train, queries = data
    _, z, mask = measure(problem, queries)
    mask = mask if problem.random_mask else None
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, shard_rows=300, dtype=dtype,
                      progress=False)
    assert bank.n_shards > 3
    group = estimate_on_ray(bank, z, SIGMA, str(tmp_path / "out"), mask=mask, batch_images=2, stats=STATS,
                            dtype=dtype, n_actors=2, progress=False)
    ref = lm.estimate(train, z, problem, SIGMA, patch_size=3, mask=mask, stats=STATS, dtype=dtype)
    compare(group, ref, dtype)
    np.testing.assert_array_equal(group["z"][...], z.numpy().astype(np.float32))


def test_results_do_not_depend_on_shards_or_actors(tmp_path, data):
    train, queries = data
    problem = lm.Denoising()
    _, z, _ = measure(problem, queries)
    means = []
    for shard_rows, n_actors in [(64, 1), (250, 2), (1000, 3), (5000, 1)]:
        bank = build_bank(str(tmp_path / f"bank{shard_rows}"), train, problem, patch_size=5, shard_rows=shard_rows,
                          dtype=torch.float64, progress=False)
        group = estimate_on_ray(bank, z, SIGMA, str(tmp_path / f"out{shard_rows}"), stats=STATS, n_actors=n_actors,
                                dtype=torch.float64, progress=False)
        means.append((group["mean"][...], group["ess"][...], group["log_evidence"][...]))
    for other in means[1:]:
        for a, b in zip(means[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_bank_layout_and_validation(tmp_path, data):
    train, _ = data
    problem = lm.Denoising()
    url = str(tmp_path / "bank")
    bank = build_bank(url, train, problem, patch_size=3, shard_rows=500, progress=False)
    group = zarr.open_group(url, mode="r")
    attrs = dict(group.attrs)
    assert attrs["format_version"] == FORMAT_VERSION == 3 and attrs["fingerprint"] == fingerprint(train)
    assert attrs["n_rows"] == train.shape[0] * 64 == bank.n_rows
    # whole images: 500 rows of 64 per image -> 7 images per shard, one chunk each; stored exactly, in float32
    assert attrs["shard_images"] == 7 and attrs["n_shards"] == 4 and group["images"].chunks == (7, 1, 8, 8)
    assert attrs["image_dtype"] == "float32" and sorted(group.array_keys()) == ["centers", "digests", "done", "images"]
    np.testing.assert_array_equal(group["images"][...].astype(np.float64), train.numpy())
    for shard in range(4):
        data32 = train[7 * shard: 7 * shard + 7].numpy().astype(np.float32).tobytes()
        assert bytes(group["digests"][shard]) == hashlib.sha256(data32).digest()
    # rows are numbered class-major (class, image, position): the source of a row follows from its id
    plan = plan_classes(problem, PatchGeometry((1, 8, 8), 3))
    table = [(i, j) for c in range(plan.n_classes) for i in range(24) for j in range(64)
             if plan.position_class[j] == c]
    rows = np.array([0, 5, 63, 64, 700, 1000, len(table) - 1])
    np.testing.assert_array_equal(row_source(plan, 24, rows), np.array([table[r] for r in rows]))
    with pytest.raises(ValueError, match="patch_size"):
        open_bank(url, problem, plan_classes(problem, PatchGeometry((1, 8, 8), 5)))
    with pytest.raises(ValueError, match="padding"):
        open_bank(url, problem, plan_classes(problem, PatchGeometry((1, 8, 8), 3, "circular")))
    with pytest.raises(ValueError, match="problem"):
        open_bank(url, lm.Denoising(input="tikhonov"), plan)
    with pytest.raises(ValueError, match="train"):
        open_bank(url, problem, plan, fingerprint_of=fingerprint(train[:-1]))
    with pytest.raises(ValueError, match="no bank"):
        open_bank(str(tmp_path / "missing"), problem, plan)
    with pytest.raises(ValueError, match="already holds a different bank"):
        build_bank(url, train, problem, patch_size=5, shard_rows=500, progress=False)
    group_rw = zarr.open_group(url, mode="r+")
    group_rw["done"][1] = 0
    with pytest.raises(ValueError, match="incomplete"):
        open_bank(url, problem, plan)
    group_rw.attrs["format_version"] = 99
    with pytest.raises(ValueError, match="format"):
        open_bank(url, problem, plan)


def test_bank_of_patch_rows_is_refused_with_a_hint(tmp_path, data):
    """A bank of format 2 (patch rows: keys, values, source, ...) is named as such, never read nor silently
    replaced; ``overwrite=True`` replaces it (it is this project's)."""
    train, _ = data
    problem = lm.Denoising()
    url = tmp_path / "bank"
    group = zarr.open_group(str(url), mode="w", attributes={"lemmse_ray": "bank"})
    for name in ("keys", "half_sqnorm", "values", "class_ids", "source", "centers", "done"):
        group.create_array(name, shape=(4,), dtype="float32")
    group.attrs.update({"format_version": 2, "plan_hash": "x"})
    plan = plan_classes(problem, PatchGeometry((1, 8, 8), 3))
    for call in (lambda: open_bank(str(url), problem, plan),
                 lambda: build_bank(str(url), train, problem, patch_size=3, progress=False)):
        with pytest.raises(ValueError, match="format version 2, expected 3 .*rebuild it"):
            call()
    assert sorted(zarr.open_group(str(url), mode="r").array_keys())[0] == "centers"  # untouched
    bank = build_bank(str(url), train, problem, patch_size=3, overwrite=True, progress=False)
    assert bank.attrs["format_version"] == 3 and "keys" not in zarr.open_group(str(url), mode="r")


def test_bank_builder_completes_only_missing_shards(tmp_path, data):
    train, queries = data
    problem = lm.Denoising()
    url = str(tmp_path / "bank")
    build_bank(url, train, problem, patch_size=3, shard_rows=200, progress=False)  # 3 images per shard
    group = zarr.open_group(url, mode="r+")
    reference = group["images"][...]
    shard_files = sorted((tmp_path / "bank" / "images" / "c").iterdir())
    assert len(shard_files) == 8
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_files}
    # a crash mid-build: two shards unflagged, one of them half-written with garbage
    group["done"][2] = 0
    group["done"][5] = 0
    group["images"][6:7] = 0.5
    bank = build_bank(url, train, problem, patch_size=3, shard_rows=200, progress=False)
    assert bank.build_stats["shards_written"] == 2 and bank.build_stats["rows_written"] == 2 * 3 * 64
    np.testing.assert_array_equal(group["images"][...], reference)
    for p in shard_files:
        if p.name not in ("2", "5"):
            assert p.stat().st_mtime_ns == mtimes[p.name], f"finished shard {p.name} was rewritten"


def _kill_when(group_url, predicate, action, timeout=120):
    def run():
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if predicate(zarr.open_group(group_url, mode="r")["done"][...]):
                    action()
                    return
            except Exception:  # the group may not exist yet
                pass
            time.sleep(0.05)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_actor_killed_mid_run(tmp_path, data):
    import ray
    train, queries = data
    problem = lm.Denoising()
    _, z, _ = measure(problem, queries)
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, shard_rows=300, progress=False)
    actors = start_actors(bank, 2)
    pid_before = ray.get(actors[0].describe.remote())["pid"]
    out = str(tmp_path / "out")
    killer = _kill_when(out, lambda done: done.sum() >= 1, lambda: ray.kill(actors[0], no_restart=False))
    group = estimate_on_ray(bank, z, SIGMA, out, actors=actors, batch_images=1, stats=STATS, progress=False)
    killer.join(timeout=1)
    assert ray.get(actors[0].describe.remote())["pid"] != pid_before, "the actor was not killed and restarted"
    compare(group, lm.estimate(train, z, problem, SIGMA, patch_size=3, stats=STATS), torch.float32)


def test_node_removed_mid_run(tmp_path, data, ray_cluster):
    import ray
    train, queries = data
    problem = lm.Denoising()
    _, z, _ = measure(problem, queries)
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, shard_rows=300, progress=False)
    nodes = [ray_cluster.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    try:
        actors = start_actors(bank, 2)  # GPU actors: placed on the (fake-GPU) worker nodes
        where = [ray.get(a.describe.remote())["node"] for a in actors]
        victim = next(n for n in nodes if n.node_id in where)
        out = str(tmp_path / "out")
        killer = _kill_when(out, lambda done: done.sum() >= 1, lambda: ray_cluster.remove_node(victim))
        group = estimate_on_ray(bank, z, SIGMA, out, actors=actors, batch_images=1, stats=STATS, progress=False)
        killer.join(timeout=1)
        assert victim not in ray_cluster.worker_nodes, "the node was not removed during the run"
        after = [ray.get(a.describe.remote())["node"] for a in actors]
        assert victim.node_id not in after
        compare(group, lm.estimate(train, z, problem, SIGMA, patch_size=3, stats=STATS), torch.float32)
    finally:
        for node in list(ray_cluster.worker_nodes):
            ray_cluster.remove_node(node)


def test_half_written_batch_is_recomputed(tmp_path, data):
    train, queries = data
    problem = lm.Denoising()
    _, z, _ = measure(problem, queries)
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, shard_rows=500, progress=False)
    out = str(tmp_path / "out")
    group = estimate_on_ray(bank, z, SIGMA, out, batch_images=2, stats=STATS, progress=False)
    good = group["mean"][...]
    group["done"][1] = 0  # crashed after writing part of batch 1, before its flag
    group["mean"][2:3] = -7.0
    group = estimate_on_ray(bank, z, SIGMA, out, batch_images=2, stats=STATS, progress=False)
    assert group.attrs["history"][-1]["computed_batches"] == [1]
    np.testing.assert_array_equal(group["mean"][...], good)
    with pytest.raises(ValueError, match="another run"):
        estimate_on_ray(bank, z, SIGMA * 2, out, batch_images=2, stats=STATS, progress=False)


def test_job_killed_and_resumed(tmp_path, ray_cluster):
    """A real driver process is SIGKILLed mid-run; the re-submitted job computes only what was missing."""
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "jobs" / "estimate.py"), "--dataset", "digits", "--n-train", "30",
            "--n-queries", "6", "--batch-images", "1", "--patch-size", "3", "--sigmas", "0.2", "--out", str(out),
            "--shard-rows", "400", "--n-actors", "1", "--stats", "variance", "ess", "log_evidence"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    train_url = out / "estimates" / "train_sigma0.2.zarr"
    t0 = time.time()
    done_before = None
    while time.time() - t0 < 180 and first.poll() is None:
        try:
            done = zarr.open_group(str(train_url), mode="r")["done"][...]
            if 1 <= done.sum() < len(done):
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
                done_before = zarr.open_group(str(train_url), mode="r")["done"][...]
                break
        except Exception:
            pass
        time.sleep(0.02)
    assert done_before is not None, "the job finished or failed before it could be killed mid-run"
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    group = zarr.open_group(str(train_url), mode="r")
    history = group.attrs["history"]
    computed = history[-1]["computed_batches"]
    assert sorted(computed) == sorted(np.flatnonzero(done_before == 0).tolist()), (done_before, computed)
    assert group["done"][...].all()
    # identical to an uninterrupted in-memory computation on the same inputs
    train = load_dataset("digits", "train", n=30, subset="random", seed=0).double()  # the job's subset
    ref = lm.estimate(train, torch.from_numpy(group["z"][...]).double(), lm.Denoising(), 0.2, patch_size=3,
                      stats=("variance", "ess", "log_evidence"))
    np.testing.assert_allclose(group["mean"][...], ref.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(group["ess"][...], ref.ess.numpy(), rtol=1e-4)


SLIDING_STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence")  # every statistic but top-k


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_actors_run_the_sliding_kernel_and_equal_the_in_memory_api_bit_for_bit(tmp_path, data, padding):
    """One shard, one actor: the actor holds the shard as the in-memory API holds the bank (the sliding
    kernel's class as images, the border classes as key features), prepares the same query features and merges
    in the same order, so every output equals ``PatchBank.estimate``'s bit for bit — with the actor's one
    thread (the matrix product's float32 GEMM and epilogue may round differently with more threads)."""
    train, queries = data
    problem = lm.Denoising()
    _, z, _ = measure(problem, queries)
    bank = build_bank(str(tmp_path / "bank"), train, problem, patch_size=3, padding=padding, shard_rows=1 << 20,
                      progress=False)
    assert bank.n_shards == 1
    memory = lm.PatchBank(train, problem, patch_size=3, padding=padding)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor (1 CPU)
    try:
        ref = memory.estimate(z, SIGMA, stats=SLIDING_STATS, kernel="sliding")
    finally:
        torch.set_num_threads(threads)
    assert ref.info["sliding_class"] is not None
    group = estimate_on_ray(bank, z, SIGMA, str(tmp_path / "out"), batch_images=len(z), stats=SLIDING_STATS,
                            n_actors=1, kernel="sliding", progress=False)
    for name in ("mean", *SLIDING_STATS):
        np.testing.assert_array_equal(group[name][...], getattr(ref, name).numpy(), err_msg=name)
    # and it is the LE-MMSE: float32 within float tolerance of the float64 matrix product
    exact = lm.estimate(train, z, problem, SIGMA, patch_size=3, padding=padding, stats=SLIDING_STATS,
                        dtype=torch.float64, kernel="torch")
    np.testing.assert_allclose(group["mean"][...], exact.mean.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(group["ess"][...], exact.ess.numpy(), rtol=2e-5)


def test_sliding_results_do_not_depend_on_shards_or_actors(tmp_path, data):
    """float32, the sliding kernel on every actor: shard and actor counts change only the merge order's
    rounding (compared with the float64 matrix product, and with each other)."""
    train, queries = data
    problem = lm.Denoising()
    _, z, _ = measure(problem, queries)
    exact = lm.estimate(train, z, problem, SIGMA, patch_size=3, stats=SLIDING_STATS, dtype=torch.float64,
                        kernel="torch")
    means = []
    for shard_rows, n_actors in [(64, 1), (64, 2), (500, 2), (1 << 20, 1)]:  # the session cluster has 2 CPUs
        url = str(tmp_path / f"bank{shard_rows}")
        bank = build_bank(url, train, problem, patch_size=3, shard_rows=shard_rows, progress=False)
        group = estimate_on_ray(bank, z, SIGMA, str(tmp_path / f"out{shard_rows}_{n_actors}"), stats=SLIDING_STATS,
                                n_actors=n_actors, kernel="sliding", progress=False)
        np.testing.assert_allclose(group["mean"][...], exact.mean.numpy(), rtol=0, atol=2e-6)
        np.testing.assert_allclose(group["log_evidence"][...], exact.log_evidence.numpy(), rtol=0, atol=2e-4)
        means.append(group["mean"][...])
    for other in means[1:]:
        np.testing.assert_allclose(other, means[0], rtol=0, atol=2e-6)
