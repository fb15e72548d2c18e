"""The steps of a run, as library functions the jobs and the ``lemmse`` command call.

``load_data`` → ``make_problem`` → ``bank_step`` (Ray tasks) → ``estimate_step`` (Ray actors, one output
group per split and σ, holding the fixed seeded inputs ``z``, masks and clean images) → ``report_step``
(PNG grids and a Parquet table of PSNRs).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import torch

from ..cluster.build import build_bank, repair_bank
from ..cluster.actors import calibrate_actors
from ..cluster.driver import EstimateRequest, estimate_outputs
from ..bank.features import query_bytes
from ..bank.rows import class_centers
from ..cluster.plan import Plan, make_plan, predict
from ..cluster.session import default_n_actors
from ..kernels.resolver import image_class, resolve
from ..core.classes import plan_classes
from ..core.metrics import psnr
from ..core.patches import PatchGeometry
from ..core.problems import Deblurring, Denoising, Inpainting, Problem, gaussian_kernel
from ..core.validation import DTYPES, available_memory
from ..data.loaders import SPLITS, load_dataset, query_indices, subset_indices
from ..storage.bank_store import MEMBERS as BANK_MEMBERS
from ..storage.bank_store import Bank, open_group, verify_bank
from ..storage.files import read_bytes, save_json, save_parquet, save_text, write_bytes
from ..storage.ownership import check_apart, check_output_folder, owned_group
from ..storage.results import MEMBERS as RESULT_MEMBERS
from ..storage.results import EstimateArrays
from .config import Config, join
from .report import draw_image_grid, group_means, png_bytes

log = logging.getLogger("lemmse_ray")


def load_data(cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training images and the query images of each split.

    Training images: ``n_train`` of the split, a seeded random subset (``subset="random"``: the first
    ``n_train`` of a seeded permutation, so smaller subsets are prefixes of larger ones) or the first ones.
    Train queries are the first ``n_queries`` training images (bank images ``0 … n_queries − 1``, the same
    images for every ``n_train`` of a seed); test queries are seeded random test images.
    """
    def train_ids(total: int) -> torch.Tensor:
        n_train = total if cfg.n_train is None else cfg.n_train
        if n_train > total:
            raise ValueError(f"n_train={n_train} exceeds the {total} training images of {cfg.dataset}")
        if cfg.n_queries > n_train:
            raise ValueError(f"n_queries={cfg.n_queries} exceeds the {n_train} train images")
        return subset_indices(total, n_train, cfg.subset, cfg.seed)

    def test_ids(total: int) -> torch.Tensor:
        if cfg.n_queries > total:
            raise ValueError(f"n_queries={cfg.n_queries} exceeds the {total} test images")
        return query_indices(total, cfg.n_queries, split="test", seed=cfg.seed)

    kwargs = dict(root=cfg.root, size=cfg.size, grayscale=cfg.grayscale)
    train = load_dataset(cfg.dataset, "train", **kwargs, select=train_ids)  # only these images are resized
    test = load_dataset(cfg.dataset, "test", **kwargs, select=test_ids)
    return train, {"train": train[: cfg.n_queries], "test": test}


def check_run(cfg: Config, train: torch.Tensor, problem: Problem) -> None:
    """The checks that need the data or the file system, before Ray starts or anything is written: the
    patch size, problem and classes for the images' shape, the kernel for the bank's classes
    (:func:`lemmse_ray.kernels.resolver.resolve` without a device: the actors resolve it again where they run),
    and that the output folder, the bank and every estimate output are missing, empty or this project's
    (and no estimate output is, holds or lies in the bank)."""
    shape = tuple(train.shape[1:])
    problem.check_shape(shape)
    check_batch_memory(cfg, shape)
    plan = plan_classes(problem, PatchGeometry(shape, cfg.patch_size, cfg.padding, cfg.candidates))
    resolve(cfg.kernel, plan, dtype=DTYPES[cfg.dtype], device=None, stats=cfg.stats,
            images=image_class(plan, DTYPES[cfg.dtype], None))
    check_output_folder(cfg.out, cfg.storage_options)
    owned_group(cfg.bank_url, "bank", BANK_MEMBERS, cfg.storage_options)
    for split in SPLITS:
        for sigma in cfg.sigmas:
            url = estimate_url(cfg, split, sigma)
            check_apart(url, cfg.bank_url)
            owned_group(url, "estimate", RESULT_MEMBERS, cfg.storage_options)


