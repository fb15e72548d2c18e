#!/usr/bin/env python
"""GPU check of the exact estimator (not run by CI).

1. Builds a patch bank (Ray tasks) and runs the Ray actor path with CUDA actors in float32 — one actor per
   GPU of a local Ray started with the detected GPUs (or the cluster given by ``--address``).
2. Compares its mean (and variance) with the in-memory API in float64 on the CPU and prints the largest
   absolute differences; fails (exit 1) above ``--tol``.
3. Prints the throughput of the actor path and of the kernel timed directly on the GPU for a larger bank,
   as pairs/s, where pairs = query pixels × bank rows.  "Logits/s" counts the (query, row) pairs the kernel
   actually evaluates (a query meets only the rows of its own class).

Without CUDA it stops with exit code 2 unless ``--allow-cpu`` (then everything runs on the CPU with smaller
defaults, to test the script itself).

    python scripts/gpu_check.py                      # on a GPU machine
    python scripts/gpu_check.py --allow-cpu          # smoke test anywhere
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray processes bind to 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without an install

import numpy as np  # noqa: E402
import torch  # noqa: E402

# (GPU, CPU) defaults of the size arguments; None on the command line picks by device
DEFAULTS = {"n_train": (200, 4), "n_queries": (8, 1), "shard_rows": (1 << 15, 2048), "large_n_train": (1609, 16)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when CUDA is not available")
    parser.add_argument("--dataset", default="photos", help="embedded dataset: photos | faces | digits")
    parser.add_argument("--n-train", type=int, help="training images of the Ray bank (default: GPU 200, CPU 4)")
    parser.add_argument("--n-queries", type=int, help="query images, test split (default: GPU 8, CPU 1)")
    parser.add_argument("--patch-size", type=int, default=5, help="receptive field P")
    parser.add_argument("--sigma", type=float, default=0.1, help="noise level of the denoising queries")
    parser.add_argument("--shard-rows", type=int, help="bank rows per shard (default: GPU 32768, CPU 2048)")
    parser.add_argument("--n-actors", type=int, help="actors (default: one per GPU, else one per CPU)")
    parser.add_argument("--batch-images", type=int, default=4, help="query images per broadcast batch")
    parser.add_argument("--large-n-train", type=int,
                        help="training images of the bank timed directly (default: GPU 1609 = all photos, CPU 16)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of the direct kernel (best kept)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest |float32 Ray − float64 CPU| accepted")
    parser.add_argument("--address", help="existing Ray cluster (default: start a local one)")
    parser.add_argument("--workdir", help="folder for the bank and outputs (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if torch.cuda.is_available() else cpu)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: CUDA is not available to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing to check. "
              "Run it on a GPU machine, or pass --allow-cpu to test the script on the CPU.", file=sys.stderr)
        return 2

    import ray

    import lemmse_ray as lm
    from lemmse_ray.bank import class_centers, memory_bank
    from lemmse_ray.classes import plan_classes
    from lemmse_ray.datasets import load_dataset
    from lemmse_ray.distributed import build_bank, estimate_on_ray, exact_device, start_actors
    from lemmse_ray.patches import PatchGeometry
    from lemmse_ray.queries import key_features, keys_to, prepare_queries, queries_to, scan

    device = exact_device()  # CUDA (TF32 off) or CPU
    n_gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0) if n_gpus else "CPU only (--allow-cpu)"
    print(f"device: {device} ({name}); torch {torch.__version__}, ray {ray.__version__}, {n_gpus} GPU(s)")
    figures: dict = {"device": str(device), "device_name": name}

    train = load_dataset(args.dataset, "train", n=args.n_train).double()
    x = load_dataset(args.dataset, "test", n=args.n_queries).double()
    problem = lm.Denoising()
    _, z, _ = problem.measure(x, args.sigma, torch.Generator().manual_seed(0))
    shape = tuple(train.shape[1:])
    query_pixels = z.shape[0] * shape[1] * shape[2]

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_gpus=n_gpus, num_cpus=min(os.cpu_count() or 1, 8), include_dashboard=False,
                 _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.workdir or tmp)
        # 1. bank and actor path, float32
        t0 = time.perf_counter()
        bank = build_bank(str(work / "bank.zarr"), train, problem, patch_size=args.patch_size,
                          shard_rows=args.shard_rows, dtype=torch.float32, overwrite=True, progress=False)
        print(f"bank: {args.dataset} {args.n_train} images {shape}, P={args.patch_size}: {bank.n_rows} rows in "
              f"{bank.n_shards} shards, built in {time.perf_counter() - t0:.1f} s "
              f"({bank.build_stats['rows_per_s']:.0f} rows/s)")
        actors = start_actors(bank, args.n_actors, "float32")
        where = [ray.get(a.describe.remote()) for a in actors]
        devices = sorted({w["device"] for w in where})
        print(f"actors: {len(actors)} on {', '.join(devices)} ({', '.join(str(w['rows']) for w in where)} rows)")
        if torch.cuda.is_available() and not all(d.startswith("cuda") for d in devices):
            print("gpu_check: CUDA is available here but the actors run on the CPU", file=sys.stderr)
            return 1
        # warm-up (CUDA context, cuBLAS) on the first query image, then the timed run on all of them
        estimate_on_ray(bank, z[:1], args.sigma, str(work / "warmup.zarr"), actors=actors, stats=("variance",),
                        dtype=torch.float32, overwrite=True, progress=False)
        t0 = time.perf_counter()
        group = estimate_on_ray(bank, z, args.sigma, str(work / "out.zarr"), actors=actors, stats=("variance",),
                                batch_images=args.batch_images, dtype=torch.float32, overwrite=True,
                                progress=False)
        seconds = time.perf_counter() - t0
        pairs = query_pixels * bank.n_rows
        print(f"ray path (float32, {len(actors)} actor(s)): {z.shape[0]} images = {query_pixels} query pixels × "
              f"{bank.n_rows} rows = {pairs:.3g} pairs in {seconds:.2f} s: {pairs / seconds:.3g} pairs/s "
              f"(driver's count, batches only: {group.attrs['history'][-1]['pairs_per_s']:.3g} pairs/s)")

        # 2. accuracy against the in-memory float64 estimate on the CPU
        t0 = time.perf_counter()
        ref = lm.estimate(train, z, problem, args.sigma, patch_size=args.patch_size, stats=("variance",),
                          dtype=torch.float64)
        cpu_seconds = time.perf_counter() - t0
        d_mean = float(np.abs(group["mean"][...] - ref.mean.numpy()).max())
        d_var = float(np.abs(group["variance"][...] - ref.variance.numpy()).max())
        print(f"accuracy: max |mean_ray,f32 − mean_cpu,f64| = {d_mean:.3g}, max |Δvariance| = {d_var:.3g} "
              f"(tol {args.tol:g}); CPU float64 in-memory took {cpu_seconds:.2f} s = {pairs / cpu_seconds:.3g} "
              "pairs/s")
        figures.update(bank_rows=bank.n_rows, query_pixels=query_pixels, ray_seconds=seconds,
                       ray_pairs_per_s=pairs / seconds, max_abs_diff_mean=d_mean, max_abs_diff_variance=d_var,
                       cpu_f64_pairs_per_s=pairs / cpu_seconds, n_actors=len(actors), actor_devices=devices)
    ray.shutdown()

    # 3. the kernel alone on the device, larger bank (built in memory, keys moved to the device once)
    large = load_dataset(args.dataset, "train", n=args.large_n_train).double()
    plan = plan_classes(problem, PatchGeometry(shape, args.patch_size))
    centers = class_centers(large, problem, plan)
    arrays = memory_bank(large, problem, plan, centers).to(torch.float32)
    n_rows = len(arrays)
    keys = keys_to(key_features(arrays, plan, centers), device)
    del arrays
    queries = queries_to(prepare_queries(z, None, problem, plan, centers, args.sigma, torch.float32), device)
    evaluated = sum(len(queries.per_class[c].index) * len(k.values) for c, k in keys.items()
                    if queries.per_class[c] is not None)
    for stats, label in (((), "mean only"), (("variance", "ess"), "mean, variance, ess")):
        scan(keys, plan, queries, stats, 0)  # warm-up
        best = float("inf")
        for _ in range(max(1, args.repeat)):
            sync(device)
            t0 = time.perf_counter()
            scan(keys, plan, queries, stats, 0)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        pairs = query_pixels * n_rows
        print(f"kernel ({device.type}, float32, {label}): {query_pixels} query pixels × {n_rows} rows = "
              f"{pairs:.3g} pairs in {best:.3f} s: {pairs / best:.3g} pairs/s ({evaluated / best:.3g} logits/s)")
        figures[f"kernel_pairs_per_s[{label}]"] = pairs / best
        figures[f"kernel_logits_per_s[{label}]"] = evaluated / best
    figures.update(kernel_bank_rows=n_rows)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if not d_mean <= args.tol:
        print(f"gpu_check: FAILED: the float32 Ray estimate differs from the float64 reference by {d_mean:.3g} "
              f"> {args.tol:g}", file=sys.stderr)
        return 1
    print("gpu_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
