"""The Ray path against the in-memory API on the same work and cores, and the bank's size on disk.

    python benchmarks/ray_overhead.py [--images 400] [--queries 4] [--actors 2] [--repeats 3]
                                      [--patch-size 5] [--padding zeros]

Prints: the bank build (Ray tasks writing the training images as Zarr shards: rows/s, the images' bytes on
disk, and the bytes the same bank would take as patch rows, format 2, uncompressed); then pairs/s (query
pixels × the bank rows they meet, per second) of

* ``PatchBank(train, ...).estimate(z, sigma)`` — the in-memory API, bank already built, one process, all
  ``torch.get_num_threads()`` threads;
* ``estimate_on_ray(bank, z, sigma, out, actors=actors)`` — the product's path for banks on disk: shard actors
  (1 CPU each, as many as ``--actors``) already started and holding their shards, the steady state of a long
  run, writing each result to a fresh Zarr group;

each the median of ``--repeats`` runs, their ratio from the same run, and the largest difference between the
two means.  Run it on a quiet machine with ``--actors`` equal to the threads (``nproc``).  Data: the first
``--images`` photos tiles (RGB 32×32), denoising, σ = 0.1, float32, statistics: mean only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import lemmse_ray as lm  # noqa: E402
from lemmse_ray.bank.features import met_pairs  # noqa: E402
from lemmse_ray.cluster.actors import start_actors  # noqa: E402
from lemmse_ray.cluster.build import build_bank  # noqa: E402
from lemmse_ray.cluster.driver import estimate_on_ray  # noqa: E402
from lemmse_ray.data.loaders import load_dataset  # noqa: E402


def disk_bytes(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="training images in the bank")
    parser.add_argument("--queries", type=int, default=4, help="query images (1024 query pixels each)")
    parser.add_argument("--actors", type=int, default=2, help="shard actors (1 CPU each)")
    parser.add_argument("--shard-rows", type=int, default=1 << 16, help="bank rows per shard (whole images)")
    parser.add_argument("--patch-size", type=int, default=5)
    parser.add_argument("--padding", choices=("zeros", "circular"), default="zeros")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path (the median is reported)")
    args = parser.parse_args()

    train = load_dataset("photos", "train", n=args.images).double()
    x = load_dataset("photos", "test", n=args.queries).double()
    problem, sigma, p = lm.Denoising(), 0.1, args.patch_size
    _, z, _ = problem.measure(x, sigma, torch.Generator().manual_seed(0))

    ray.init(num_cpus=args.actors, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        bank = build_bank(f"{tmp}/bank.zarr", train, problem, p, args.padding, shard_rows=args.shard_rows,
                          progress=False)
        pairs = met_pairs(z, None, problem, bank.plan, np.diff(bank.layout.offsets))
        channels = train.shape[1]
        row_bytes = bank.n_rows * ((bank.plan.width + 1 + channels) * 4 + 4 + 16)  # format 2: keys, ½‖k‖², values,
        on_disk = disk_bytes(f"{tmp}/bank.zarr")                                    # class id, source
        print(f"bank: {train.shape[0]} images, {bank.n_rows} rows in {bank.n_shards} shards, built in "
              f"{bank.build_stats['seconds']:.1f} s ({bank.build_stats['rows_per_s']:.3g} rows/s, Ray tasks, "
              f"{args.actors} CPUs, incl. worker start)")
        image_bytes = bank.group["images"].nbytes
        print(f"bank size, uncompressed: {image_bytes / 1e6:.2f} MB of images against {row_bytes / 1e6:.1f} MB of patch "
              f"rows (format 2): {row_bytes / image_bytes:.1f}x smaller (P^2/2 = {p * p / 2:g}); on disk (compressed) "
              f"{on_disk / 1e6:.2f} MB")
        print(f"work: {z.shape[0]} query images x {train.shape[0]} training images, P = {p}, {args.padding} "
              f"padding: {pairs:.4g} pairs")

        memory_bank = lm.PatchBank(train, problem, p, args.padding)
        memory_bank.estimate(z[:1], sigma, stats=())  # warm-up (compiled kernels loaded)
        memory_s, ref = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref = memory_bank.estimate(z, sigma, stats=())
            memory_s.append(time.perf_counter() - t)

        actors = start_actors(bank, args.actors)
        estimate_on_ray(bank, z[:1], sigma, f"{tmp}/warm.zarr", actors=actors, stats=(), progress=False)
        ray_s, group = [], None
        for i in range(args.repeats):
            t = time.perf_counter()
            group = estimate_on_ray(bank, z, sigma, f"{tmp}/out{i}.zarr", actors=actors, stats=(),
                                    batch_images=args.queries, progress=False)
            ray_s.append(time.perf_counter() - t)
        m, r = statistics.median(memory_s), statistics.median(ray_s)
        print(f"in-memory PatchBank.estimate ({torch.get_num_threads()} threads, bank built): median {m:.2f} s of "
              f"{[round(s, 2) for s in memory_s]}, {pairs / m:.3g} pairs/s")
        print(f"Ray path ({len(actors)} actors, warm): median {r:.2f} s of {[round(s, 2) for s in ray_s]}, "
              f"{pairs / r:.3g} pairs/s")
        print(f"Ray / in-memory throughput: {m / r:.2f}")
        print(f"max |mean_ray - mean_memory| = {np.abs(group['mean'][...] - ref.mean.numpy()).max():.2e}")
    ray.shutdown()


if __name__ == "__main__":
    main()
