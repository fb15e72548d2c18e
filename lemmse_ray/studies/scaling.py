r"""Scaling studies of the estimate step on the current Ray cluster.

* *Strong scaling*: one bank (the configured training set), :math:`k = 1 \dots K` actors; ideal throughput
  :math:`k\,T_1`.
* *Weak scaling*: :math:`k` actors scan a bank of :math:`k \lfloor N/K \rfloor` training images (rows
  :math:`\propto k`); ideal throughput again :math:`k\,T_1` (the wall time stays that of one actor).

Throughput is pairs/s (query pixels × bank rows met, :mod:`lemmse_ray.cluster.plan`) of the driver loop with actors
that already hold their shards (the steady state of a long run); efficiency is :math:`T_k / (k\,T_1)`.  The
results go to ``<out>/scaling/scaling.parquet`` and two figures (throughput and efficiency against actors,
measured and ideal), titled with the cluster's resources.  Actors take a GPU each where the cluster has GPUs,
else a CPU (so the same code measures a GPU cluster), and on a CPU host the actors share its cores: more
actors than cores cannot scale.
"""
from __future__ import annotations

import math
import os
import platform

import ray
import torch

from ..cluster.actors import start_actors
from ..cluster.build import build_bank
from ..cluster.driver import estimate_on_ray
from ..cluster.session import check_actor_count, default_n_actors
from ..core.classes import plan_classes
from ..core.patches import PatchGeometry
from ..core.validation import DTYPES
from ..runs.config import Config, join
from ..runs.pipeline import actor_memory, simulate
from ..storage.files import save_parquet
from .figures import line_figure


def actor_counts(max_actors: int) -> list[int]:
    """1, 2, 4, … up to ``max_actors`` (always included)."""
    counts = [1 << i for i in range(int(math.log2(max_actors)) + 1)]
    return counts if counts[-1] == max_actors else counts + [max_actors]


def hardware() -> str:
    """The cluster's resources, for figure titles."""
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    gpus = int(resources.get("GPU", 0))
    text = f"{nodes} node{'s' * (nodes != 1)}, {int(resources.get('CPU', 0))} CPUs, {gpus} GPUs"
    if not gpus:
        text += f"; driver host: {os.cpu_count()} cores ({platform.machine()}), CPU actors share them"
    return text


def _measure(bank, z, mask, sigma, cfg: Config, n_actors: int, out: str) -> dict:
    actors = start_actors(bank, n_actors, cfg.dtype, cfg.kernel, actor_memory=actor_memory(cfg))
    try:
        ray.get([a.describe.remote() for a in actors])  # shards loaded: time the steady state only
        group = estimate_on_ray(bank, z, sigma, out, mask=mask, batch_images=cfg.batch_images, actors=actors,
                                stats=(), dtype=DTYPES[cfg.dtype], overwrite=True, progress=False)
        entry = group.attrs["history"][-1]
    finally:
        for actor in actors:
            ray.kill(actor)
    return {"actors": len(actors), "rows": bank.n_rows, "pairs": entry["pairs"], "seconds": entry["seconds"],
            "pairs_per_s": entry["pairs_per_s"], "busy_fraction": entry["busy_fraction"]}


def scaling_study(cfg: Config, train: torch.Tensor, problem, queries: dict[str, torch.Tensor],
                  max_actors: int | None = None) -> list[dict]:
    """Strong and weak scaling from 1 to ``max_actors`` actors (default: one per GPU, else one per CPU) on the
    test queries at the first σ; returns the Parquet rows (see the module docstring)."""
    max_actors = default_n_actors() if max_actors is None else max_actors
    if isinstance(max_actors, bool) or not isinstance(max_actors, int) or max_actors < 1:
        raise ValueError(f"max_actors must be a positive integer, got {max_actors!r}")
    check_actor_count(max_actors, "max_actors")
    if train.shape[0] < max_actors:
        raise ValueError(f"max_actors={max_actors} exceeds the {train.shape[0]} training images (weak scaling "
                         "gives each actor at least one)")
    folder = join(cfg.out, "scaling")
    _, z, mask = simulate(cfg, problem, queries["test"], "test", 0)
    mask = mask if problem.random_mask else None
    sigma = cfg.sigmas[0]
    rows = []

    def bank_of(images: torch.Tensor, name: str, n_actors: int):
        # shards small enough that every actor gets its share of the rows
        shard_rows = max(1, min(cfg.shard_rows, -(-images.shape[0] * _rows_per_image(cfg, images, problem)
                                                   // (4 * n_actors))))
        return build_bank(join(folder, f"{name}.zarr"), images, problem, cfg.patch_size, cfg.padding,
                          cfg.candidates, shard_rows, DTYPES[cfg.dtype], cfg.storage_options, overwrite=True,
                          progress=False)

    strong = bank_of(train, "bank_strong", max_actors)
    base = train.shape[0] // max_actors
    for k in actor_counts(max_actors):
        rows.append({"study": "strong", **_measure(strong, z, mask, sigma, cfg, k,
                                                   join(folder, f"estimate_strong_{k}.zarr"))})
        weak = bank_of(train[: base * k], f"bank_weak_{k}", k)
        rows.append({"study": "weak", **_measure(weak, z, mask, sigma, cfg, k,
                                                 join(folder, f"estimate_weak_{k}.zarr"))})
    for study in ("strong", "weak"):
        one = next(r["pairs_per_s"] for r in rows if r["study"] == study and r["actors"] == 1)
        for r in rows:
            if r["study"] == study:
                r["ideal_pairs_per_s"] = r["actors"] * one
                r["efficiency"] = r["pairs_per_s"] / r["ideal_pairs_per_s"]
    title = f"LE-MMSE estimate scaling ({hardware()})"
    save_parquet(rows, join(folder, "scaling.parquet"), cfg.storage_options)
    curves = [{"study": r["study"], "curve": "measured", "actors": r["actors"], "pairs_per_s": r["pairs_per_s"],
               "efficiency": r["efficiency"]} for r in rows]
    curves += [{"study": r["study"], "curve": "ideal", "actors": r["actors"], "pairs_per_s": r["ideal_pairs_per_s"],
                "efficiency": 1.0} for r in rows]
    line_figure(curves, "actors", "pairs_per_s", join(folder, "throughput.png"), title, "actors",
                "pairs / s", hue="study", style="curve", storage_options=cfg.storage_options)
    line_figure(curves, "actors", "efficiency", join(folder, "efficiency.png"), title, "actors",
                "parallel efficiency T_k / (k T_1)", hue="study", style="curve", storage_options=cfg.storage_options)
    for r in rows:
        print(f"{r['study']:<6} {r['actors']:>3} actors {r['rows']:>10,} rows {r['pairs_per_s']:10.3e} pairs/s "
              f"efficiency {r['efficiency']:.2f}", flush=True)
    print(f"scaling: {join(folder, 'scaling.parquet')}, figures {join(folder, 'throughput.png')}, "
          f"{join(folder, 'efficiency.png')} ({hardware()})", flush=True)
    return rows


def _rows_per_image(cfg: Config, images: torch.Tensor, problem) -> int:
    plan = plan_classes(problem, PatchGeometry(tuple(images.shape[1:]), cfg.patch_size, cfg.padding,
                                               cfg.candidates))
    return int(plan.rows_per_image().sum())
