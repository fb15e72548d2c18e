#!/usr/bin/env python
"""End-to-end in-memory LE-MMSE on the issue's workload, bank construction included, against this machine's
float32 GEMM bound and the straightforward version a user would write.

Workload: denoising, 128 ``photos`` training images (RGB 32×32), noisy test queries (σ = 0.1), P = 5,
circular padding, interior candidates (128 × 28² = 100,352 bank rows); 1 and 4 query images
(1,024 / 4,096 query pixels; every query meets every row).  Each figure is the best of ``--repeat`` timings.

Timed, per number of query images B:

(a) ``lm.estimate(train, z, ...)`` — the public API, bank built inside the call — with ``stats=()`` (the
    posterior mean only: the same work as (d)), and once more with its default statistics (variance, ess).
    On this workload (denoising: one class, whitened by the identity) ``kernel="auto"`` evaluates it with
    the sliding-window kernel of ``lemmse_ray.kernels.sliding``;
(b) ``lm.PatchBank(train, ...)`` then ``bank.estimate(z, ...)`` (mean only), with the build time alone;
(c) the matrix-product path, ``lm.estimate(..., kernel="torch")`` (mean only): what the Ray actors run;
(d) float32 GEMM bound: ``torch.mm`` 2048×2048×2048, re-measured around every timed section, best figure;
    "% of the bound" = pairs × 2(d + C + 1) / time / GEMM flop/s (158 flops per pair: d = 75, C = 3), the
    useful flops of the matrix-product formulation.  The sliding kernel needs about 20 operations per pair,
    not 158, so its figure is a GEMM-equivalent rate and may exceed 100 %;
(e) the straightforward version: patches by ``F.unfold``, then per chunk of queries ``torch.cdist`` to all
    rows, ``softmax`` and ``w @ values`` (float32), its own patch extraction included.

Targets (issue 10, B = 4): (a) ≥ 40 % of the GEMM bound and ≥ 8× (e).  The figures and ratios are printed
last.  Judge on the median of several runs: the machine may be shared.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import lemmse_ray as lm  # noqa: E402
from kernel import gemm_gflops, machine_info, naive_mean  # noqa: E402  (benchmarks/kernel.py)
from lemmse_ray.data.loaders import load_dataset  # noqa: E402

PATCH = 5
SIGMA = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=128, help="training images (default 128)")
    p.add_argument("--queries", default="1,4", help="numbers of query images (default 1,4)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions, best used (default 3)")
    p.add_argument("--naive-chunk", type=int, default=64, help="query chunk of the straightforward version")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    return p.parse_args(argv)


def straightforward(train: torch.Tensor, z: torch.Tensor, chunk: int) -> torch.Tensor:
    """What a user would write: interior bank patches and circular query patches by unfold, then
    cdist + softmax + weighted sum per query chunk, float32."""
    half = PATCH // 2
    train, z = train.to(torch.float32), z.to(torch.float32)
    keys = F.unfold(train, PATCH).transpose(1, 2).reshape(-1, train.shape[1] * PATCH ** 2)
    values = train[:, :, half:-half, half:-half].flatten(2).transpose(1, 2).reshape(-1, train.shape[1])
    padded = F.pad(z, (half,) * 4, mode="circular")
    q = F.unfold(padded, PATCH).transpose(1, 2).reshape(-1, keys.shape[1])
    return naive_mean(q.contiguous(), keys.contiguous(), values.contiguous(), SIGMA, chunk)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print("== LE-MMSE end-to-end benchmark (bank construction included) ==")
    print(machine_info())
    train = load_dataset("photos", "train")[: args.train]
    counts = [int(b) for b in args.queries.split(",")]
    x = load_dataset("photos", "test")[: max(counts)]
    problem = lm.Denoising()
    _, z_all, _ = problem.measure(x.to(torch.float64), SIGMA, torch.Generator().manual_seed(0))
    z_all = z_all.to(torch.float32)
    channels = train.shape[1]
    useful = 2 * (channels * PATCH ** 2 + channels + 1)
    opts = dict(patch_size=PATCH, padding="circular", candidates="interior")
    n_rows = lm.PatchBank(train, problem, **opts).n_rows  # also compiles the fused epilogue (first use)
    print(f"workload: denoising, {train.shape[0]} photos training images ({n_rows:,} bank rows), P={PATCH}, "
          f"circular padding, interior candidates, sigma={SIGMA}; useful flops/pair = {useful}")

    gemm = [gemm_gflops(2048, 2048, 2048)]

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeat):
            gc.collect()
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        gemm.append(gemm_gflops(2048, 2048, 2048))
        return min(times), times, out

    rows = []
    for b in counts:
        z = z_all[:b]
        pairs = b * 32 * 32 * n_rows
        t_est, ts_est, res = timed(lambda: lm.estimate(train, z, problem, SIGMA, stats=(), **opts))
        t_def, ts_def, _ = timed(lambda: lm.estimate(train, z, problem, SIGMA, **opts))
        t_mm, ts_mm, _ = timed(lambda: lm.estimate(train, z, problem, SIGMA, stats=(), kernel="torch", **opts))
        t_build, ts_build, bank = timed(lambda: lm.PatchBank(train, problem, **opts))
        t_bank, ts_bank, _ = timed(lambda: lm.PatchBank(train, problem, **opts).estimate(z, SIGMA, stats=()))
        t_scan, ts_scan, _ = timed(lambda: bank.estimate(z, SIGMA, stats=()))
        t_naive, ts_naive, mean_naive = timed(lambda: straightforward(train, z, args.naive_chunk))
        diff = (mean_naive.reshape(b, 32, 32, channels).permute(0, 3, 1, 2) - res.mean).abs().max().item()
        print(f"\nB = {b} query image(s), {pairs:,} pairs (times in s, best of {args.repeat}):")
        for name, ts in (("lm.estimate, mean only", ts_est), ("lm.estimate, default stats (variance, ess)", ts_def),
                         ("lm.estimate, mean only, kernel='torch'", ts_mm), ("PatchBank build", ts_build), ("PatchBank build + estimate, mean only", ts_bank),
                         ("bank.estimate on a built bank, mean only", ts_scan), ("straightforward", ts_naive)):
            print(f"    {name:<44} {', '.join(f'{t:.3f}' for t in ts)}  (median {statistics.median(ts):.3f})")
        print(f"    max |mean lm.estimate - mean straightforward| = {diff:.2e}")
        print(f"    lm.estimate's kernel: {'sliding windows' if res.info['sliding_class'] is not None else 'matrix product'}")
        rows.append((b, pairs, t_est, t_def, t_mm, t_build, t_bank, t_scan, t_naive))

    peak = max(gemm)
    print(f"\nGEMM bound: 2048^3 float32 torch.mm, measured {len(gemm)} times: "
          f"{', '.join(f'{g:.1f}' for g in gemm)} GFLOP/s; best = {peak:.1f} GFLOP/s")
    frac = lambda pairs, t: 100 * pairs * useful / t / (peak * 1e9)  # noqa: E731
    print("\nsummary (best times; % of the GEMM bound; speed-up = straightforward time / time):")
    for b, pairs, t_est, t_def, t_mm, t_build, t_bank, t_scan, t_naive in rows:
        print(f"  B={b}: lm.estimate {t_est:.3f} s = {frac(pairs, t_est):.1f} % of bound, "
              f"{t_naive / t_est:.1f}x straightforward ({t_naive:.3f} s); default stats {t_def:.3f} s "
              f"= {frac(pairs, t_def):.1f} %; matrix-product path {t_mm:.3f} s = {frac(pairs, t_mm):.1f} %, "
              f"{t_naive / t_mm:.1f}x; PatchBank build {t_build:.3f} s + estimate = {t_bank:.3f} s "
              f"({frac(pairs, t_bank):.1f} %); estimate on a built bank {t_scan:.3f} s ({frac(pairs, t_scan):.1f} %)")
    b, pairs, t_est, *_, t_naive = rows[-1]
    ok = frac(pairs, t_est) >= 40 and t_naive / t_est >= 8
    print(f"ratio (B={b}, lm.estimate, mean only): {frac(pairs, t_est):.1f} % of the GEMM bound, "
          f"{t_naive / t_est:.1f}x the straightforward version   [targets >= 40 % and >= 8x: "
          f"{'PASS' if ok else 'FAIL'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