def check_batch_memory(cfg: Config, shape: tuple[int, int, int]) -> None:
    """Refuse a query batch whose features cannot fit in memory (half of what this machine has free), before
    anything is allocated: :func:`lemmse_ray.bank.features.query_bytes` bounds them for ``batch_images``
    images of ``shape``, for the widest kernel form."""
    need = query_bytes(shape, cfg.patch_size, cfg.batch_images, DTYPES[cfg.dtype])
    free = available_memory()
    if need > free // 2:
        _, height, width = shape
        raise ValueError(f"batch_images={cfg.batch_images}: the query features of {cfg.batch_images} images of "
                         f"{height}x{width} pixels need up to {need / 1e9:.3g} GB, more than half of the "
                         f"{free / 1e9:.3g} GB free here; lower --batch-images, --size or --patch-size")


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
    """Seed of the one fixed noise (and mask) draw of a split at a noise level; below 2**64, the generators'
    limit, for every ``cfg.seed`` up to :data:`lemmse_ray.runs.config.MAX_SEED`."""
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


def estimate_inputs(cfg: Config, problem: Problem, queries: dict[str, torch.Tensor]):
    """``(split, σ index, σ, clean images, z, mask or None)`` of every output of the estimate step."""
    for split, images in queries.items():
        for index, sigma in enumerate(cfg.sigmas):
            _, z, mask = simulate(cfg, problem, images, split, index)
            yield split, index, sigma, images, z, mask if problem.random_mask else None


def actor_memory(cfg: Config) -> int | None:
    return None if cfg.actor_memory_mb is None else cfg.actor_memory_mb * 10**6


def plan_step(cfg: Config, train: torch.Tensor, problem: Problem, queries: dict[str, torch.Tensor],
              calibrated: bool = True) -> Plan:
    """Counts of the estimate step and (``calibrated``) its predicted wall time from a calibration before any
    actor exists (``lemmse plan``).  Needs Ray (the actors' count is the cluster's)."""

    geometry = PatchGeometry(tuple(train.shape[1:]), cfg.patch_size, cfg.padding, cfg.candidates)
    n_actors = cfg.n_actors or default_n_actors()
    inputs = [(z, mask, sigma) for _, _, sigma, _, z, mask in estimate_inputs(cfg, problem, queries)]
    centers = class_centers(train, problem, plan_classes(problem, geometry)) if calibrated else None
    return make_plan(problem, geometry, train, centers, inputs, n_actors, cfg.batch_images, cfg.shard_rows,
                     DTYPES[cfg.dtype], actor_memory(cfg), kernel=cfg.kernel, bank_url=cfg.bank_url,
                     storage_options=cfg.storage_options, calibrated=calibrated, stats=tuple(cfg.stats), topk=cfg.topk)


@dataclasses.dataclass
class EstimateStats:
    """What the estimate step did: batches computed, wall time, and the actors' busy seconds."""

    computed: int = 0
    seconds: float = 0.0
    busy_s: float = 0.0
    load_s: float = 0.0
    n_actors: int = 0

    @property
    def busy_fraction(self) -> float:
        """Actors' scanning time over (actors × the step's wall time, actors' start included)."""
        return self.busy_s / (self.n_actors * self.seconds) if self.n_actors and self.seconds > 0 else 0.0

    @property
    def working_fraction(self) -> float:
        """Actors' scanning and shard-loading time over (actors × the step's wall time)."""
        return (self.busy_s + self.load_s) / (self.n_actors * self.seconds) if self.n_actors and self.seconds > 0 \
            else 0.0


