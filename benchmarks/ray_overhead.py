"""Bank build throughput and the cost of the Ray path against the in-memory API on the same work.

    python benchmarks/ray_overhead.py [--images 400] [--queries 4] [--actors 2]

Prints: bank rows/s (Ray tasks writing Zarr shards), then pairs/s (query pixels × bank rows per second) of
``lemmse_ray.estimate`` (one process, all threads) and of ``estimate_on_ray`` (shard actors, already
started and holding their shards: the steady state of a long run), their ratio, and the largest difference
between the two means.  Default data: the first ``--images`` photos tiles (RGB 32×32, 1024 rows per image),
denoising, P = 5, σ = 0.1, float32, statistics: mean only.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import lemmse_ray as lm  # noqa: E402
from lemmse_ray.data.loaders import load_dataset  # noqa: E402
from lemmse_ray.cluster.build import build_bank
from lemmse_ray.cluster.driver import estimate_on_ray
from lemmse_ray.cluster.actors import start_actors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="training images in the bank")
    parser.add_argument("--queries", type=int, default=4, help="query images (1024 query pixels each)")
    parser.add_argument("--actors", type=int, default=2, help="shard actors (1 CPU each)")
    parser.add_argument("--shard-rows", type=int, default=1 << 16, help="bank rows per shard")
    args = parser.parse_args()

    train = load_dataset("photos", "train", n=args.images)
    x = load_dataset("photos", "test", n=args.queries).double()
    problem, sigma = lm.Denoising(), 0.1
    _, z, _ = problem.measure(x, sigma, torch.Generator().manual_seed(0))
    pairs = z.shape[0] * z.shape[2] * z.shape[3] * train.shape[0] * z.shape[2] * z.shape[3]

    ray.init(num_cpus=args.actors, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        bank = build_bank(f"{tmp}/bank.zarr", train, problem, 5, shard_rows=args.shard_rows, progress=False)
        print(f"bank: {bank.n_rows} rows in {bank.n_shards} shards, {bank.build_stats['seconds']:.1f} s, "
              f"{bank.build_stats['rows_per_s']:.3g} rows/s (Ray tasks, {args.actors} CPUs, incl. worker start)")

        t = time.perf_counter()
        ref = lm.estimate(train, z, problem, sigma, 5, stats=())
        memory_s = time.perf_counter() - t
        print(f"in-memory estimate ({torch.get_num_threads()} threads): {memory_s:.1f} s, "
              f"{pairs / memory_s:.3g} pairs/s (bank built in memory inside the timing)")

        actors = start_actors(bank, args.actors)
        estimate_on_ray(bank, z[:1], sigma, f"{tmp}/warm.zarr", actors=actors, stats=(), progress=False)
        t = time.perf_counter()
        group = estimate_on_ray(bank, z, sigma, f"{tmp}/out.zarr", actors=actors, stats=(),
                                batch_images=args.queries, progress=False)
        ray_s = time.perf_counter() - t
        print(f"Ray path ({len(actors)} actors, warm): {ray_s:.1f} s, {pairs / ray_s:.3g} pairs/s")
        print(f"Ray / in-memory throughput: {memory_s / ray_s:.2f}")
        print(f"max |mean_ray - mean_memory| = {np.abs(group['mean'][...] - ref.mean.numpy()).max():.2e}")
    ray.shutdown()


if __name__ == "__main__":
    main()
