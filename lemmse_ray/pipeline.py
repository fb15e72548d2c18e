"""The steps of a run, as library functions the jobs and the ``lemmse`` command call.

``load_data`` → ``make_problem`` → ``bank_step`` (Ray tasks) → ``estimate_step`` (Ray actors, one output
group per split and σ, holding the fixed seeded inputs ``z``, masks and clean images) → ``report_step``
(PNG grids and a Parquet table of PSNRs).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from .config import Config, join
from .datasets import load_dataset
from .distributed import DTYPES, build_bank, estimate_on_ray
from .metrics import psnr
from .problems import Deblurring, Denoising, Inpainting, Problem, gaussian_kernel
from .report import group_means, image_grid, save_parquet, save_png, save_text
from .store import Bank, open_group

log = logging.getLogger("lemmse_ray")

SPLITS = ("train", "test")


def load_data(cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training images and the query images of each split (the first ``n_queries`` of it)."""
    kwargs = dict(root=cfg.root, size=cfg.size, grayscale=cfg.grayscale)
    train = load_dataset(cfg.dataset, "train", n=cfg.n_train, **kwargs)
    queries = {"train": train[: cfg.n_queries],
               "test": load_dataset(cfg.dataset, "test", **kwargs)[: cfg.n_queries]}
    return train, queries


def make_problem(cfg: Config, shape: tuple[int, int, int]) -> Problem:
    """The configured problem for images of ``shape`` (C, H, W)."""
    if cfg.problem == "denoising":
        return Denoising(input=cfg.input, reg=cfg.reg)
    if cfg.problem == "inpainting":
        if cfg.mask == "random":
            return Inpainting(keep_prob=cfg.keep_prob, input=cfg.input, reg=cfg.reg)
        if cfg.mask == "fixed":
            generator = torch.Generator().manual_seed(cfg.seed)
            mask = (torch.rand(shape[1:], generator=generator, dtype=torch.float64) < cfg.keep_prob).double()
            return Inpainting(mask=mask, input=cfg.input, reg=cfg.reg)
        raise ValueError(f"mask must be 'random' or 'fixed', got {cfg.mask!r}")
    if cfg.problem == "deblurring":
        return Deblurring(gaussian_kernel(cfg.blur_size, cfg.blur_std), input=cfg.input, reg=cfg.reg,
                          threshold=cfg.threshold)
    raise ValueError(f"problem must be denoising, inpainting or deblurring, got {cfg.problem!r}")


def query_seed(cfg: Config, split: str, sigma_index: int) -> int:
    """Seed of the one fixed noise (and mask) draw of a split at a noise level."""
    return cfg.seed * 1_000_003 + SPLITS.index(split) * 1009 + sigma_index


def simulate(cfg: Config, problem: Problem, images: torch.Tensor, split: str, sigma_index: int):
    """``(y, z, mask)`` for query images, from the seeded generator of (split, σ)."""
    generator = torch.Generator().manual_seed(query_seed(cfg, split, sigma_index))
    return problem.measure(images.to(torch.float64), cfg.sigmas[sigma_index], generator)


def estimate_url(cfg: Config, split: str, sigma: float) -> str:
    return join(cfg.out, "estimates", f"{split}_sigma{sigma:g}.zarr")


def bank_step(cfg: Config, train: torch.Tensor, problem: Problem) -> Bank:
    return build_bank(cfg.bank_url, train, problem, cfg.patch_size, cfg.padding, cfg.candidates, cfg.shard_rows,
                      DTYPES[cfg.dtype], cfg.storage_options, cfg.overwrite)


