"""Training on Ray Train: checkpoints, metrics, crash + resume = uninterrupted run, skip, refusal, overwrite.

Three ``fit()`` calls in all (about 20-30 s each), shared by the tests through one module fixture:
a run that crashes during epoch 2, its resumption, and an uninterrupted run (with ``overwrite``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lemmse_ray.runs.config import Config
from lemmse_ray.models.networks import build_network
from lemmse_ray.core.problems import Denoising, Inpainting
from lemmse_ray.runs.training import CHECKPOINT, METRICS, load_network, network_dir, step_generator, train_all, train_network, training_batch

SIGMA = 0.2
STEPS = 6


def small_config(out, **changes) -> Config:
    base = Config(networks=["patchmlp"], hidden=8, patch_size=3, epochs=2, steps_per_epoch=STEPS, batch_size=4,
                  lr=1e-2, n_workers=1, sigmas=[SIGMA], seed=3, out=str(out))
    return dataclasses.replace(base, **changes)


def images() -> torch.Tensor:
    """16 smooth 1×8×8 images in [0, 1] (a denoiser beats the identity on them)."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand((16, 1, 2, 2), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)


def metrics_rows(cfg: Config) -> list[dict]:
    return pq.read_table(f"{network_dir(cfg, 'patchmlp', SIGMA)}/{METRICS}").to_pylist()


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """Run A crashes in epoch 2 and is resumed; run B is uninterrupted (over a bogus different-config file)."""
    import ray.train

    train = images()
    cfg_a = small_config(tmp_path_factory.mktemp("a"))

    class CrashingDenoising(Denoising):
        """Denoising whose worker copy fails at the first draw of epoch 2 (same spec as Denoising)."""
        calls = 0

        def measure(self, x, sigma, generator=None):
            type(self).calls += 1
            if type(self).calls > STEPS:
                raise RuntimeError("simulated crash in epoch 2")
            return super().measure(x, sigma, generator)

    with pytest.raises(ray.train.TrainingFailedError):
        train_network(cfg_a, "patchmlp", SIGMA, train, CrashingDenoising())
    path_a = f"{network_dir(cfg_a, 'patchmlp', SIGMA)}/{CHECKPOINT}"
    crashed = {"checkpoint": torch.load(path_a, weights_only=True), "metrics": metrics_rows(cfg_a)}
    train_all(cfg_a, train, Denoising())

    # run B's folder first holds a checkpoint of another run (other lr), whose weights are zeroed; its output
    # folder is given relative to the current directory (Ray Train workers run in a directory of their own)
    base_b = tmp_path_factory.mktemp("b")
    cwd = os.getcwd()
    os.chdir(base_b.parent)
    try:
        cfg_b = small_config(base_b.name)
        path_b = f"{network_dir(cfg_b, 'patchmlp', SIGMA)}/{CHECKPOINT}"
        assert path_b == str(base_b / "networks" / f"patchmlp_sigma{SIGMA:g}" / CHECKPOINT)
        bogus = dict(crashed["checkpoint"])
        bogus["config"] = {**bogus["config"], "lr": 0.5}
        bogus["model"] = {k: torch.zeros_like(v) for k, v in bogus["model"].items()}
        Path(path_b).parent.mkdir(parents=True)
        torch.save(bogus, path_b)
        with pytest.raises(ValueError, match="another run.*config"):
            train_network(cfg_b, "patchmlp", SIGMA, train, Denoising())
        train_network(dataclasses.replace(cfg_b, overwrite=True), "patchmlp", SIGMA, train, Denoising())
    finally:
        os.chdir(cwd)
    cfg_b = dataclasses.replace(cfg_b, out=str(base_b))
    return {"train": train, "cfg_a": cfg_a, "cfg_b": cfg_b, "path_a": path_a, "path_b": path_b, "crashed": crashed}


def test_checkpoint_loads_with_weights_only(runs):
    checkpoint = torch.load(runs["path_b"], weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 2 * STEPS
    assert checkpoint["sigma"] == SIGMA and checkpoint["problem"] == Denoising().spec()
    assert checkpoint["network"]["name"] == "patchmlp" and checkpoint["network"]["hidden"] == 8
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "config"}
    net = build_network(**checkpoint["network"])
    net.load_state_dict(checkpoint["model"])  # strict: every tensor of the stored config is there
    loaded, _ = load_network(runs["path_b"])
    z = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(loaded(z), net(z))
    assert not loaded.training


def test_metrics_one_row_per_epoch_and_loss_decreases(runs):
    rows = metrics_rows(runs["cfg_b"])
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [STEPS, 2 * STEPS]
    assert all(r["network"] == "patchmlp" and r["sigma"] == SIGMA and r["seconds"] > 0 for r in rows)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert 0 < rows[1]["lr"] < rows[0]["lr"] < 1e-2  # cosine decay


def test_crash_leaves_epoch_1_checkpoint(runs):
    crashed = runs["crashed"]
    assert crashed["checkpoint"]["epoch"] == 1
    assert [r["epoch"] for r in crashed["metrics"]] == [1]


