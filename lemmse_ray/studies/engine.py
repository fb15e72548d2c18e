r"""Studies: many cells (:mod:`lemmse_ray.studies.spec`) computed once each, sharing all identical work.

Work is content-addressed under a work folder (default ``<out>/work``): each item's folder is named by the
first 16 hex digits of the SHA-256 of the canonical JSON of its identity (:func:`lemmse_ray.studies.spec.canonical`),
and ``work.json`` maps each name to its identity, human-readable:

* a **bank** (``banks/<key>.zarr``) per (training set: dataset, root, size, channels, ``n_train``, subset,
  seed; ``problem.spec()``; P, padding, candidates, dtype, shard rows) -- for every σ;
* an **estimate** group (``estimates/<key>.zarr``) per (bank, σ, split, ``n_queries``, seed, stats, top-k,
  batch size); the split ``floor`` holds the loss floor's queries: ``floor_images`` training images drawn at
  random (seeded) with fresh noise, statistic ``variance`` only (:func:`floor_queries`);
* a **network** (``networks/<key>/…/checkpoint.pt``, with its weights after every epoch) per (training set,
  problem, σ, name, P, padding, width, training hyper-parameters).

Each level resumes (finished shards, batches and epochs are kept), so a finished study run again computes
nothing; ``history.json`` records, per invocation, the banks built, shards written, batches computed and
networks trained.  The metrics of every cell × split × network (:func:`lemmse_ray.studies.analysis.cell_metrics`)
then go to ``cells.parquet``, ``images.parquet``, ``classes.parquet`` (concentration per class),
``epochs.parquet`` (each network's agreement after each epoch) and ``density.parquet``, and
:mod:`lemmse_ray.studies.report` renders ``report.md`` and ``figures/*.png`` from them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..cluster.build import build_bank
from ..cluster.driver import EstimateRequest, estimate_outputs
from ..cluster.session import ensure_ray
from ..core.classes import plan_classes
from ..core.metrics import mse
from ..core.patches import PatchGeometry
from ..core.problems import Problem
from ..core.validation import DTYPES
from ..data.loaders import SPLITS
from ..runs.config import Config, join
from ..runs.evaluation import run_network
from ..runs.pipeline import check_run, load_data, make_problem, simulate
from ..runs.training import (
    CHECKPOINT,
    load_network,
    load_snapshot,
    network_dir,
    read_checkpoint,
    train_network,
)
from ..storage.bank_store import open_group
from ..storage.files import save_json, save_parquet
from ..storage.inputs import read_json
from ..storage.ownership import check_output_folder, claim_output_folder
from ..storage.redact import public
from ..storage.results import EstimateArrays
from .analysis import (
    PSNR_METRICS,
    cell_metrics,
    final_train_loss,
    floor_rows,
    global_mmse,
    psnr_columns,
    translation_equivariant_mmse,
)
from .figures import ess_map_figure, image_grid_figure, problem_grid_figure
from .report import render
from .spec import CELL_FIELDS, Cell, Part, canonical, data_label

STUDY = "study.json"
WORK = "work.json"
HISTORY = "history.json"
COUNTERS = ("banks_built", "shards_written", "batches_computed", "networks_trained")
FLOOR = "floor"  # the split of the loss floor's queries
FLOOR_STATS = ("variance",)
FLOOR_STREAM = 2 * 1009  # the floor's noise stream: past the splits' (lemmse_ray.runs.pipeline.query_seed)
# A planted "network": a function of (estimate arrays, split) returning (B, C, H, W) outputs (diagnostics)
Planted = Callable[[EstimateArrays, str], np.ndarray]


def key(identity: Mapping) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``identity``."""
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:16]


def data_identity(cfg: Config) -> dict:
    return {f: getattr(cfg, f) for f in ("dataset", "root", "grayscale", "size", "n_train", "subset", "seed")}


def bank_identity(cfg: Config, problem: Problem) -> dict:
    return {"data": data_identity(cfg), "problem": problem.spec(), "patch_size": cfg.patch_size,
            "padding": cfg.padding, "candidates": cfg.candidates, "dtype": cfg.dtype, "shard_rows": cfg.shard_rows}


