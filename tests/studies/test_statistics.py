"""The statistics a referee reads (pooled PSNR, the references, the loss floor's queries) against explicit
float64 loops, and the figures' labels, legends and facets read back from their matplotlib artists."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lemmse_ray as lm
from lemmse_ray.core.metrics import PSNR_CAP, pooled_psnr, psnr_of_mse, psnr_summary
from lemmse_ray.runs.config import Config
from lemmse_ray.studies.analysis import (
    global_mmse,
    psnr_columns,
    translation_equivariant_mmse,
)
from lemmse_ray.studies.engine import floor_queries
from lemmse_ray.studies.figures import draw_bars, draw_lines, draw_problem_grid
from lemmse_ray.studies.report import check_no_pooling, draw
from lemmse_ray.studies.spec import SpecError, apply_overrides, parse_spec

# --- PSNR of the pooled MSE -------------------------------------------------------------------------------------

def test_pooled_psnr_mean_median_and_cap_against_loops():
    mses = [1e-2, 4e-3, 2.5e-2, 0.0, 1e-12]  # an exact copy and a near-copy
    mean_mse = math.fsum(mses) / len(mses)
    pooled = 10 * math.log10(1 / mean_mse)
    per_image = [min(PSNR_CAP, 10 * math.log10(1 / m)) if m > 0 else PSNR_CAP for m in mses]
    sd = math.sqrt(math.fsum((m - mean_mse) ** 2 for m in mses) / (len(mses) - 1))
    summary = psnr_summary(mses)
    assert summary["psnr"] == pytest.approx(pooled, rel=1e-12) and pooled_psnr(mses) == pytest.approx(pooled)
    assert summary["mean"] == pytest.approx(math.fsum(per_image) / len(mses), rel=1e-12)
    assert summary["median"] == pytest.approx(sorted(per_image)[2], rel=1e-12)
    assert summary["se"] == pytest.approx(10 / math.log(10) * sd / math.sqrt(len(mses)) / mean_mse, rel=1e-12)
    assert summary["capped"] == 2 and summary["n"] == 5
    assert summary["mean"] > summary["psnr"] + 20  # the mean of logs is dominated by the copies; the pooled is not
    assert np.isfinite(psnr_of_mse([0.0, 1.0])).all() and psnr_of_mse(0.0) == PSNR_CAP
    with pytest.raises(ValueError, match="values"):
        psnr_of_mse([-1.0])
    rows = [{"mse_lemmse_x": m} for m in mses] + [{"mse_lemmse_x": None}]
    columns = psnr_columns(rows, "psnr_lemmse_x")
    assert columns["psnr_lemmse_x"] == pytest.approx(pooled) and columns["mse_lemmse_x"] == pytest.approx(mean_mse)
    assert columns["psnr_lemmse_x_hi"] - columns["psnr_lemmse_x"] == pytest.approx(summary["se"])


# --- the paper's other estimators -----------------------------------------------------------------------------

def shift(image, dr, dc):
    """(T_s x)[k] = x[k − s], indices mod (H, W), written out."""
    height, width = image.shape[1:]
    out = np.empty_like(image)
    for r in range(height):
        for c in range(width):
            out[:, r, c] = image[:, (r - dr) % height, (c - dc) % width]
    return out


def softmax_average(candidates, query, sigma):
    logits = [-math.fsum(((query - cand) ** 2).ravel()) / (2 * sigma ** 2) for cand in candidates]
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = math.fsum(weights)
    return sum(w / total * cand for w, cand in zip(weights, candidates))


def test_global_and_translation_equivariant_mmse_against_loops_and_the_estimator():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(4, 2, 5, 5, generator=g, dtype=torch.float64)
    z = train[:2] + 0.3 * torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)
    x, q = train.numpy(), z.numpy()
    shifts = [shift(x[i], dr, dc) for i in range(4) for dr in range(5) for dc in range(5)]
    te = translation_equivariant_mmse(train, z, 0.3)
    glob = global_mmse(train, z, 0.3)
    for b in range(2):
        np.testing.assert_allclose(te[b], softmax_average(shifts, q[b], 0.3), rtol=0, atol=1e-12)
        np.testing.assert_allclose(glob[b], softmax_average(list(x), q[b], 0.3), rtol=0, atol=1e-12)
    # the same estimators as configurations of the LE-MMSE: P = H under circular padding, P = 2H − 1 under zeros
    circular = lm.estimate(train, z, lm.Denoising(), 0.3, patch_size=5, padding="circular", dtype=torch.float64)
    zeros = lm.estimate(train, z, lm.Denoising(), 0.3, patch_size=9, padding="zeros", dtype=torch.float64)
    np.testing.assert_allclose(te, circular.mean.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(glob, zeros.mean.numpy(), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="sigma"):
        global_mmse(train, z, 0.0)
    with pytest.raises(ValueError, match="train_images"):
        translation_equivariant_mmse(train[:, :1], z, 0.3)


def test_floor_queries_are_iid_training_images_with_fresh_noise():
    cfg = Config(dataset="digits", n_train=20, sigmas=[0.1], seed=3)
    train = torch.rand(20, 1, 4, 4, dtype=torch.float64)
    x, _, z, _ = floor_queries(cfg, train, lm.Denoising(), 64)
    assert len(x) == 64 > len(train)  # drawn with replacement: any count serves any N
    rows = [int(np.flatnonzero([torch.equal(x[b], t) for t in train])[0]) for b in range(64)]
    assert len(set(rows)) > 10
    again = floor_queries(cfg, train, lm.Denoising(), 64)
    assert torch.equal(again[2], z)  # seeded
    from lemmse_ray.runs.pipeline import simulate
    _, train_z, _ = simulate(cfg, lm.Denoising(), x[:8], "train", 0)
    assert not torch.allclose(train_z - x[:8].double(), z[:8] - x[:8].double())  # not the train split's noise


# --- spec keys ------------------------------------------------------------------------------------------------

def test_floor_images_and_references_are_checked_and_set():
    _, parts = parse_spec({"name": "s", "floor_images": 300, "references": True, "base": {"dataset": "digits"}})
    assert parts[0].floor_images == 300 and parts[0].references
    assert parts[0].floor_count(Config(dataset="digits", networks=[])) == 300
    _, default = parse_spec({"name": "s", "base": {"dataset": "digits"}})
    assert default[0].floor_count(Config(dataset="digits", networks=["patchmlp"])) == 256
    assert default[0].floor_count(Config(dataset="digits", networks=[])) == 0
    assert apply_overrides(default, {"floor_images": 16})[0].floor_images == 16
    for bad, message in (({"floor_images": -1}, "floor_images"), ({"floor_images": True}, "floor_images"),
                         ({"references": "yes"}, "references")):
        with pytest.raises(SpecError, match=message):
            parse_spec({"name": "s", **bad})
    with pytest.raises(SpecError, match="floor_images"):
        apply_overrides(default, {"floor_images": 2.5})


# --- figures: labels, legends, facets -------------------------------------------------------------------------

def texts(fig):
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def legend_labels(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_lines_share_a_colour_per_network_with_a_style_per_split_and_a_panel_per_facet():
    rows = [{"step": s, "net": n, "split": sp, "data": d, "psnr": 20 + s / 100 + (sp == "test"), "se": 0.5,
             "ref": 40.0 + (sp == "test")}
            for s in (100, 200) for n in ("patchmlp", "unet") for sp in ("train", "test") for d in ("A", "B")]
    fig = draw_lines(rows, "step", "psnr", "Agreement", "steps", "dB", hue="net", style="split", error="se",
                     facet="data", hline=25, hline_label="the paper's level (25)", references={"ref": "global MMSE"})
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["data = A", "data = B"]
    assert axes[0].get_xlabel() == "steps" and fig.axes[0].get_ylabel() == "dB"
    lines = {line.get_label(): line for line in axes[0].get_lines() if not line.get_label().startswith("_")}
    assert lines["patchmlp, train"].get_color() == lines["patchmlp, test"].get_color()
    assert lines["patchmlp, train"].get_linestyle() != lines["patchmlp, test"].get_linestyle()
    assert lines["patchmlp, train"].get_color() != lines["unet, train"].get_color()
    assert any(line.get_ydata()[0] == 25 for line in axes[1].get_lines())  # the reference level on every panel
    labels = legend_labels(fig)
    assert "the paper's level (25)" in labels and "global MMSE, train" in labels and "unet, test" in labels
    assert len(axes[0].collections) >= 4  # error bars per curve
    only_a = [r for r in rows if r["data"] == "A" or r["net"] == "patchmlp"]  # unet drawn in panel A only
    fig = draw_lines(only_a, "step", "psnr", "t", "steps", "dB", hue="net", style="split", facet="data")
    assert "unet, test" in legend_labels(fig)  # the legend lists the curves of every panel


def test_bars_have_error_bars_a_reference_level_and_facets():
    rows = [{"setting": s, "network": n, "split": sp, "sigma": sig, "v": 24.0 + i, "se": 0.3}
            for i, (s, n, sp, sig) in enumerate((s, n, sp, sig) for s in ("denoising", "deblurring")
                                                for n in ("patchmlp",) for sp in ("train", "test") for sig in (0.1, 0.2))]
    fig = draw_bars(rows, "setting", "v", ["network", "split"], "t", "dB", error="se", facet="sigma", hline=25,
                    hline_label="paper")
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["sigma = 0.1", "sigma = 0.2"]
    assert "paper" in legend_labels(fig) and "patchmlp, test" in legend_labels(fig)
    assert all(any(len(c.get_segments()) for c in ax.collections) for ax in axes)  # error bars drawn
    bars = {b.get_label(): b for b in axes[0].containers}
    assert bars["patchmlp, train"].patches[0].get_facecolor() == bars["patchmlp, test"].patches[0].get_facecolor()
    assert bars["patchmlp, test"].patches[0].get_hatch() and not bars["patchmlp, train"].patches[0].get_hatch()
    # a setting run at σ = 0.1 only takes no slot in the σ = 0.2 panel
    one_sigma = [r for r in rows if r["setting"] == "denoising" or r["sigma"] == 0.1]
    fig = draw_bars(one_sigma, "setting", "v", ["network", "split"], "t", "dB", error="se", facet="sigma")
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["denoising", "deblurring"]
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["denoising"]
    assert {round(b.get_x() + b.get_width() / 2) for c in axes[1].containers if hasattr(c, "patches")
            for b in c.patches} == {0}


def test_problem_grid_labels_rows_columns_and_psnr():
    x = np.full((1, 4, 4), 0.5)
    rows = [("denoising, σ = 0.1", {"input z": x + 0.1, "LE-MMSE": x + 0.01}, x),
            ("deblurring, σ = 0.1", {"input z": x + 0.2, "LE-MMSE": x, "patchmlp": x + 0.1}, x)]
    fig = draw_problem_grid(rows, "Figure 1")
    found = texts(fig)
    for label in ("input z", "LE-MMSE", "patchmlp", "ground truth x", "denoising, σ = 0.1", "deblurring, σ = 0.1",
                  "20.0 dB", "40.0 dB", f"{PSNR_CAP:.1f} dB"):
        assert label in found, label
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        draw_problem_grid([("a", {"z": x[:, :2]}, x)], "t")


# --- the report: datasets never averaged, σ never pooled ------------------------------------------------------

def two_dataset_rows():
    return [{"part": "p", "cell": i, "network": "none", "split": sp, "sigma": 0.1, "patch_size": p,
             "dataset": d, "size": None, "grayscale": None, "data": d, "psnr_lemmse_x": 20.0 + p + 10 * (d == "faces")}
            for i, (d, p) in enumerate((d, p) for d in ("digits", "faces") for p in (3, 5)) for sp in ("train", "test")]


def test_a_two_dataset_spec_is_faceted_by_dataset(monkeypatch):
    from lemmse_ray.studies import report

    captured = {}
    monkeypatch.setattr(report, "line_figure", lambda rows, *a, **k: captured.update(rows=rows, **k) or b"png")
    figure = {"kind": "line", "file": "f", "x": "patch_size", "y": "psnr_lemmse_x", "style": "split",
              "title": "t", "xlabel": "P", "ylabel": "dB"}
    assert draw(figure, {"cells": two_dataset_rows()}, ["patch_size", "dataset"]) == b"png"
    assert captured["facet"] == "data"
    means = {(r["data"], r["patch_size"], r["split"]): r["psnr_lemmse_x"] for r in captured["rows"]}
    assert means[("digits", 3, "train")] == 23.0 and means[("faces", 3, "train")] == 33.0  # never averaged
    fig = draw_lines(captured["rows"], "patch_size", "psnr_lemmse_x", "t", "P", "dB", style="split", facet="data")
    assert sorted(ax.get_title() for ax in fig.axes if ax.get_title()) == ["data = digits", "data = faces"]


def test_a_figure_that_would_average_over_a_varying_field_is_refused():
    rows = [{"sigma": s, "network": "none", "split": "test", "x": 1.0, "y": s} for s in (0.05, 0.2)]
    with pytest.raises(ValueError, match="sigma"):
        check_no_pooling(rows, ["network", "split"], ["sigma"], "the figure")
    check_no_pooling(rows, ["network", "split", "sigma"], ["sigma"], "the figure")
    check_no_pooling(rows + rows, ["sigma", "split"], ["sigma"], "the figure")  # identical rows may be merged