def test_resume_continues_and_matches_uninterrupted_run(runs):
    rows = metrics_rows(runs["cfg_a"])
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == runs["crashed"]["metrics"][0]  # epoch 1 (with its wall time) was not redone
    resumed = torch.load(runs["path_a"], weights_only=True)
    straight = torch.load(runs["path_b"], weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value)
    assert rows[1]["train_loss"] == pytest.approx(metrics_rows(runs["cfg_b"])[1]["train_loss"], rel=1e-5)


def test_overwrite_started_afresh(runs):
    straight = torch.load(runs["path_b"], weights_only=True)
    assert straight["config"]["lr"] == 1e-2
    assert all(value.abs().sum() > 0 for key, value in straight["model"].items() if key.endswith("weight"))


def test_finished_run_is_skipped(runs, monkeypatch):
    import ray.train.torch

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished network must not be trained again")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_fit)
    before = open(runs["path_b"], "rb").read()
    assert train_network(runs["cfg_b"], "patchmlp", SIGMA, runs["train"], Denoising()) == runs["path_b"]
    assert open(runs["path_b"], "rb").read() == before


def test_other_config_is_refused(runs):
    with pytest.raises(ValueError, match="another run.*problem"):
        train_network(runs["cfg_b"], "patchmlp", SIGMA, runs["train"], Denoising(input="tikhonov"))
    with pytest.raises(ValueError, match="another run.*config"):
        train_network(small_config(runs["cfg_b"].out, seed=4), "patchmlp", SIGMA, runs["train"], Denoising())


def test_fresh_noise_every_step():
    train, problem = images(), Denoising()
    draw = lambda seed, rank, step: training_batch(train, problem, SIGMA, 4, step_generator(seed, rank, step))
    z0, x0 = draw(0, 0, 0)
    z0_again, x0_again = draw(0, 0, 0)
    assert torch.equal(z0, z0_again) and torch.equal(x0, x0_again)
    for other in (draw(0, 0, 1), draw(0, 1, 0), draw(1, 0, 0)):
        assert not torch.equal(other[0], z0)
    noise = z0.double() - x0.double()
    assert noise.std() == pytest.approx(SIGMA, rel=0.4) and z0.dtype == torch.float32


def test_random_mask_aware_input_has_mask_channel():
    train = images()
    aware = Inpainting(keep_prob=0.5, input="adjoint")
    inputs, x = training_batch(train, aware, SIGMA, 4, step_generator(0, 0, 0))
    assert inputs.shape == (4, 2, 8, 8) and x.shape == (4, 1, 8, 8)
    mask = inputs[:, 1:]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(inputs[:, :1][mask == 0] == 0)  # aware input: m ⊙ y
    masks = [training_batch(train, aware, SIGMA, 4, step_generator(0, 0, s))[0][:, 1:] for s in (1, 2)]
    assert not torch.equal(masks[0], masks[1])  # fresh masks every step
    agnostic = Inpainting(keep_prob=0.5, input="direct")
    assert training_batch(train, agnostic, SIGMA, 4, step_generator(0, 0, 0))[0].shape == (4, 1, 8, 8)


@pytest.mark.parametrize("changes, parameter", [
    ({"networks": ["vgg"]}, "networks"),
    ({"epochs": 0}, "epochs"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ({"n_workers": 2, "batch_size": 3}, "batch_size"),
    ({"n_workers": 0}, "n_workers"),
    ({"lr": 0.0}, "lr"),
])
def test_invalid_parameters_are_named(tmp_path, changes, parameter):
    with pytest.raises(ValueError, match=f"^{parameter}"):
        train_all(small_config(tmp_path, **changes), images(), Denoising())
    assert not (tmp_path / "networks").exists()


def test_invalid_sigma_is_named(tmp_path):
    with pytest.raises(ValueError, match="^sigma"):
        train_network(small_config(tmp_path), "patchmlp", -1.0, images(), Denoising())


def test_plain_task_path_trains_the_same_network_as_ray_train(runs, tmp_path):
    """``plain=True`` (one Ray task, no Ray Train) runs the same loop: the same weights and epoch losses as
    the uninterrupted Ray Train run B, bit for bit (same seeds, one CPU worker)."""
    cfg = dataclasses.replace(runs["cfg_b"], out=str(tmp_path))
    path = train_network(cfg, "patchmlp", SIGMA, runs["train"], Denoising(), progress=False, plain=True)
    plain = torch.load(path, weights_only=True)
    reference = torch.load(runs["path_b"], weights_only=True)
    assert plain["epoch"] == reference["epoch"] == 2
    for name, weight in reference["model"].items():
        assert torch.equal(plain["model"][name], weight), name
    assert [m["train_loss"] for m in plain["metrics"]] == [m["train_loss"] for m in reference["metrics"]]
    with pytest.raises(ValueError, match="n_workers must be 1"):
        train_network(dataclasses.replace(cfg, n_workers=2, batch_size=4), "patchmlp", SIGMA, runs["train"],
                      Denoising(), plain=True)