def estimate_identity(cfg: Config, problem: Problem, split: str, floor_images: int = 0) -> dict:
    if split == FLOOR:
        return {"bank": key(bank_identity(cfg, problem)), "sigma": cfg.sigmas[0], "split": split,
                "n_queries": floor_images, "seed": cfg.seed, "stats": list(FLOOR_STATS),
                "batch_images": cfg.batch_images}
    return {"bank": key(bank_identity(cfg, problem)), "sigma": cfg.sigmas[0], "split": split,
            "n_queries": cfg.n_queries, "seed": cfg.seed, "stats": sorted(cfg.stats), "topk": cfg.topk,
            "batch_images": cfg.batch_images}


def floor_queries(cfg: Config, train: torch.Tensor, problem: Problem, count: int):
    r"""The loss floor's queries: ``count`` training images drawn uniformly **with** replacement (i.i.d., so
    any count serves any N and the standard error over images is that of independent draws; seeded) with fresh
    noise (and masks) from a stream of their own (not the train split's): the distribution the networks are
    trained on.  Returns (x, y, z, mask)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + FLOOR_STREAM)
    x = train[torch.randint(len(train), (count,), generator=generator)]
    y, z, mask = problem.measure(x.to(torch.float64), cfg.sigmas[0], generator)
    return x, y, z, mask


def network_identity(cfg: Config, problem: Problem, name: str) -> dict:
    size = {"hidden": cfg.hidden} if name == "patchmlp" else {"width": cfg.width}
    return {"data": data_identity(cfg), "problem": problem.spec(), "sigma": cfg.sigmas[0], "network": name,
            "patch_size": cfg.patch_size, "padding": cfg.padding, **size,
            **{f: getattr(cfg, f) for f in ("epochs", "steps_per_epoch", "batch_size", "lr", "n_workers", "use_gpu")}}


@dataclasses.dataclass
class Work:
    """The work items of a study and, per cell, the keys it uses."""

    work_dir: str
    banks: dict[str, dict] = dataclasses.field(default_factory=dict)  # key -> identity
    estimates: dict[str, dict] = dataclasses.field(default_factory=dict)
    networks: dict[str, dict] = dataclasses.field(default_factory=dict)
    cell_keys: dict[int, dict] = dataclasses.field(default_factory=dict)  # cell -> {bank, estimates, networks}

    def bank_url(self, k: str) -> str:
        return join(self.work_dir, "banks", f"{k}.zarr")

    def estimate_url(self, k: str) -> str:
        return join(self.work_dir, "estimates", f"{k}.zarr")

    def network_out(self, k: str) -> str:
        return join(self.work_dir, "networks", k)

    def index(self) -> dict:
        return {"banks": self.banks, "estimates": self.estimates, "networks": self.networks}


def plan_work(cells: list[Cell], problems: dict[int, Problem], work_dir: str,
              floors: Mapping[int, int] | None = None) -> Work:
    """The distinct banks, estimate groups and networks of ``cells`` (``problems``: cell index -> problem;
    ``floors``: cell index -> the loss floor's training queries, 0 or missing: none)."""
    work = Work(work_dir)
    for cell in cells:
        cfg, problem = cell.cfg, problems[cell.index]
        bank = bank_identity(cfg, problem)
        keys = {"bank": key(bank), "estimates": {}, "networks": {}}
        work.banks[keys["bank"]] = bank
        floor = (floors or {}).get(cell.index, 0)
        for split in (*SPLITS, FLOOR) if floor else SPLITS:
            identity = estimate_identity(cfg, problem, split, floor)
            keys["estimates"][split] = key(identity)
            work.estimates[key(identity)] = identity
        for name in cfg.networks:
            identity = network_identity(cfg, problem, name)
            keys["networks"][name] = key(identity)
            work.networks[key(identity)] = identity
        work.cell_keys[cell.index] = keys
    return work


def spec_record(name: str, size: str | None, parts: list[Part], work_dir: str) -> dict:
    """The record of ``study.json``: the study's parts as a spec holds them, without secrets
    (:func:`lemmse_ray.storage.redact.public`: ``storage_options`` dropped, credentials and URL passwords
    redacted), so that the record written and the record compared with an existing one are the same."""
    return public({"name": name, "size": size, "work": work_dir,
                   "parts": [{"name": p.name, "description": p.description, "base": p.base,
                              **({"grid": p.grid} if p.grid else {}),  # a zip-only part has no grid
                              "zip": p.zip, "figures": p.figures, "floor_images": p.floor_images,
                              "references": p.references, "varying": p.varying} for p in parts]})


def check_out(out: str, work_dir: str, record: dict, overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuse an ``out`` or work folder that this project did not write (:mod:`lemmse_ray.storage.ownership`), and an
    ``out`` holding another study unless ``overwrite`` (which replaces only its tables and report).  Its
    ``study.json`` and ``history.json`` are read with caps (:func:`lemmse_ray.storage.inputs.read_json`):
    a damaged one is refused here, before any work."""

    check_output_folder(out, storage_options)
    check_output_folder(work_dir, storage_options)
    existing = read_json(join(out, STUDY), "out", storage_options=storage_options)
    history = read_json(join(out, HISTORY), "out", storage_options=storage_options)
    if history is not None and not isinstance(history, list):
        raise ValueError(f"out: {join(out, HISTORY)} is not a list of runs; move it away to start a new history")
    if existing is None:
        return
    if not isinstance(existing, dict):  # not a record of ours: another spec, as far as we can tell
        existing = {"name": "?", "parts": None}
    if canonical(existing.get("parts")) != canonical(record["parts"]) and not overwrite:
        raise ValueError(f"out: {out} holds the study {str(existing.get('name'))!r} of another spec; choose another "
                         "--out, or pass --overwrite to replace its tables and report (finished work is kept and "
                         "reused)")


# --- running ------------------------------------------------------------------------------------------------

def prepare(cells: list[Cell]) -> tuple[dict, dict[int, Problem]]:
    """Load each distinct training set once and check every cell against it (before any work).

    Returns ({data key: (train, queries)}, {cell: problem}); errors name the cell."""
    data: dict[str, tuple] = {}
    problems: dict[int, Problem] = {}
    for cell in cells:
        cfg = cell.cfg
        k = key(data_identity(cfg) | {"n_queries": cfg.n_queries})
        try:
            if k not in data:
                data[k] = load_data(cfg)
            train = data[k][0]
            problem = make_problem(cfg, tuple(train.shape[1:]))
            check_run(cfg, train, problem)
        except ValueError as err:
            raise ValueError(f"{err} (in {cell.label()})") from None
        problems[cell.index] = problem
    return data, problems


def _data(data: dict, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return data[key(data_identity(cfg) | {"n_queries": cfg.n_queries})]


def compute(cells: list[Cell], work: Work, data: dict, problems: dict[int, Problem],
            storage_options: dict | None = None, verbose: bool = False) -> dict[str, int]:
    """Build every bank, estimate every group and train every network that is not finished; returns the
    counters of this invocation (:data:`COUNTERS`)."""

    counters = dict.fromkeys(COUNTERS, 0)
    announce = progress_lines(len(work.estimates))
    by_bank: dict[str, list[Cell]] = {}
    for cell in cells:
        by_bank.setdefault(work.cell_keys[cell.index]["bank"], []).append(cell)
    for b, (bank_key, members) in enumerate(by_bank.items()):
        cfg = members[0].cfg
        train, _ = _data(data, cfg)
        problem = problems[members[0].index]
        announce(f"bank {b + 1}/{len(by_bank)}: {len(train)} training images, for {members[0].label()}")
        bank = build_bank(work.bank_url(bank_key), train, problem, cfg.patch_size, cfg.padding, cfg.candidates,
                          cfg.shard_rows, DTYPES[cfg.dtype], storage_options, progress=verbose)
        counters["banks_built"] += bank.build_stats["shards_written"] > 0
        counters["shards_written"] += bank.build_stats["shards_written"]
        # one set of actors for this bank's groups, killed after them to free their CPUs for the next bank and
        # for training
        shared = estimate_outputs(bank, estimate_requests(members, work, data, problem, storage_options, verbose,
                                                          announce), release=True)
        counters["batches_computed"] += sum(shared.computed)
    trained: set[str] = set()
    for cell in cells:
        train, _ = _data(data, cell.cfg)
        for name, net_key in work.cell_keys[cell.index]["networks"].items():
            if net_key in trained:
                continue
            trained.add(net_key)
            cfg = dataclasses.replace(cell.cfg, out=work.network_out(net_key))
            checkpoint = read_checkpoint(checkpoint_path(work, cell.cfg, name, net_key), storage_options)
            if checkpoint is None or checkpoint["epoch"] < cfg.epochs:
                counters["networks_trained"] += 1
                announce(f"training {name} for {cell.label()}")
            train_network(cfg, name, cfg.sigmas[0], train, problems[cell.index], progress=verbose,
                          plain=cfg.n_workers == 1, snapshots=True)
    return counters


def progress_lines(n_groups: int) -> Callable[[str], None]:
    """A function that prints one progress line, prefixed with the minutes since this call; estimate lines
    (those starting ``estimate``) are numbered out of ``n_groups``."""
    t0, done = time.perf_counter(), [0]

    def announce(what: str) -> None:
        if what.startswith("estimate"):
            done[0] += 1
            what = f"estimate group {done[0]}/{n_groups}" + what.removeprefix("estimate")
        print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {what}", flush=True)
    return announce


def estimate_requests(members: list[Cell], work: Work, data: dict, problem: Problem,
                      storage_options: dict | None = None, verbose: bool = False,
                      announce: Callable[[str], None] | None = None) -> Iterator[EstimateRequest]:
    """The estimate groups of the cells ``members`` of one bank (``problem``: the bank's), each group once;
    ``announce`` is told of each group as it is handed out (:func:`progress_lines`)."""
    done: set[str] = set()
    for cell in members:
        train, queries = _data(data, cell.cfg)
        for split, est_key in work.cell_keys[cell.index]["estimates"].items():
            if est_key in done:
                continue
            done.add(est_key)
            c = cell.cfg
            if split == FLOOR:
                x, _, z, mask = floor_queries(c, train, problem, work.estimates[est_key]["n_queries"])
            else:
                x = queries[split]
                _, z, mask = simulate(c, problem, x, split, 0)
            if announce is not None:
                announce(f"estimate: {split} queries ({len(z)} images) of {cell.label()}")
            yield EstimateRequest(
                z, c.sigmas[0], work.estimate_url(est_key), x=x,
                mask=mask if problem.random_mask else None,
                metadata={"split": split, "dataset": c.dataset, "identity": work.estimates[est_key]},
                options={"batch_images": c.batch_images, "n_actors": c.n_actors,
                         "stats": FLOOR_STATS if split == FLOOR else tuple(c.stats),
                         "topk": c.topk, "dtype": DTYPES[c.dtype], "kernel": c.kernel,
                         "storage_options": storage_options, "progress": verbose})


def network_folder(work: Work, cfg: Config, name: str, net_key: str) -> str:
    """The folder of network ``name`` (work item ``net_key``) of a cell configuration ``cfg``."""
    return network_dir(dataclasses.replace(cfg, out=work.network_out(net_key)), name, cfg.sigmas[0])


def checkpoint_path(work: Work, cfg: Config, name: str, net_key: str) -> str:
    """The checkpoint of network ``name`` (work item ``net_key``) of a cell configuration ``cfg``."""
    return join(network_folder(work, cfg, name, net_key), CHECKPOINT)


def network_output(net: torch.nn.Module, checkpoint: dict, est: EstimateArrays) -> np.ndarray:
    """The network's output (float64) on the stored inputs ``z`` (and masks, when it was trained with them)."""

    z = torch.from_numpy(est.z).float()
    inputs = torch.cat([z, torch.from_numpy(est.mask).float()], dim=1) if checkpoint["mask_channel"] else z
    return run_network(net, inputs).double().numpy()


def in_lemmse_class(net: torch.nn.Module) -> bool:
    """True when the network is a function :math:`g(\\Pi_k z)` of the patch alone (PatchMLP, ResNet); False
    for a U-Net, whose pooling makes it depend on the pixel's phase too (``docs/theory.md`` §7)."""
    return int(getattr(net, "factor", 1)) == 1


IMAGE_COLUMNS = ("psnr_z_x", "mse_z_x", "psnr_lemmse_x", "mse_lemmse_x", "posterior_variance", "psnr_net_lemmse",
                 "psnr_net_x", "mse_net_lemmse", "mse_net_x")
FLOOR_COLUMNS = ("floor_images", "loss_floor", "loss_floor_se", "mse_gap", "mse_gap_se", "train_loss",
                 "below_floor_mse", "below_floor_train_loss", "below_floor")
TABLES = ("cells", "images", "classes", "epochs", "density")


def _pooled(images: list[dict], metrics: tuple[str, ...]) -> dict:
    out: dict[str, Any] = {}
    for metric in metrics:
        out.update(psnr_columns(images, metric))
    return out


def floor_table(cell: Cell, work: Work, train: torch.Tensor, problem: Problem, nets: dict, storage_options=None,
                planted: Mapping[str, Planted] | None = None) -> dict[str, dict]:
    """{network or "LE-MMSE": its :func:`lemmse_ray.studies.analysis.floor_check` row on the cell's floor
    queries, with ``floor_images``}; {} when the cell has no floor."""
    floor_key = work.cell_keys[cell.index]["estimates"].get(FLOOR)
    if floor_key is None:
        return {}
    est = EstimateArrays.from_group(open_group(work.estimate_url(floor_key), "r", storage_options))
    outputs = {name: network_output(net, checkpoint, est) for name, (net, checkpoint) in nets.items()}
    outputs.update({name: np.asarray(fn(est, FLOOR), dtype=np.float64) for name, fn in (planted or {}).items()})
    losses = {name: final_train_loss(checkpoint) for name, (_, checkpoint) in nets.items()}
    return {r["network"]: {**r, "floor_images": len(est.x)} for r in floor_rows(est, outputs, losses)}


def reference_columns(train: torch.Tensor, est: EstimateArrays, sigma: float) -> dict[str, float]:
    """PSNR (pooled MSE) against x of the global MMSE and the translation-equivariant MMSE on the cell's
    inputs (:func:`lemmse_ray.studies.analysis.global_mmse`, :func:`~lemmse_ray.studies.analysis.translation_equivariant_mmse`)."""
    x = torch.from_numpy(est.x)
    out = {}
    for column, estimator in (("psnr_global_mmse_x", global_mmse), ("psnr_te_mmse_x", translation_equivariant_mmse)):
        estimate = torch.from_numpy(estimator(train, est.z, sigma))
        out[column] = psnr_columns([{"mse_lemmse_x": float(v)} for v in mse(estimate, x)], "psnr_lemmse_x")[
            "psnr_lemmse_x"]
    return out


def epoch_rows(head: dict, work: Work, cfg: Config, nets: dict, est: EstimateArrays,
               storage_options: dict | None = None) -> list[dict]:
    """One row per network × epoch with a snapshot: PSNR (pooled MSE) of the network after that epoch
    against the LE-MMSE and against x on the fixed query set ``est``, and that epoch's training loss."""
    rows = []
    for name, (_, checkpoint) in nets.items():
        folder = network_folder(work, cfg, name, work.cell_keys[head["cell"]]["networks"][name])
        for record in checkpoint["metrics"]:
            snapshot = load_snapshot(folder, record["epoch"], checkpoint, storage_options)
            if snapshot is None:
                continue
            out = torch.from_numpy(network_output(snapshot, checkpoint, est))
            images = [{"mse_net_lemmse": float(a), "mse_net_x": float(b)}
                      for a, b in zip(mse(out, torch.from_numpy(est.mean)), mse(out, torch.from_numpy(est.x)))]
            rows.append({**head, "network": name, "epoch": record["epoch"], "step": record["step"],
                         "train_loss": record["train_loss"], **_pooled(images, ("psnr_net_lemmse", "psnr_net_x"))})
    return rows


def cell_rows(cell: Cell, part: Part, work: Work, data: dict, problem: Problem, storage_options: dict | None = None,
              planted: Mapping[str, Planted] | None = None) -> dict[str, list[dict]]:
    """{table: rows} of one cell (:data:`TABLES`): one ``cells`` row per split × network (``"none"``: the
    LE-MMSE's own metrics, concentration, copying and references), its images, its classes, its networks'
    epochs and its density bins, from the stored estimates and networks.  PSNR columns are PSNRs of the pooled
    MSE with their companions (:func:`lemmse_ray.studies.analysis.psnr_columns`); the loss floor, on its own
    training queries, goes to the train rows."""

    cfg = cell.cfg
    train, queries = _data(data, cfg)
    train64 = train.to(torch.float64)
    plan = plan_classes(problem, PatchGeometry(tuple(train.shape[1:]), cfg.patch_size, cfg.padding,
                                               cfg.candidates))
    keys = work.cell_keys[cell.index]
    nets = {name: load_network(checkpoint_path(work, cfg, name, k), storage_options)
            for name, k in keys["networks"].items()}
    common = {"part": cell.part, "cell": cell.index, "sigma": cell.sigma, "bank_key": keys["bank"],
              **{f: getattr(cfg, f) for f in CELL_FIELDS}}
    bank_inputs = problem.noiseless_input(train64)
    floor = floor_table(cell, work, train, problem, nets, storage_options, planted)
    tables: dict[str, list[dict]] = {name: [] for name in TABLES}
    for split in SPLITS:
        est = EstimateArrays.from_group(open_group(work.estimate_url(keys["estimates"][split]), "r", storage_options))
        outputs, fields = {}, {}
        for name, (net, checkpoint) in nets.items():
            outputs[name] = network_output(net, checkpoint, est)
            fields[name] = {"receptive_field": net.receptive_field, "network_key": keys["networks"][name],
                            "epochs_done": checkpoint["epoch"], "in_lemmse_class": in_lemmse_class(net)}
        for name, fn in (planted or {}).items():  # a planted "network" claims the LE-MMSE's class
            outputs[name] = np.asarray(fn(est, split), dtype=np.float64)
            fields[name] = {"receptive_field": None, "network_key": "planted", "epochs_done": None,
                            "in_lemmse_class": True}
        metrics = cell_metrics(est, plan, outputs,
                               query_inputs=problem.noiseless_input(queries[split].to(torch.float64)),
                               bank_inputs=bank_inputs, train_images=train64)
        head = {**common, "split": split, "estimate_key": keys["estimates"][split]}
        for name in ("none", *outputs):
            # the LE-MMSE's own per-image values repeat in every network's rows: take the first network's
            shown = next(iter(outputs), None) if name == "none" else name
            net_images = [r for r in metrics["images"] if r["network"] == shown]
            row = {**head, "network": name, "receptive_field": cfg.patch_size, "network_key": None,
                   "epochs_done": None, "in_lemmse_class": None, **fields.get(name, {}), "n_images": len(net_images)}
            row.update(_pooled(net_images, tuple(m for m in PSNR_METRICS
                                                 if name != "none" or not m.startswith("psnr_net"))))
            if est.variance is not None:
                values = np.array([r["posterior_variance"] for r in net_images])
                row["posterior_variance"] = float(values.mean())
                row["posterior_variance_se"] = (float(values.std(ddof=1) / math.sqrt(len(values)))
                                                if len(values) > 1 else math.nan)
            if name == "none":
                row.update(metrics["cell"][0])
                if part.references:
                    row.update(reference_columns(train64, est, cell.sigma))
            reference = floor.get("LE-MMSE" if name == "none" else name) if split == "train" else None
            row.update({c: (reference[c] if reference else (False if c.startswith("below") else math.nan))
                        for c in FLOOR_COLUMNS})
            bins = [r for r in metrics["density"] if (r["network"] or "none") == name]
            if bins:
                low = next(r for r in bins if r["pixels"])["mean"]
                high = next(r for r in reversed(bins) if r["pixels"])["mean"]
                row.update({"density_metric": bins[0]["metric"], "density_low": low, "density_high": high})
            tables["cells"].append(row)
            for r in net_images:
                tables["images"].append({**head, "network": name, "image": r["image"],
                                         **{c: r.get(c) for c in IMAGE_COLUMNS
                                            if name != "none" or not c.startswith(("psnr_net", "mse_net"))}})
        tables["classes"] += [{**head, **r} for r in metrics["classes"]]
        tables["epochs"] += epoch_rows(head, work, cfg, nets, est, storage_options)
        tables["density"] += [{**head, **r, "network": r["network"] or "none"} for r in metrics["density"]]
    return tables


def example_figures(out: str, part: str, cells: list[Cell], work: Work, storage_options: dict | None = None) -> None:
    """``figures/<part>_examples.png`` (test queries: input z, LE-MMSE, each network, ground truth, PSNR
    under each tile) and ``figures/<part>_ess.png`` (their per-pixel ESS) of the part's first cell, with the
    networks of every cell of the part that shares its test estimates; and ``figures/<part>_grid.png``: one
    row per distinct test estimate group of the part (dataset × problem × σ × P …), the first test image as
    input z, LE-MMSE, each network and the ground truth, PSNR under each tile (the paper's Figure 1)."""

    def shown(test_key: str) -> tuple[EstimateArrays, dict]:
        est = EstimateArrays.from_group(open_group(work.estimate_url(test_key), "r", storage_options))
        tiles = {"input z": est.z, "LE-MMSE": est.mean}
        peers = [c for c in cells if work.cell_keys[c.index]["estimates"]["test"] == test_key]
        networks = {name: (c.cfg, k) for c in peers for name, k in work.cell_keys[c.index]["networks"].items()}
        for name, (net_cfg, net_key) in networks.items():
            tiles[name] = network_output(*load_network(checkpoint_path(work, net_cfg, name, net_key),
                                                       storage_options), est)
        return est, tiles

    def what(cell: Cell) -> str:
        cfg = cell.cfg
        return (f"{data_label(cfg.dataset, cfg.size, cfg.grayscale)}, {cfg.problem} ({cfg.input}), "
                f"σ = {cell.sigma:g}, P = {cfg.patch_size}")

    cell = cells[0]
    est, tiles = shown(work.cell_keys[cell.index]["estimates"]["test"])
    image_grid_figure(tiles, est.x, join(out, "figures", f"{part}_examples.png"), f"Test queries: {what(cell)}",
                      storage_options=storage_options)
    if est.ess is not None:
        ess_map_figure(est.z, est.ess, join(out, "figures", f"{part}_ess.png"),
                       f"Effective number of training patches per pixel: {what(cell)}", storage_options=storage_options)
    rows, seen = [], set()
    for c in cells:
        test_key = work.cell_keys[c.index]["estimates"]["test"]
        if test_key in seen or len(rows) == GRID_ROWS:
            continue
        seen.add(test_key)
        est, tiles = shown(test_key)
        rows.append((what(c), {label: images[0] for label, images in tiles.items()}, est.x[0]))
    problem_grid_figure(rows, join(out, "figures", f"{part}_grid.png"),
                        f"Test image 0 of each setting of {part}", storage_options=storage_options)


GRID_ROWS = 12  # rows of a part's Figure-1 grid (its first distinct settings)


def uniform(rows: list[dict]) -> list[dict]:
    """Rows with every column of any row (missing ones None): Parquet takes its schema from all of them."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    return [{c: row.get(c) for c in columns} for row in rows]


def record_history(out: str, counters: dict, seconds: float, storage_options: dict | None = None) -> list[dict]:
    """Append this invocation's counters and wall time to ``<out>/history.json``; returns the history."""
    history = read_json(join(out, HISTORY), "out", storage_options=storage_options) or []  # checked by check_out
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1), **counters})
    save_json(history, join(out, HISTORY), storage_options)
    return history


