"""Built-in study presets: the experiments of the paper, each at two sizes.

* ``quick`` -- the embedded ``digits`` (8×8) and ``faces`` (25×25) data, small banks, few query images and
  short training: each preset finishes in minutes on a 2-core CPU machine (the README shows its figures);
* ``full`` -- the paper's datasets (Fashion-MNIST, CIFAR-10, FFHQ-32: ``--root NAME=PATH`` tells where each
  one's files are), full training sets and longer training, for a cluster.

:func:`preset` returns a spec mapping (:mod:`lemmse_ray.studies.spec`); ``paper`` holds every other preset as parts.
Each part declares its key figures (:mod:`lemmse_ray.studies.report`).
"""
from __future__ import annotations

import copy
from typing import Any

SIZES = ("quick", "full")
FULL_DATASETS = ["fashion-mnist", "cifar10", "ffhq32"]
NETWORKS = ["patchmlp", "resnet", "unet"]
SIGMA_SWEEP = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]  # log-spaced, ~0.01–1

# the problem × input settings of the paper's main table
SETTINGS = {"problem": ["denoising", "inpainting", "inpainting", "deblurring", "deblurring"],
            "input": ["direct", "direct", "adjoint", "direct", "tikhonov"]}
AWARE_AGNOSTIC = {"problem": ["inpainting", "inpainting", "deblurring", "deblurring"],
                  "input": ["direct", "adjoint", "direct", "tikhonov"]}

QUICK_BASE = {"dataset": "digits", "n_train": 1000, "n_queries": 8, "patch_size": 5, "sigmas": [0.1],
              "networks": [], "hidden": 96, "width": 24, "epochs": 2, "steps_per_epoch": 200, "batch_size": 32,
              "lr": 3e-3, "batch_images": 8, "shard_rows": 1 << 15}
FULL_BASE = {"n_train": None, "n_queries": 64, "patch_size": 5, "sigmas": [0.1], "networks": [], "hidden": 256,
             "width": 64, "epochs": 20, "steps_per_epoch": 1000, "batch_size": 64, "lr": 1e-3,
             "batch_images": 8, "shard_rows": 1 << 18}


def _line(file: str, y: str, x: str, title: str, xlabel: str, ylabel: str, caption: str, **kw: Any) -> dict:
    return {"kind": "line", "file": file, "x": x, "y": y, "title": title, "xlabel": xlabel, "ylabel": ylabel,
            "caption": caption, **kw}


def _agreement(size: str) -> dict:
    grid = {"networks": [[n] for n in NETWORKS]}
    if size == "full":
        grid["dataset"] = FULL_DATASETS
    return {
        "name": "agreement",
        "description": "The paper's main table: each network, trained on the same data, problem and σ with "
                       "receptive field P, against the exact LE-MMSE on the same inputs.",
        "base": {"sigmas": [0.2]}, "grid": grid, "zip": copy.deepcopy(SETTINGS),
        "figures": [{"kind": "bar", "file": "psnr_net_lemmse", "category": "setting", "value": "psnr_net_lemmse",
                     "hue": ["network", "split"], "where": {"network": NETWORKS},
                     "title": "Networks against the LE-MMSE (σ = 0.2, receptive field P = 5)",
                     "ylabel": "PSNR(network, LE-MMSE) [dB]", "xlabel": "problem (input)",
                     "caption": "PSNR between each trained network and the exact LE-MMSE on train and test "
                                "queries, per problem and input mode: higher means the network computes "
                                "nearly the same function."}],
    }


def _concentration(size: str) -> dict:
    grid = {"sigmas": SIGMA_SWEEP}
    if size == "full":
        grid["dataset"] = FULL_DATASETS
    band = {"logx": True, "style": "split", "where": {"network": "none"}}
    return {
        "name": "concentration",
        "description": "Denoising σ sweep without networks: how many training patches carry the weights, "
                       "and how often the top patch is the query's own.",
        "base": {"problem": "denoising", "networks": []}, "grid": grid,
        "figures": [
            _line("ess", "ess_median", "sigma", "Effective number of training patches vs noise level",
                  "noise level σ", "median ESS per pixel (patches)",
                  "Median (band: quartiles) effective number of training patches per query pixel: the weights "
                  "collapse onto a few patches at low σ, for train and test queries alike.",
                  band=["ess_q25", "ess_q75"], logy=True, **band),
            _line("copy", "copy_rate", "sigma", "Copying vs noise level", "noise level σ",
                  "fraction of pixels whose top patch is the own patch",
                  "Fraction of query pixels whose most-weighted bank patch equals the query's own noiseless "
                  "patch: train queries are copied at low σ; test queries only where their patch occurs "
                  "verbatim in the training set.", **band),
            _line("max_weight", "max_weight_median", "sigma", "Largest weight vs noise level", "noise level σ",
                  "median max weight", "Median largest posterior weight per pixel.",
                  band=["max_weight_q25", "max_weight_q75"], **band),
        ],
    }


def _aware_vs_agnostic(size: str) -> dict:
    grid = {"sigmas": [0.02, 0.05, 0.1, 0.2, 0.5]}
    if size == "full":
        grid["dataset"] = FULL_DATASETS
    where = {"network": "none", "split": "test"}
    return {
        "name": "aware-vs-agnostic",
        "description": "Inpainting (random masks) and deblurring with a physics-aware input (adjoint / "
                       "Tikhonov) and a physics-agnostic one (direct), over σ; no networks.",
        "base": {"networks": []}, "grid": grid, "zip": copy.deepcopy(AWARE_AGNOSTIC),
        "figures": [
            _line("psnr", "psnr_lemmse_x", "sigma", "LE-MMSE quality, physics-aware vs agnostic (test queries)",
                  "noise level σ", "PSNR(LE-MMSE, x) [dB]",
                  "PSNR of the LE-MMSE against the ground truth on test queries, per problem and input mode.",
                  hue="setting", logx=True, where=where),
            _line("ess", "ess_median", "sigma", "Concentration, physics-aware vs agnostic (test queries)",
                  "noise level σ", "median ESS per pixel (patches)",
                  "Median effective number of training patches per pixel, per problem and input mode.",
                  hue="setting", logx=True, logy=True, where=where),
        ],
    }


