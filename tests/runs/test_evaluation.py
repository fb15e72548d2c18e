"""Evaluation of networks against LE-MMSE estimates: fake estimate groups and networks with known outputs,
expected PSNRs from an independent numpy formula."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lemmse_ray.runs.config import Config
from lemmse_ray.runs.evaluation import evaluate_all, summary_table
from lemmse_ray.models.networks import build_network, network_config
from lemmse_ray.runs.pipeline import estimate_url
from lemmse_ray.core.problems import Denoising, Inpainting
from lemmse_ray.storage.bank_store import open_group

SIGMA = 0.1
B, C, H, W = 3, 1, 6, 6


def np_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 10 * np.log10(1 / ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1))


def write_estimates(cfg: Config, problem_spec: dict, with_mask: bool = False) -> dict:
    """Fake estimate groups for both splits; returns their arrays."""
    rng = np.random.default_rng(0)
    data = {}
    for split in ("train", "test"):
        x = rng.uniform(size=(B, C, H, W)).astype(np.float32)
        arrays = {"x": x, "z": (x + SIGMA * rng.standard_normal(x.shape)).astype(np.float32),
                  "mean": np.clip(x + 0.03 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)}
        if with_mask:
            arrays["mask"] = (rng.uniform(size=(B, 1, H, W)) < 0.5).astype(np.float32)
        group = open_group(estimate_url(cfg, split, SIGMA), "w")
        for name, array in arrays.items():
            group.create_array(name, shape=array.shape, dtype=array.dtype)[...] = array
        group.attrs["config"] = {"problem": problem_spec, "sigma": SIGMA}
        data[split] = arrays
    return data


def save_network(net: torch.nn.Module, path, problem_spec: dict, mask_channel: bool = False) -> str:
    torch.save({"model": net.state_dict(), "network": network_config(net), "problem": problem_spec,
                "sigma": SIGMA, "mask_channel": mask_channel, "epoch": 1}, path)
    return str(path)


def identity_resnet() -> torch.nn.Module:
    """A residual ResNet with zero weights: output = input."""
    net = build_network("resnet", in_channels=C, out_channels=C, width=2, depth=1, residual=True)
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    return net


def linear_pixel_mlp(in_channels: int, weights: list[float], bias: float) -> torch.nn.Module:
    """A 1×1 PatchMLP of one layer: output = Σ_c weights[c]·input[c] + bias."""
    net = build_network("patchmlp", in_channels=in_channels, out_channels=C, patch_size=1, hidden=1, depth=1)
    with torch.no_grad():
        net.body[0].weight.copy_(torch.tensor(weights).view(1, in_channels, 1, 1))
        net.body[0].bias.fill_(bias)
    return net


@pytest.fixture
def evaluated(tmp_path):
    cfg = Config(out=str(tmp_path), sigmas=[SIGMA], patch_size=3)
    spec = Denoising().spec()
    data = write_estimates(cfg, spec)
    networks = {("resnet", SIGMA): save_network(identity_resnet(), tmp_path / "identity.pt", spec),
                ("patchmlp", SIGMA): save_network(linear_pixel_mlp(1, [0.0], 0.5), tmp_path / "const.pt", spec)}
    return cfg, data, evaluate_all(cfg, networks)


def test_rows_hold_the_psnrs_of_known_outputs(evaluated):
    cfg, data, rows = evaluated
    table = pq.read_table(f"{cfg.out}/evaluation.parquet").to_pylist()
    assert table == rows and len(rows) == 2 * 2 * B
    for split, arrays in data.items():
        outputs = {"resnet": arrays["z"], "patchmlp": np.full_like(arrays["x"], 0.5)}
        for name, out in outputs.items():
            sel = sorted((r for r in rows if r["split"] == split and r["network"] == name), key=lambda r: r["image"])
            assert [r["image"] for r in sel] == list(range(B))
            assert all(r["problem"] == "denoising" and r["input"] == "direct" and r["sigma"] == SIGMA
                       and r["patch_size"] == 3 for r in sel)
            np.testing.assert_allclose([r["psnr_net_lemmse"] for r in sel], np_psnr(out, arrays["mean"]), rtol=1e-5)
            np.testing.assert_allclose([r["psnr_net_x"] for r in sel], np_psnr(out, arrays["x"]), rtol=1e-5)
            np.testing.assert_allclose([r["psnr_lemmse_x"] for r in sel], np_psnr(arrays["mean"], arrays["x"]),
                                       rtol=1e-5)
            mse = ((out.astype(np.float64) - arrays["x"]) ** 2).reshape(B, -1).mean(1)
            np.testing.assert_allclose([r["mse_net_x"] for r in sel], mse, rtol=1e-5)


def test_summary_is_the_mean_per_split_sigma_network(evaluated):
    cfg, data, rows = evaluated
    summary = pq.read_table(f"{cfg.out}/summary.parquet").to_pylist()
    assert len(summary) == 4
    entry = next(r for r in summary if r["split"] == "test" and r["network"] == "resnet")
    expected = np_psnr(data["test"]["z"], data["test"]["mean"]).mean()
    assert entry["psnr_net_lemmse"] == pytest.approx(expected, rel=1e-5)
    text = summary_table(rows)
    assert len(text.splitlines()) == 1 + 4
    assert f"{expected:.2f}" in next(line for line in text.splitlines() if line.startswith("test") and "resnet" in line)


def test_figure_is_labelled_with_one_row_per_estimator_and_the_psnr_under_each_tile(tmp_path, monkeypatch):
    import lemmse_ray.runs.evaluation as evaluation
    from lemmse_ray.runs.report import draw_image_grid

    drawn = {}

    def capture(rows, x, title, max_images=8):
        fig = draw_image_grid(rows, x, title, max_images)
        drawn[title] = fig
        return fig

    monkeypatch.setattr(evaluation, "draw_image_grid", capture)
    cfg = Config(out=str(tmp_path), sigmas=[SIGMA], patch_size=3)
    spec = Denoising().spec()
    data = write_estimates(cfg, spec)
    networks = {("patchmlp", SIGMA): save_network(linear_pixel_mlp(1, [0.0], 0.5), tmp_path / "const.pt", spec)}
    evaluate_all(cfg, networks)
    assert sorted(drawn) == [f"{split} queries: denoising (direct), σ = {SIGMA:g}, P = 3, photos" for split in
                             ("test", "train")]
    for split in ("train", "test"):
        with Image.open(f"{cfg.out}/figures/networks_{split}_sigma{SIGMA:g}.png") as image:
            assert image.format == "PNG" and image.size[0] > 200
        fig = drawn[f"{split} queries: denoising (direct), σ = {SIGMA:g}, P = 3, photos"]
        rows = fig.axes[::B]  # the first tile of each row carries the row's label
        assert [ax.get_ylabel() for ax in rows] == ["input z", "LE-MMSE", "patchmlp (RF 1)", "ground truth x"]
        x, z = data[split]["x"], data[split]["z"]
        expected = np_psnr(z, x)  # the input row's first tile: PSNR(z, x) under it
        assert fig.axes[0].get_xlabel() == f"{expected[0]:.1f} dB"
        assert fig.axes[2 * B].get_xlabel() == f"{np_psnr(np.full_like(x, 0.5), x)[0]:.1f} dB"


def test_mask_is_fed_as_last_channel(tmp_path):
    cfg = Config(out=str(tmp_path), sigmas=[SIGMA], problem="inpainting", input="adjoint")
    spec = Inpainting(keep_prob=0.5, input="adjoint").spec()
    data = write_estimates(cfg, spec, with_mask=True)
    picks_mask = save_network(linear_pixel_mlp(2, [0.0, 1.0], 0.0), tmp_path / "mask.pt", spec, mask_channel=True)
    rows = evaluate_all(cfg, {("patchmlp", SIGMA): picks_mask})
    sel = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["image"])
    np.testing.assert_allclose([r["psnr_net_x"] for r in sel], np_psnr(data["train"]["mask"], data["train"]["x"]),
                               rtol=1e-5)


def test_network_of_another_problem_is_refused(tmp_path):
    cfg = Config(out=str(tmp_path), sigmas=[SIGMA])
    write_estimates(cfg, Denoising().spec())
    other = save_network(identity_resnet(), tmp_path / "n.pt", Denoising(input="tikhonov").spec())
    with pytest.raises(ValueError, match="^networks: .*trained for problem"):
        evaluate_all(cfg, {("resnet", SIGMA): other})


def test_missing_checkpoint_is_named(tmp_path):
    cfg = Config(out=str(tmp_path), sigmas=[SIGMA])
    with pytest.raises(ValueError, match="^path: no network checkpoint"):
        evaluate_all(cfg, {("resnet", SIGMA): str(tmp_path / "absent.pt")})
