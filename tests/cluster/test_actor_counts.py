"""Actor requests are checked against the cluster before any actor starts, and a start never waits forever.

The session cluster has 2 CPUs and no GPU (``conftest.py``): each shard actor takes one CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import ray

import lemmse_ray as lm
from lemmse_ray.cluster.actors import start_actors
from lemmse_ray.cluster.build import build_bank
from lemmse_ray.cluster.errors import ClusterError
from lemmse_ray.cluster.session import check_actor_count
from lemmse_ray.data.loaders import load_dataset
from lemmse_ray.studies.scaling import scaling_study

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    train = load_dataset("digits", "train", n=6).double()
    return build_bank(str(tmp_path_factory.mktemp("bank") / "bank.zarr"), train, lm.Denoising(), patch_size=3,
                      shard_rows=64, progress=False)


@ray.remote(num_cpus=1)
class Holder:
    """Holds one CPU while it lives (other work on the cluster)."""

    def ready(self) -> bool:
        return True


def all_cpus_free() -> bool:
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the bank's build tasks release their CPUs
    return ray.available_resources().get("CPU", 0) == 2


def test_more_actors_than_cpus_is_refused_before_any_starts(bank):
    assert all_cpus_free()
    with pytest.raises(ValueError, match=r"^n_actors=3 exceeds the 2 CPUs of the cluster \(each actor takes one "
                                         r"CPU\): use n_actors 2 or fewer"):
        start_actors(bank, 3)
    assert all_cpus_free()  # nothing was started
    check_actor_count(2)


def test_busy_cpus_end_in_a_bounded_wait(bank):
    holders = [Holder.remote() for _ in range(2)]
    ray.get([h.ready.remote() for h in holders])
    try:
        with pytest.raises(ClusterError, match=r"1 actors need 1 free CPUs, but only 0 of the cluster's 2 were "
                                               r"free after 0.5 s"):
            start_actors(bank, 1, start_timeout_s=0.5)
    finally:
        for h in holders:
            ray.kill(h)
    actors = start_actors(bank, 1)  # freed (the kills release their CPUs): starts
    try:
        assert ray.get(actors[0].describe.remote())["rows"] == bank.n_rows
    finally:
        ray.kill(actors[0])


def test_an_autoscaling_cluster_may_grow_but_not_forever(bank, monkeypatch):
    """Where Ray publishes an autoscaler's node groups (here: planted, 4 CPUs at most), up to that many actors
    may be asked for; the ones the autoscaler never places end the start after a bounded wait."""
    from lemmse_ray.cluster import session

    monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 4})
    monkeypatch.setattr(session, "AUTOSCALE_TIMEOUT_S", 3.0)
    with pytest.raises(ValueError, match=r"n_actors=5 exceeds the 4 CPUs the cluster can scale to \(2 now\)"):
        start_actors(bank, 5)
    assert all_cpus_free()
    with pytest.raises(ClusterError, match="[123] of 3 actors had not started after 3 s"):
        start_actors(bank, 3)
    assert all_cpus_free()  # the two that started were killed


def test_scaling_refuses_more_actors_than_cpus(tmp_path):
    from lemmse_ray.runs.config import Config

    cfg = Config(dataset="digits", n_train=8, n_queries=1, out=str(tmp_path / "out"))
    train = load_dataset("digits", "train", n=8).double()
    with pytest.raises(ValueError, match="max_actors=4 exceeds the 2 CPUs"):
        scaling_study(cfg, train, lm.Denoising(), {"test": train[:1]}, max_actors=4)
    assert not (tmp_path / "out").exists()


def test_cli_names_the_flag_in_one_line(ray_cluster, tmp_path):
    """``lemmse estimate --n-actors 3`` on the 2-CPU cluster: one line naming --n-actors, exit 2, nothing
    computed (the subprocess joins the session cluster through RAY_ADDRESS)."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "lemmse_ray.cli", "estimate", "--dataset", "digits", "--n-train", "8",
                          "--n-queries", "1", "--n-actors", "3", "--out", str(out)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("lemmse: error: --n-actors=3 exceeds the 2 CPUs of the cluster"), run.stderr[-2000:]
    assert not out.exists()