def estimate_step(cfg: Config, bank: Bank, problem: Problem, queries: dict[str, torch.Tensor],
                  plan: Plan | None = None) -> tuple[dict, EstimateStats]:
    """Estimate every split × σ through one set of Ray actors, started at most once (:func:`estimate_outputs`).

    With ``plan`` (the step's counts, :func:`plan_step` uncalibrated) its text is printed first, and once the
    actors have started, calibrated on them (:func:`~lemmse_ray.cluster.actors.calibrate_actors`), its
    prediction is set and printed before the first batch.

    Returns ({(split, σ): url}, what this call computed)."""
    t0 = time.perf_counter()
    options = {"batch_images": cfg.batch_images, "n_actors": cfg.n_actors, "stats": tuple(cfg.stats),
               "topk": cfg.topk, "dtype": DTYPES[cfg.dtype], "kernel": cfg.kernel,
               "storage_options": cfg.storage_options, "overwrite": cfg.overwrite, "actor_memory": actor_memory(cfg)}
    inputs = list(estimate_inputs(cfg, problem, queries))
    requests = (EstimateRequest(z, sigma, estimate_url(cfg, split, sigma), mask=mask, x=images, options=options,
                                metadata={"split": split, "seed": query_seed(cfg, split, index),
                                          "dataset": cfg.dataset, "config": dataclasses.asdict(cfg)})
                for split, index, sigma, images, z, mask in inputs)
    on_start = None
    if plan is not None:
        print(plan.text(), flush=True)
        _, _, sigma, _, z, mask = inputs[0]

        def on_start(actors: list) -> None:
            plan.calibration = calibrate_actors(actors, bank, z, mask, sigma, cfg.batch_images, tuple(cfg.stats),
                                                cfg.topk)
            plan.predicted_s = predict(plan, plan.calibration)
            print(plan.calibration_text(), flush=True)

    shared = estimate_outputs(bank, requests, on_start=on_start)  # the actors live until this step returns
    seconds = time.perf_counter() - t0
    stats = EstimateStats(computed=sum(shared.computed), seconds=seconds, busy_s=sum(shared.busy_s, 0.0),
                          load_s=shared.load_seconds(), n_actors=len(shared.actors))
    return {(split, sigma): estimate_url(cfg, split, sigma) for split in queries for sigma in cfg.sigmas}, stats


def verify_step(cfg: Config, train: torch.Tensor, problem: Problem, repair: bool = False) -> int:
    """Check every shard of ``cfg.bank_url`` and print a table; with ``repair`` rebuild the bad shards from
    ``train`` (:func:`lemmse_ray.cluster.build.repair_bank`).  Returns 0 when the bank is (now) whole, else 1.

    A repair needs the images and settings the bank was built from: others are refused (``ValueError``
    naming the difference) before anything changes, ``cfg.overwrite`` included — a repair restores the bank
    that is there and never replaces it with one of other data (``build-bank --overwrite`` does that)."""
    rows = verify_bank(cfg.bank_url, cfg.storage_options)
    bad = [r["shard"] for r in rows if r["status"] != "ok"]
    print(f"{'shard':>6} {'images':>23}  status")
    for r in rows:
        if r["status"] != "ok" or len(rows) <= 20:
            print(f"{r['shard']:>6} {r['first_image']:>11}-{r['last_image']:<11}  {r['status']}")
    print(f"{cfg.bank_url}: {len(rows) - len(bad)} of {len(rows)} shards ok", flush=True)
    if not bad:
        return 0
    if not repair:
        print(f"re-run with --repair to rebuild shards {', '.join(map(str, bad))}", flush=True)
        return 1
    bad, still = repair_bank(cfg.bank_url, train, problem, cfg.patch_size, cfg.padding, cfg.candidates,
                             cfg.shard_rows, DTYPES[cfg.dtype], cfg.storage_options, bad=bad)
    print(f"repaired {len(bad) - len(still)} of {len(bad)} shards", flush=True)
    return 1 if still else 0


