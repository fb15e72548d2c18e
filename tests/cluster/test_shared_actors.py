"""Several estimate outputs of one bank with one set of shard actors (:func:`estimate_outputs`): started once,
by the first output with batches left; the same numbers as each output estimated alone; released on demand,
also when an output fails."""
from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

import lemmse_ray as lm
from lemmse_ray.cluster.build import build_bank
from lemmse_ray.cluster.driver import EstimateRequest, SharedActors, estimate_on_ray, estimate_outputs
from lemmse_ray.data.loaders import load_dataset
from lemmse_ray.storage.bank_store import open_group

pytestmark = pytest.mark.usefixtures("ray_cluster")
SIGMA = 0.15
STATS = ("variance", "ess")
OPTIONS = {"batch_images": 2, "stats": STATS, "dtype": torch.float64, "progress": False}


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    train = load_dataset("digits", "train", n=16).double()
    bank = build_bank(str(tmp_path_factory.mktemp("shared") / "bank"), train, lm.Denoising(), patch_size=3,
                      shard_rows=300, dtype=torch.float64, progress=False)
    assert bank.n_shards >= 2
    return bank


def noisy(n: int, seed: int) -> torch.Tensor:
    x = load_dataset("digits", "test", n=n).double()
    return lm.Denoising().measure(x, SIGMA, torch.Generator().manual_seed(seed))[1]


def test_outputs_share_actors_started_once_and_give_each_ones_numbers(tmp_path, bank):
    z_done, z_b, z_c = noisy(2, 0), noisy(4, 1), noisy(6, 2)
    estimate_on_ray(bank, z_done, SIGMA, str(tmp_path / "done"), n_actors=1, **OPTIONS)
    finished = estimate_outputs(bank, [EstimateRequest(z_done, SIGMA, str(tmp_path / "done"), options=OPTIONS)])
    assert finished.actors == [] and finished.computed == [0] and finished.load_seconds() == 0.0

    options = {**OPTIONS, "n_actors": 2}
    shared = estimate_outputs(bank, [EstimateRequest(z_done, SIGMA, str(tmp_path / "done"), options=options),
                                     EstimateRequest(z_b, SIGMA, str(tmp_path / "b"), options=options),
                                     EstimateRequest(z_c, SIGMA, str(tmp_path / "c"), options=options)])
    assert shared.computed == [0, 2, 3]
    assert len(shared.actors) == 2
    described = ray.get([a.describe.remote() for a in shared.actors])
    assert [d["calls"] for d in described] == [5, 5]  # one call per batch of b and c, to the same two actors
    assert shared.load_seconds() == sum(d["read_s"] for d in described) > 0

    groups = {name: open_group(str(tmp_path / name), "r") for name in ("b", "c")}
    assert shared.busy_s[0] == 0
    for name, busy in (("b", shared.busy_s[1]), ("c", shared.busy_s[2])):
        assert busy == sum(groups[name].attrs["history"][-1]["actor_busy_s"]) > 0

    shared.release()
    assert all(dead(actor) for actor in shared.actors)
    for name, z in (("b", z_b), ("c", z_c)):  # each alone, with actors of its own (the CPUs are free again)
        alone = estimate_on_ray(bank, z, SIGMA, str(tmp_path / f"{name}_alone"), **options)
        for array in ("mean", "variance", "ess"):
            np.testing.assert_array_equal(groups[name][array][...], alone[array][...])


def dead(actor, timeout: float = 60.0) -> bool:
    """Whether ``actor`` is dead within ``timeout`` seconds (``ray.kill`` is asynchronous: a call submitted just
    after it may still be served)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.describe.remote(), timeout=timeout)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def test_actors_are_released_when_an_output_fails(tmp_path, bank, monkeypatch):
    def requests():
        yield EstimateRequest(noisy(2, 3), SIGMA, str(tmp_path / "first"), options={**OPTIONS, "n_actors": 1})
        raise RuntimeError("the next output cannot be prepared")

    released = []
    release = SharedActors.release

    def watched(self):
        released.append(list(self.actors))
        release(self)

    monkeypatch.setattr(SharedActors, "release", watched)
    with pytest.raises(RuntimeError, match="cannot be prepared"):
        estimate_outputs(bank, requests(), release=True)
    assert len(released) == 1 and len(released[0]) == 1  # the actor the first output started
    assert dead(released[0][0])
