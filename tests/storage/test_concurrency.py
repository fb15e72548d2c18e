"""Processes sharing a folder (issue 16, item 5): two studies given one ``--work`` create the same banks and
estimate groups at the same moment and build the same shards; a half-made group is rebuilt, never read into
a ``KeyError``; every wait for another process is bounded.

No Ray: the processes are ``multiprocessing`` workers (spawned: zarr runs an event-loop thread that a fork
would copy half-alive) calling what the bank builder's tasks and the estimate driver call.
"""
from __future__ import annotations

import errno
import logging
import multiprocessing
import shutil
from queue import Empty

import numpy as np
import pytest
import torch
import zarr

import lemmse_ray as lm
from lemmse_ray.bank.rows import class_centers
from lemmse_ray.cluster.build import build_shard
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.core.patches import PatchGeometry
from lemmse_ray.storage import locks
from lemmse_ray.storage.bank_store import (
    MEMBERS,
    BankError,
    BankLayout,
    bank_attributes,
    create_bank_group,
    fingerprint,
    open_bank,
    verify_bank,
)
from lemmse_ray.storage.ownership import check_output_folder
from lemmse_ray.storage.results import open_results

ROUNDS = 20
N_IMAGES = 6
SHARD_ROWS = 64  # 8×8 images, patch 3, all candidates: 64 rows per image, one shard per image
SPAWN = multiprocessing.get_context("spawn")
# an estimate group: 5 query images of 1×8×8 in batches of 2, with variance, ESS and top-3
RESULT = dict(config={"sigma": 0.1, "n_rows": 384}, shape=(5, 1, 8, 8), batch_images=2,
              stats=("variance", "ess", "topk"), topk=3, dtype="float32")
RESULT_ARRAYS = ["done", "ess", "mean", "topk_image", "topk_logits", "topk_position", "variance"]


