"""Figures (lemmse_ray.studies.figures): valid PNGs of a sane size, local and fsspec targets, bad input refused."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lemmse_ray.studies.figures import bar_figure, binned_figure, ess_map_figure, image_grid_figure, line_figure
from lemmse_ray.storage.files import read_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    image = Image.open(io.BytesIO(data))
    image.verify()
    width, height = image.size
    assert 200 <= width <= 1600 and 150 <= height <= 1200, image.size
    assert len(data) < 400_000
    return width, height


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 8, 8))
    return x, x + 0.1 * rng.standard_normal(x.shape), x + 0.02 * rng.standard_normal(x.shape)


def sweep_rows():
    return [{"sigma": s, "split": split, "network": "LE-MMSE", "ess_median": 1 + 100 * s * (1 + (split == "test")),
             "ess_q25": 1 + 50 * s, "ess_q75": 1 + 200 * s} for s in (0.01, 0.03, 0.1, 0.3, 1.0)
            for split in ("train", "test")]


def test_image_grid_figure(tmp_path, images):
    x, z, mean = images
    path = tmp_path / "figures" / "grid.png"
    image_grid_figure({"input z": z, "LE-MMSE": mean}, x, str(path), "Denoising, σ = 0.1", max_images=4)
    check_png(path.read_bytes())
    with pytest.raises(ValueError, match="rows\\['LE-MMSE'\\]"):
        image_grid_figure({"LE-MMSE": mean[:, :, :4]}, x, str(path), "t")
    with pytest.raises(ValueError, match="rows"):
        image_grid_figure({}, x, str(path), "t")
    with pytest.raises(ValueError, match="x"):
        image_grid_figure({"z": z}, x[0], str(path), "t")
    with pytest.raises(ValueError, match="path"):
        image_grid_figure({"z": z}, x, "", "t")
    with pytest.raises(ValueError, match="NaN"):
        image_grid_figure({"z": np.full_like(z, np.nan)}, x, str(path), "t")


def test_figures_write_to_fsspec_urls(images):
    x, z, mean = images
    url = "memory://lemmse-figures/grid.png"
    image_grid_figure({"input z": z, "LE-MMSE": mean}, x, url, "Denoising, σ = 0.1")
    check_png(read_bytes(url))


def test_ess_map_figure(tmp_path, images):
    x, z, _ = images
    ess = np.exp(np.random.default_rng(1).random((6, 8, 8)) * 6)
    path = tmp_path / "ess.png"
    ess_map_figure(z, ess, str(path), "ESS, denoising σ = 0.1")
    check_png(path.read_bytes())
    with pytest.raises(ValueError, match="ess must have shape"):
        ess_map_figure(z, ess[:, :4], str(path), "t")
    with pytest.raises(ValueError, match="ess values"):
        ess_map_figure(z, ess * 0, str(path), "t")
    with pytest.raises(ValueError, match="max_images"):
        ess_map_figure(z, ess, str(path), "t", max_images=0)


def test_line_figure(tmp_path):
    path = tmp_path / "line.png"
    line_figure(sweep_rows(), "sigma", "ess_median", str(path), "ESS against σ", "noise level σ", "ESS (patches)",
                hue="network", style="split", logx=True, logy=True, band=("ess_q25", "ess_q75"))
    check_png(path.read_bytes())
    line_figure(sweep_rows(), "sigma", "ess_median", str(path), "ESS against σ", "σ", "ESS")  # one curve, linear
    check_png(path.read_bytes())
    with pytest.raises(ValueError, match="y: column 'missing'"):
        line_figure(sweep_rows(), "sigma", "missing", str(path), "t", "σ", "y")
    with pytest.raises(ValueError, match="logx"):
        line_figure([{"s": 0.0, "v": 1.0}], "s", "v", str(path), "t", "σ", "v", logx=True)
    with pytest.raises(ValueError, match="must hold numbers"):
        line_figure([{"s": "a", "v": 1.0}], "s", "v", str(path), "t", "σ", "v")
    with pytest.raises(ValueError, match="xlabel"):
        line_figure(sweep_rows(), "sigma", "ess_median", str(path), "t", "", "v")
    with pytest.raises(ValueError, match="band"):
        line_figure(sweep_rows(), "sigma", "ess_median", str(path), "t", "σ", "v", band=("ess_q25",))
    with pytest.raises(ValueError, match="rows"):
        line_figure([], "sigma", "ess_median", str(path), "t", "σ", "v")


def test_bar_figure(tmp_path):
    rows = [{"problem": p, "network": n, "split": s, "psnr": 25.0 + i}
            for i, (p, n, s) in enumerate((p, n, s) for p in ("denoising", "inpainting aware")
                                          for n in ("PatchMLP", "U-Net") for s in ("train", "test"))]
    path = tmp_path / "bar.png"
    bar_figure(rows, "problem", "psnr", ("network", "split"), str(path), "PSNR(net, LE-MMSE)", "PSNR (dB)")
    check_png(path.read_bytes())
    with pytest.raises(ValueError, match="two rows"):
        bar_figure(rows + rows[:1], "problem", "psnr", ("network", "split"), str(path), "t", "dB")
    with pytest.raises(ValueError, match="hue"):
        bar_figure(rows, "problem", "psnr", (), str(path), "t", "dB")
    with pytest.raises(ValueError, match="value: column 'nope'"):
        bar_figure(rows, "problem", "nope", "network", str(path), "t", "dB")


def test_binned_figure(tmp_path):
    rows = [{"metric": m, "network": n, "bin": b, "lo": b / 4, "hi": (b + 1) / 4, "pixels": 10,
             "mean": scale * (b + 1), "se": scale * 0.1} for m, n, scale in
            (("mse_lemmse_x", None, 1e-2), ("mse_net_lemmse", "unet", 1e-4)) for b in range(4)]
    rows.append({**rows[0], "bin": 4, "lo": 1.0, "hi": 1.0, "pixels": 0, "mean": float("nan"), "se": float("nan")})
    path = tmp_path / "binned.png"
    binned_figure(rows, str(path), "Error against within-class evidence")
    check_png(path.read_bytes())
    with pytest.raises(ValueError, match="unknown metric"):
        binned_figure([{**rows[0], "metric": "psnr"}], str(path), "t")
    with pytest.raises(ValueError, match="every bin is empty"):
        binned_figure([rows[-1]], str(path), "t")