def _dataset_size(size: str) -> dict:
    grid = {"n_train": [25, 50, 100, 200, 400, 800, 1437] if size == "quick" else [500, 2000, 8000, 32000]}
    if size == "full":
        grid["dataset"] = FULL_DATASETS
    return {
        "name": "dataset-size",
        "description": "Nested seeded random training subsets of growing N (denoising): the train–test gap of "
                       "the LE-MMSE, copying, and a PatchMLP's agreement with it.",
        "base": {"problem": "denoising", "networks": ["patchmlp"]}, "grid": grid,
        "figures": [
            _line("gap", "psnr_lemmse_x", "n_train", "LE-MMSE train vs test quality vs training-set size",
                  "training images N", "PSNR(LE-MMSE, x) [dB]",
                  "PSNR of the LE-MMSE on train queries (solid) and test queries (dashed) as N grows: the gap "
                  "is the memorisation of the training set.", style="split", logx=True,
                  where={"network": "none"}),
            _line("copy", "copy_rate", "n_train", "Copying vs training-set size", "training images N",
                  "fraction of pixels copied", "Fraction of query pixels whose top patch is their own noiseless "
                  "patch, train vs test.", style="split", logx=True, where={"network": "none"}),
            _line("agreement", "psnr_net_lemmse", "n_train", "PatchMLP against the LE-MMSE vs training-set size",
                  "training images N", "PSNR(PatchMLP, LE-MMSE) [dB]",
                  "Agreement of a PatchMLP (receptive field P) with the LE-MMSE, train vs test queries.",
                  style="split", logx=True, where={"network": "patchmlp"}),
        ],
    }


def _patch_size(size: str) -> dict:
    grid = {"patch_size": [3, 5, 7, 9, 11]}
    base = {"dataset": "faces", "n_train": 80, "n_queries": 4, "problem": "denoising", "sigmas": [0.1],
            "networks": ["patchmlp", "resnet", "unet"], "batch_images": 4, "steps_per_epoch": 100,
            "batch_size": 16}
    if size == "full":
        grid = {"patch_size": [3, 5, 7, 9, 11, 15], "dataset": FULL_DATASETS}
        base = {"problem": "denoising", "sigmas": [0.1], "networks": NETWORKS}
    return {
        "name": "patch-size",
        "description": "Receptive-field sweep (denoising): the LE-MMSE at P and each network built with "
                       "receptive field exactly P.",
        "base": base, "grid": grid,
        "figures": [
            _line("psnr", "psnr_lemmse_x", "patch_size", "LE-MMSE quality vs patch size", "patch size P (pixels)",
                  "PSNR(LE-MMSE, x) [dB]", "PSNR of the LE-MMSE against x: train queries (solid) gain from "
                  "larger P by memorisation, test queries (dashed) do not.", style="split",
                  where={"network": "none"}),
            _line("agreement", "psnr_net_lemmse", "patch_size", "Networks against the LE-MMSE vs patch size",
                  "patch size P = receptive field (pixels)", "PSNR(network, LE-MMSE) [dB]",
                  "Agreement of each network (receptive field = P) with the LE-MMSE at P, train (solid) and "
                  "test (dashed) queries.", hue="network", style="split", where={"network": NETWORKS}),
        ],
    }


def _density(size: str) -> dict:
    grid = {"sigmas": [0.05, 0.2]}
    if size == "full":
        grid["dataset"] = FULL_DATASETS
    return {
        "name": "density",
        "description": "Errors against how typical the query patch is: the within-class percentile of its "
                       "log-evidence under the empirical patch distribution (denoising, test and train queries).",
        "base": {"problem": "denoising", "networks": ["patchmlp"]}, "grid": grid,
        "figures": [{"kind": "binned", "file": "binned", "where": {"split": "test"},
                     "title": "Errors vs within-class evidence percentile (test queries)",
                     "caption": "Mean per-pixel error of the LE-MMSE against x and of the PatchMLP against the "
                                "LE-MMSE, in ten bins of the query patch's log-evidence percentile within its "
                                "class (averaged over σ): high-density patches are denoised better and "
                                "matched more closely."}],
    }


BUILDERS = {"agreement": _agreement, "concentration": _concentration, "aware-vs-agnostic": _aware_vs_agnostic,
            "dataset-size": _dataset_size, "patch-size": _patch_size, "density": _density}
PRESETS = (*BUILDERS, "paper")


def preset(name: str, size: str = "quick") -> dict:
    """The spec mapping of preset ``name`` at ``size`` (``quick`` or ``full``)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if name not in PRESETS:
        raise ValueError(f"SPEC: no preset {name!r} (presets: {', '.join(PRESETS)}) and no such file")
    base = QUICK_BASE if size == "quick" else FULL_BASE
    names = list(BUILDERS) if name == "paper" else [name]
    parts = []
    for part_name in names:
        part = BUILDERS[part_name](size)
        part["base"] = {**base, **part["base"]}
        parts.append(part)
    if name != "paper":
        return parts[0]
    return {"name": "paper", "description": "Every experiment of the paper.", "parts": parts}