def tiny_bank(n_images: int = N_IMAGES, seed: int = 5):
    """(train, problem, plan, layout, attrs, centers) of an ``n_images``-image 8×8 denoising bank."""
    train = torch.rand(n_images, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    problem = lm.Denoising()
    plan = plan_classes(problem, PatchGeometry((1, 8, 8), 3))
    layout = BankLayout.of(n_images, plan.rows_per_image(), SHARD_ROWS)
    attrs = bank_attributes(problem, plan, layout, fingerprint(train), torch.float32, "float64")
    return train, problem, plan, layout, attrs, class_centers(train, problem, plan)


# --- what the workers run (module level: a spawned process imports them) -------------------------------------

def create_banks(urls, barrier, attrs, centers, failures):
    """Create the bank at each of ``urls`` in turn, all workers starting each one together."""
    for url in urls:
        barrier.wait(timeout=300)
        try:
            create_bank_group(url, attrs, centers, (1, 8, 8))
        except Exception as err:  # reported to the test, which fails on any
            failures.put(f"{url}: {type(err).__name__}: {err}")


def create_results(urls, barrier, failures):
    """Open (create) the estimate group at each of ``urls`` in turn, all workers starting each one together."""
    for url in urls:
        barrier.wait(timeout=300)
        try:
            open_results(url, **RESULT)
        except Exception as err:
            failures.put(f"{url}: {type(err).__name__}: {err}")


def build_every_shard(url, barrier, written, failures):
    """What ``build_bank`` does in one process: create or reopen the bank, then build every shard not done
    when it looked (all of them: both workers look at once); puts the shards this worker wrote."""
    train, problem, plan, layout, attrs, centers = tiny_bank()
    barrier.wait(timeout=300)
    try:
        group = create_bank_group(url, attrs, centers, (1, 8, 8))
        missing = [int(s) for s in np.flatnonzero(group["done"][...] == 0)]
        barrier.wait(timeout=300)  # both have listed the missing shards before either builds one
        mine = [s for s in missing if build_shard(url, None, s, train.numpy(), layout, attrs)]
        written.put(mine)
    except Exception as err:
        failures.put(f"{type(err).__name__}: {err}")


def hold(url, shard, ready, release):
    """Hold the creation lock of ``url`` (``shard`` None) or the lock of one of its shards until ``release``."""
    with (locks.creation_lock(url) if shard is None else locks.shard_lock(url, shard)):
        ready.set()
        release.wait(timeout=300)


def run_workers(target, n, first, *rest):
    """Run ``target(first, barrier, *rest, [results,] failures)`` in ``n`` spawned workers; returns
    (what they put in ``results``, their failures)."""
    barrier, results, failures = SPAWN.Barrier(n), SPAWN.Queue(), SPAWN.Queue()
    extra = (results,) if target is build_every_shard else ()
    workers = [SPAWN.Process(target=target, args=(first, barrier, *rest, *extra, failures)) for _ in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    assert [w.exitcode for w in workers] == [0] * n
    return drain(results), drain(failures)


def drain(queue) -> list:
    found = []
    while True:
        try:
            found.append(queue.get(timeout=1))
        except Empty:
            return found


def start_holder(url, shard=None):
    ready, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=hold, args=(url, shard, ready, release))
    holder.start()
    assert ready.wait(timeout=300), "the holder never took the lock"
    return holder, release


def build_here(url, train, problem, plan, layout, attrs, centers):
    """``build_bank`` in this process: create or reopen the bank, build its shards."""
    create_bank_group(url, attrs, centers, (1, 8, 8))
    for shard in range(layout.n_shards):
        build_shard(url, None, shard, train.numpy(), layout, attrs)


def assert_holds_the_training_pixels(url, train):
    """Independent of the builder: the bank holds the training images, bit for bit, one per shard."""
    assert [row["status"] for row in verify_bank(url)] == ["ok"] * N_IMAGES
    group = zarr.open_group(url, mode="r")
    np.testing.assert_array_equal(group["images"][...], train.numpy())


# --- creating one group in two processes at once -------------------------------------------------------------

def test_two_processes_creating_one_bank_leave_a_whole_bank(tmp_path):
    train, problem, plan, layout, attrs, centers = tiny_bank()
    urls = [str(tmp_path / f"bank{i}.zarr") for i in range(ROUNDS)]
    _, failures = run_workers(create_banks, 2, urls, attrs, centers)
    assert failures == []
    for url in urls:
        group = zarr.open_group(url, mode="r")
        assert sorted(group.array_keys()) == sorted(MEMBERS), url
        assert {k: group.attrs[k] for k in attrs} == attrs, url
        assert group["images"].shape == (N_IMAGES, 1, 8, 8) and layout.n_shards == N_IMAGES
        np.testing.assert_array_equal(group["centers"][...], centers)
        bank = open_bank(url, problem, plan, require_complete=False)
        assert bank.missing_shards() == list(range(layout.n_shards))


def test_two_processes_creating_one_estimate_group_leave_a_whole_group(tmp_path):
    urls = [str(tmp_path / f"est{i}.zarr") for i in range(ROUNDS)]
    _, failures = run_workers(create_results, 2, urls)
    assert failures == []
    for url in urls:
        group = zarr.open_group(url, mode="r")
        assert sorted(group.array_keys()) == RESULT_ARRAYS, url
        assert group.attrs["config"] == RESULT["config"] and group.attrs["n_batches"] == 3
        assert group["mean"].shape == (5, 1, 8, 8) and group["topk_image"].shape == (5, 8, 8, 3)
        assert not group["done"][...].any()


def test_two_processes_building_one_bank_build_each_shard_once(tmp_path):
    """Both list all 6 shards as missing, then build them: each shard is computed and written by one of
    them (the other waits for its lock and finds it done), and the bank holds the training pixels."""
    url = str(tmp_path / "bank.zarr")
    written, failures = run_workers(build_every_shard, 2, url)
    assert failures == []
    assert sorted(s for mine in written for s in mine) == list(range(N_IMAGES)), written
    assert_holds_the_training_pixels(url, tiny_bank()[0])


# --- half-made groups ---------------------------------------------------------------------------------------

def test_half_made_bank_is_an_error_when_read_and_rebuilt_when_built(tmp_path, caplog):
    """The state the race left: attributes, no ``images``.  Opening it to read is one clear error naming the
    missing array (not a ``KeyError`` later); creating or building it again rebuilds it, with a warning."""
    train, problem, plan, layout, attrs, centers = tiny_bank()
    url = str(tmp_path / "bank.zarr")
    build_here(url, train, problem, plan, layout, attrs, centers)
    shutil.rmtree(tmp_path / "bank.zarr" / "images")
    for read in (lambda: open_bank(url, problem, plan), lambda: verify_bank(url)):
        with pytest.raises(BankError, match=rf"{url} is half-made \(array 'images' missing\)"):
            read()
    with caplog.at_level(logging.WARNING, logger="lemmse_ray"):
        group = create_bank_group(url, attrs, centers, (1, 8, 8))
    assert [r.getMessage() for r in caplog.records if r.name == "lemmse_ray"] == \
        [f"{url} is a lemmse_ray bank, half-made (array 'images' missing); it holds nothing finished and is rebuilt"]
    assert sorted(group.array_keys()) == sorted(MEMBERS) and not group["done"][...].any()
    build_here(url, train, problem, plan, layout, attrs, centers)
    assert_holds_the_training_pixels(url, train)


@pytest.mark.parametrize("damage", ["delete mean", "delete done and the record", "no attributes"])
def test_half_made_estimate_group_is_rebuilt(tmp_path, caplog, damage):
    url = str(tmp_path / "est.zarr")
    open_results(url, **RESULT)
    group = zarr.open_group(url, mode="r+")
    if damage == "delete mean":
        shutil.rmtree(tmp_path / "est.zarr" / "mean")
        why = "array 'mean' missing"
    elif damage == "delete done and the record":  # a group written before the ``arrays`` record
        shutil.rmtree(tmp_path / "est.zarr" / "done")
        del group.attrs["arrays"]
        why = "array 'done' missing"
    else:  # killed between its arrays and its attributes
        group.attrs.put({"lemmse_ray": "estimate"})
        why = "its creation never finished: no attributes"
    with caplog.at_level(logging.WARNING, logger="lemmse_ray"):
        group = open_results(url, **RESULT)
    assert [r.getMessage() for r in caplog.records if r.name == "lemmse_ray"] == \
        [f"{url} is a lemmse_ray estimate output, half-made ({why}); it holds nothing finished and is rebuilt"]
    assert sorted(group.array_keys()) == RESULT_ARRAYS and group.attrs["config"] == RESULT["config"]


# --- bounded waits, killed holders, replacing a bank being built ----------------------------------------------

def test_waits_are_bounded_and_a_killed_holder_holds_nothing(tmp_path, monkeypatch):
    train, problem, plan, layout, attrs, centers = tiny_bank()
    url = str(tmp_path / "bank.zarr")
    holder, _ = start_holder(url)
    monkeypatch.setattr(locks, "WAIT_S", 0.5)
    with pytest.raises(locks.LockTimeout, match=rf"^creating or opening {url}: waited 0.5 s for the lock "
                                                rf"{url}.lock, held by another process"):
        create_bank_group(url, attrs, centers, (1, 8, 8))
    assert not (tmp_path / "bank.zarr").exists()
    holder.kill()  # SIGKILL: no clean-up runs in the holder
    holder.join(timeout=60)
    monkeypatch.setattr(locks, "WAIT_S", 60)
    group = create_bank_group(url, attrs, centers, (1, 8, 8))
    assert sorted(group.array_keys()) == sorted(MEMBERS)


def test_a_bank_is_not_replaced_while_a_shard_is_written(tmp_path, monkeypatch):
    """``overwrite`` replacing a bank waits for the process writing one of its shards (bounded), and a build
    that finds its bank replaced by another process refuses to write into it."""
    train, problem, plan, layout, attrs, centers = tiny_bank()
    url = str(tmp_path / "bank.zarr")
    build_here(url, train, problem, plan, layout, attrs, centers)
    other = tiny_bank(seed=6)
    holder, release = start_holder(url, shard=3)
    monkeypatch.setattr(locks, "WAIT_S", 0.5)
    with pytest.raises(locks.LockTimeout, match=rf"^replacing {url} \(its shards are being written\)"):
        create_bank_group(url, other[4], other[5], (1, 8, 8), overwrite=True)
    release.set()
    holder.join(timeout=60)
    assert_holds_the_training_pixels(url, train)  # left as it was
    create_bank_group(url, other[4], other[5], (1, 8, 8), overwrite=True)
    with pytest.raises(BankError, match=rf"{url} was replaced by another process during this build \(it now "
                                        "differs in fingerprint\\)"):
        build_shard(url, None, 0, train.numpy(), layout, attrs)
    assert not zarr.open_group(url, mode="r")["done"][...].any()


def test_file_systems_without_locks_run_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    train, problem, plan, layout, attrs, centers = tiny_bank()
    url = str(tmp_path / "bank.zarr")
    monkeypatch.setattr(locks.fcntl, "lockf", no_locks)
    with caplog.at_level(logging.WARNING, logger="lemmse_ray"):
        build_here(url, train, problem, plan, layout, attrs, centers)
    assert [r.getMessage() for r in caplog.records if r.name == "lemmse_ray"] == \
        [f"{url}.lock: this file system has no record locks (No locks available); creating or opening {url} runs "
         "unlocked, so two processes must not create or build it at once"]
    assert_holds_the_training_pixels(url, train)


def test_remote_urls_have_no_lock_file_and_an_output_folder_may_hold_the_banks_lock(tmp_path):
    train, problem, plan, layout, attrs, centers = tiny_bank()
    assert locks.lock_path("s3://bucket/work/banks/x.zarr") is None
    assert locks.lock_path(f"file://{tmp_path}/b.zarr/") == f"{tmp_path}/b.zarr.lock"
    group = create_bank_group("memory://concurrency/bank.zarr", attrs, centers, (1, 8, 8))
    assert sorted(group.array_keys()) == sorted(MEMBERS)
    url = str(tmp_path / "out" / "bank.zarr")
    create_bank_group(url, attrs, centers, (1, 8, 8))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bank.zarr", "bank.zarr.lock"]
    check_output_folder(str(tmp_path / "out"))  # a run may use the folder: both entries are this project's
