#!/usr/bin/env python
"""What the top-k attribution costs: ``lm.estimate`` on the matrix product with and without ``topk``.

    python benchmarks/topk_cost.py [--train 500] [--queries 2] [--runs 5]

Workload: the quick studies' data (28×28 grayscale tiles of the embedded photographs, ``photos``), denoising
at P = 5, zero padding, ``--train`` training images, ``--queries`` noisy test images, float32, statistics
variance + ESS, at σ = 0.01 and 0.1.  Each configuration is timed end to end through the public API (the bank
built inside the call, as a user would call it), ``--runs`` times, interleaved; the medians and their ratio
are printed.  The studies that report copy rates (concentration, dataset-size) pay this ratio on every
estimate: top-k needs the matrix product (``kernel="torch"``), so the sliding-window kernel's time is printed
too, for scale.  Both top-k results are checked equal to the last bit across runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lemmse_ray as lm
from lemmse_ray.data.loaders import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=500, help="training images (default 500)")
    parser.add_argument("--queries", type=int, default=2, help="noisy test images (default 2)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration (default 5)")
    args = parser.parse_args()
    train = load_dataset("photos", "train", size=28, grayscale=True, n=args.train)
    x = load_dataset("photos", "test", size=28, grayscale=True, n=args.queries)
    print(f"{len(train)} training and {len(x)} query images, 28×28 gray, P = 5, zero padding, "
          f"{torch.get_num_threads()} threads; medians of {args.runs} runs")
    for sigma in (0.01, 0.1):
        z = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        configs = {"torch, top-k": ("torch", ("variance", "ess", "topk")),
                   "torch, no top-k": ("torch", ("variance", "ess")),
                   "sliding (no top-k)": ("sliding", ("variance", "ess"))}
        times: dict[str, list[float]] = {name: [] for name in configs}
        tops = []
        for _ in range(args.runs):
            for name, (kernel, stats) in configs.items():
                t0 = time.perf_counter()
                result = lm.estimate(train, z, lm.Denoising(), sigma, patch_size=5, padding="zeros", stats=stats,
                                     kernel=kernel)
                times[name].append(time.perf_counter() - t0)
                if "topk" in stats:
                    tops.append((result.topk_image.clone(), result.topk_position.clone()))
        same = all(torch.equal(a[0], tops[0][0]) and torch.equal(a[1], tops[0][1]) for a in tops)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"σ = {sigma:g}: " + ", ".join(f"{name} {t:.2f} s" for name, t in med.items())
              + f"; top-k costs {med['torch, top-k'] / med['torch, no top-k']:.2f}× the matrix product without it"
              + f"; top-k rows equal across runs: {same}")


if __name__ == "__main__":
    main()