def estimate_step(cfg: Config, bank: Bank, problem: Problem, queries: dict[str, torch.Tensor]) -> dict:
    """Estimate every split × σ through the Ray actors (started at most once); returns {(split, σ): url}."""
    actors: list = []  # started by the first output with work left, then shared
    urls = {}
    for split, images in queries.items():
        for index, sigma in enumerate(cfg.sigmas):
            _, z, mask = simulate(cfg, problem, images, split, index)
            url = estimate_url(cfg, split, sigma)
            estimate_on_ray(bank, z, sigma, url, mask=mask if problem.random_mask else None, x=images,
                            batch_images=cfg.batch_images, actors=actors, n_actors=cfg.n_actors,
                            stats=tuple(cfg.stats), topk=cfg.topk, dtype=DTYPES[cfg.dtype],
                            storage_options=cfg.storage_options,
                            metadata={"split": split, "seed": query_seed(cfg, split, index),
                                      "dataset": cfg.dataset, "config": dataclasses.asdict(cfg)},
                            overwrite=cfg.overwrite)
            urls[(split, sigma)] = url
    return urls


def report_step(cfg: Config, urls: dict, n_show: int = 8) -> list[dict]:
    """PSNR table (Parquet) and figures (PNG: input z / LE-MMSE / ground truth) from the estimate outputs."""
    rows = []
    for (split, sigma), url in urls.items():
        group = open_group(url, "r", cfg.storage_options)
        z, mean, x = (torch.from_numpy(group[name][...]) for name in ("z", "mean", "x"))
        for i, (p_est, p_in) in enumerate(zip(psnr(mean, x).tolist(), psnr(z, x).tolist())):
            rows.append({"split": split, "sigma": sigma, "image": i, "problem": cfg.problem, "input": cfg.input,
                         "patch_size": cfg.patch_size, "psnr_lemmse_x": p_est, "psnr_z_x": p_in})
        save_png(image_grid([z[:n_show], mean[:n_show], x[:n_show]]),
                 join(cfg.out, "figures", f"{split}_sigma{sigma:g}.png"), cfg.storage_options)
    save_parquet(rows, join(cfg.out, "psnr.parquet"), cfg.storage_options)
    return rows


def summarize(rows: list[dict]) -> str:
    """A plain-text table of mean PSNRs per split and σ."""
    lines = [f"{'split':<6} {'sigma':>6} {'PSNR(LE-MMSE, x)':>17} {'PSNR(z, x)':>11}"]
    for r in group_means(rows, ("split", "sigma"), ("psnr_lemmse_x", "psnr_z_x")):
        lines.append(f"{r['split']:<6} {r['sigma']:>6g} {r['psnr_lemmse_x']:>17.2f} {r['psnr_z_x']:>11.2f}")
    return "\n".join(lines)


def write_report(cfg: Config, tables: dict[str, str], seconds: dict[str, float]) -> str:
    """``<out>/report.md``: the configuration, the PSNR tables and the wall time of each step."""
    times = ", ".join(f"{step} {value:.0f} s" for step, value in seconds.items())
    text = "\n".join([
        "# lemmse_ray report", "",
        f"Dataset `{cfg.dataset}` ({cfg.n_train or 'all'} training images), problem `{cfg.problem}` "
        f"(input `{cfg.input}`), σ = {', '.join(f'{s:g}' for s in cfg.sigmas)}, patch size {cfg.patch_size}, "
        f"padding `{cfg.padding}`, candidates `{cfg.candidates}`, {cfg.n_queries} query images per split; "
        f"networks {', '.join(cfg.networks)} ({cfg.epochs} epochs × {cfg.steps_per_epoch} steps, "
        f"batch {cfg.batch_size}, lr {cfg.lr:g}).", "",
        "## LE-MMSE against the ground truth (dB, mean over query images)", "",
        "```", tables.get("estimate", "(not run)"), "```", "",
        "## Networks against the LE-MMSE and the ground truth (dB, mean over query images)", "",
        "```", tables.get("evaluate", "(not run)"), "```", "",
        f"Wall time: {times}.", "",
        "Files: `estimates/*.zarr` (inputs, LE-MMSE mean and statistics), `psnr.parquet`, "
        "`evaluation.parquet`, `summary.parquet`, `networks/*/checkpoint.pt`, `figures/*.png`.", ""])
    save_text(text, join(cfg.out, "report.md"), cfg.storage_options)
    return text