def report_step(cfg: Config, urls: dict, n_show: int = 8) -> list[dict]:
    """PSNR table (Parquet) and figures (PNG, labelled rows: input z / LE-MMSE / ground truth, the PSNR against
    the ground truth under each tile) from the estimate outputs."""
    rows = []
    for (split, sigma), url in urls.items():
        est = EstimateArrays.from_group(open_group(url, "r", cfg.storage_options), stats=())
        z, mean, x = (torch.from_numpy(a) for a in (est.z, est.mean, est.x))
        for i, (p_est, p_in) in enumerate(zip(psnr(mean, x).tolist(), psnr(z, x).tolist())):
            rows.append({"split": split, "sigma": sigma, "image": i, "problem": cfg.problem, "input": cfg.input,
                         "patch_size": cfg.patch_size, "psnr_lemmse_x": p_est, "psnr_z_x": p_in})
        title = (f"{split} queries: {cfg.problem} ({cfg.input}), σ = {sigma:g}, P = {cfg.patch_size}, "
                 f"{cfg.dataset}")
        write_bytes(join(cfg.out, "figures", f"{split}_sigma{sigma:g}.png"),
                    png_bytes(draw_image_grid({"input z": z, "LE-MMSE": mean}, x, title, n_show)), cfg.storage_options)
    save_parquet(rows, join(cfg.out, "psnr.parquet"), cfg.storage_options)
    return rows


def summarize(rows: list[dict]) -> str:
    """A plain-text table of mean PSNRs per split and σ."""
    lines = [f"{'split':<6} {'sigma':>6} {'PSNR(LE-MMSE, x)':>17} {'PSNR(z, x)':>11}"]
    for r in group_means(rows, ("split", "sigma"), ("psnr_lemmse_x", "psnr_z_x")):
        lines.append(f"{r['split']:<6} {r['sigma']:>6g} {r['psnr_lemmse_x']:>17.2f} {r['psnr_z_x']:>11.2f}")
    return "\n".join(lines)


TIMINGS = "timings.json"


def record_timing(cfg: Config, step: str, seconds: float, computed: bool) -> None:
    """Keep the wall time of the invocation that computed ``step`` in ``<out>/timings.json``.

    An invocation that only reused finished work leaves the recorded time alone; one that resumed a step
    adds its time to the earlier ones' (the step's cost over every invocation that computed part of it).
    """
    path = join(cfg.out, TIMINGS)
    raw = read_bytes(path, cfg.storage_options)
    timings = json.loads(raw) if raw else {}
    if computed:
        previous = timings.get(step, {"seconds": 0.0, "invocations": 0})
        timings[step] = {"seconds": previous["seconds"] + seconds, "invocations": previous["invocations"] + 1}
    elif step not in timings:
        timings[step] = {"seconds": None, "invocations": 0}  # computed before timings were kept
    save_json(timings, path, cfg.storage_options)


def timing_text(cfg: Config) -> str:
    raw = read_bytes(join(cfg.out, TIMINGS), cfg.storage_options)
    parts = []
    for step, entry in (json.loads(raw) if raw else {}).items():
        if entry["seconds"] is None:
            parts.append(f"{step} (reused; time unknown)")
        else:
            runs = "" if entry["invocations"] == 1 else f" over {entry['invocations']} invocations"
            parts.append(f"{step} {entry['seconds']:.0f} s{runs}")
    return ", ".join(parts) or "not recorded"


def write_report(cfg: Config, tables: dict[str, str]) -> str:
    """``<out>/report.md``: the configuration, the PSNR tables and the wall time each step took when it was
    computed (kept across invocations that only reuse it)."""
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
        f"Wall time of each step when it was computed: {timing_text(cfg)}.", "",
        *(["## Estimate step: plan, predicted and measured", "", "```", tables["plan"], "```", ""]
          if "plan" in tables else []),
        "Files: `estimates/*.zarr` (inputs, LE-MMSE mean and statistics), `psnr.parquet`, "
        "`evaluation.parquet`, `summary.parquet`, `networks/*/checkpoint.pt`, `figures/*.png`.", ""])
    save_text(text, join(cfg.out, "report.md"), cfg.storage_options)
    return text