def run_study(name: str, parts: list[Part], cells: list[Cell], out: str, work_dir: str | None = None,
              size: str | None = None, overwrite: bool = False, storage_options: dict | None = None,
              verbose: bool = False, planted: Mapping[str, Planted] | None = None) -> dict:
    """Compute (or reuse) every cell of a validated study and write its tables and report.

    ``planted``: extra "networks" given as functions of the estimate arrays (diagnostics and tests, e.g. a
    network that returns the clean image must be flagged below the loss floor).  Returns
    {"counters", "cells", "seconds"}.
    """

    t0 = time.perf_counter()
    work_dir = work_dir or join(out, "work")
    record = spec_record(name, size, parts, work_dir)
    check_out(out, work_dir, record, overwrite, storage_options)
    data, problems = prepare(cells)  # every check that needs the images, before anything is written
    by_name = {part.name: part for part in parts}
    work = plan_work(cells, problems, work_dir, {c.index: by_name[c.part].floor_count(c.cfg) for c in cells})
    claim_output_folder(out, storage_options)
    claim_output_folder(work_dir, storage_options)
    save_json(record, join(out, STUDY), storage_options)
    save_json(work.index(), join(out, WORK), storage_options)
    print(f"study {name}: {len(cells)} cells, {len(work.banks)} banks, {len(work.estimates)} estimate groups, "
          f"{len(work.networks)} networks (work in {public(work_dir)})", flush=True)
    ensure_ray(verbose=verbose)
    counters = compute(cells, work, data, problems, storage_options, verbose)
    rows: dict[str, list[dict]] = {table: [] for table in TABLES}
    for cell in cells:
        for table, new in cell_rows(cell, by_name[cell.part], work, data, problems[cell.index], storage_options,
                                    planted).items():
            rows[table].extend(new)
    for table, values in rows.items():
        save_parquet(uniform(values), join(out, f"{table}.parquet"), storage_options)
    seconds = time.perf_counter() - t0
    for part in parts:
        example_figures(out, part.name, [c for c in cells if c.part == part.name], work, storage_options)
    record_history(out, counters, seconds, storage_options)
    render(out, storage_options)
    print(f"study {name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items())
          + f" ({seconds:.0f} s); report {public(join(out, 'report.md'))}", flush=True)
    return {"counters": counters, "cells": rows["cells"], "seconds": seconds}
