#!/usr/bin/env python
"""Throughput of the LE-MMSE kernel on CPU, against this machine's float32 GEMM and a straightforward version.

Workload (the issue's benchmark): denoising at P = 5 on RGB 32×32 photos (``load_dataset("photos")``), a
bank of ``--rows`` rows (default 1000 training images × 1024 positions = 1,024,000 rows), ``--queries``
query pixels (default 2048 = 2 noisy test images).  Circular padding, so that every query meets every row
(one patch class): pairs = query pixels × bank rows exactly.  (With zero padding a query only meets the rows
of its own border class and the work is smaller than M × R.)

Measured, in one run:

(a) kernel pairs/s — the library's own path: keys built once with :class:`lemmse_ray.PatchBank` and
    queries with ``prepare_queries`` (as ``PatchBank.estimate`` does), then only
    :func:`lemmse_ray.bank.features.scan` is timed, float32, stats = mean only (and, unless ``--no-stats``, once
    more with variance + ess), with the fused compiled epilogue where it builds (``LEMMSE_RAY_FUSED=0``:
    the pure-torch epilogue);
(b) float32 GEMM GFLOP/s: ``torch.mm`` of 2048×2048×2048 (the bound; re-measured before and after every
    timed scan and the best figure used, so that kernel and bound are timed under the same load on a
    shared machine), and for information the kernel's own block shapes (block_q × (d+1)) @ ((d+1) ×
    block_r) and (block_q × block_r) @ (block_r × (C+1));
(c) ratio = pairs/s × 2(d + C + 1) / GEMM flop/s, d = C·P² = 75 (useful flops: the logits GEMM of width d
    plus the weighted-sum GEMM of width C+1);
(d) a straightforward exact implementation — per query chunk, ``torch.cdist`` to *all* bank rows, a
    two-pass ``softmax`` over the rows and ``w @ values`` — on the same data (patches extracted
    independently with ``F.unfold``), its pairs/s, the kernel's speed-up over it, the max abs difference
    of the two posterior means, and (``--check``) both against an exact float64 reference on a few queries.

Targets (issue 10): ratio ≥ 60 % of the GEMM bound (mean only), ≥ 50 % with variance + ess; ≥ 3× the
straightforward version.

``--blocks 256x4096,1024x1024`` additionally times the scan with other (BLOCK_Q, BLOCK_R) choices.
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lemmse_ray as lm  # noqa: E402
from lemmse_ray.kernels import torch_kernels as kernel  # noqa: E402
from lemmse_ray.kernels import epilogue as fused  # noqa: E402
from lemmse_ray.data.loaders import load_dataset  # noqa: E402
from lemmse_ray.core.statistics import finalize  # noqa: E402
from lemmse_ray.bank.features import prepare_queries, scan  # noqa: E402

PATCH = 5
POSITIONS = 32 * 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_024_000,
                   help="bank rows (rounded down to whole 32×32 images, 1024 rows each; at most 1609 images "
                        "= 1,647,616 rows); default 1,024,000")
    p.add_argument("--queries", type=int, default=2048,
                   help="query pixels (rounded up to whole images, 1024 each); default 2048")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of the kernel scan (best is used)")
    p.add_argument("--naive-repeat", type=int, default=1, help="timed repetitions of the straightforward version")
    p.add_argument("--naive-chunk", type=int, default=64,
                   help="query chunk of the straightforward version (chunk × rows float32 per buffer)")
    p.add_argument("--sigma", type=float, default=0.1, help="noise level of the query images (default 0.1)")
    p.add_argument("--check", type=int, default=128,
                   help="queries checked against an exact float64 reference in (d) (0: skip); default 128")
    p.add_argument("--no-stats", action="store_true", help="skip the extra timing with variance + ess")
    p.add_argument("--no-naive", action="store_true", help="skip the straightforward version (d)")
    p.add_argument("--blocks", default="",
                   help="comma-separated BLOCK_QxBLOCK_R settings to time in addition, e.g. 256x4096,1024x1024")
    return p.parse_args(argv)


def best_of(fn, repeat: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def gemm_gflops(m: int, k: int, n: int, repeat: int = 7, min_seconds: float = 0.3,
                transposed_b: bool = False) -> float:
    """Best-of-``repeat`` float32 GFLOP/s of (m×k) @ (k×n), each timing averaging enough calls.

    ``transposed_b``: B is the transpose of a row-major (n×k) matrix, as in the kernel (``K_f[r0:r1].T`` and
    the values operand ``aug[:, r0:r1].T``)."""
    a = torch.randn(m, k)
    b = torch.randn(n, k).T if transposed_b else torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_seconds / repeat / once))
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 2.0 * m * k * n / best / 1e9


def machine_info() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"machine: {cpu}; {os.cpu_count()} logical CPUs; load average {load}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"BLAS: {'MKL' if torch.backends.mkl.is_available() else 'other'}, "
            f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads: {torch.get_num_threads()}")


def naive_patches(images: torch.Tensor) -> torch.Tensor:
    """(N·H·W, C·P²) circular patches in (channel, row, col) order, positions row-major (independent of the
    library's patch code)."""
    half = PATCH // 2
    padded = F.pad(images, (half, half, half, half), mode="circular")
    cols = F.unfold(padded, PATCH)  # (N, C·P², H·W)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).contiguous()


def naive_mean(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sigma: float, chunk: int) -> torch.Tensor:
    """Straightforward exact posterior mean: cdist to all rows, softmax over all rows, weighted sum."""
    out = torch.empty((q.shape[0], values.shape[1]), dtype=q.dtype)
    for q0 in range(0, q.shape[0], chunk):
        d = torch.cdist(q[q0:q0 + chunk], keys)
        w = torch.softmax(d.square_().mul_(-0.5 / sigma ** 2), dim=1)
        out[q0:q0 + chunk] = w @ values
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print("== LE-MMSE kernel benchmark ==")
    print(machine_info())

    train_all = load_dataset("photos", "train")
    test_all = load_dataset("photos", "test")
    n_img = args.rows // POSITIONS
    if not 1 <= n_img <= train_all.shape[0]:
        raise SystemExit(f"--rows must be between {POSITIONS} and {train_all.shape[0] * POSITIONS}")
    n_q_img = max(1, math.ceil(args.queries / POSITIONS))
    if n_q_img > test_all.shape[0]:
        raise SystemExit(f"--queries must be at most {test_all.shape[0] * POSITIONS}")
    train = train_all[:n_img].to(torch.float64)
    x = test_all[:n_q_img].to(torch.float64)
    problem = lm.Denoising()
    _, z, _ = problem.measure(x, args.sigma, torch.Generator().manual_seed(0))
    channels = train.shape[1]
    d = channels * PATCH ** 2
    useful = 2 * (d + channels + 1)
    print(f"workload: denoising, P={PATCH}, RGB 32x32 photos, circular padding, sigma={args.sigma}; "
          f"bank {n_img} images x {POSITIONS} = {n_img * POSITIONS:,} rows; queries {n_q_img} images = "
          f"{n_q_img * POSITIONS:,} pixels; d = {d}, C = {channels}, useful flops/pair = 2(d+C+1) = {useful}")

    # ---- build keys and queries once, the library's own way (as lemmse_ray.estimate does)
    t0 = time.perf_counter()
    bank = lm.PatchBank(train, problem, PATCH, "circular", "all")
    keys, plan = bank.keys, bank.plan
    qset = prepare_queries(z, None, problem, plan, bank.centers, args.sigma, torch.float32)
    pairs = sum(len(qset.per_class[c].index) * len(k.row_ids) for c, k in keys.items()
                if qset.per_class[c] is not None)
    n_rows = sum(len(k.row_ids) for k in keys.values())
    print(f"built keys + queries in {time.perf_counter() - t0:.1f} s ({plan.n_classes} class(es)); "
          f"pairs per scan = {pairs:,}; epilogue: "
          f"{'fused, compiled' if fused.load() is not None else 'pure torch'}")

    # ---- (b) GEMM throughput (re-measured next to every timed scan: on a shared machine the bound is the
    # best figure seen, taken under the same conditions as the kernel's best time)
    print("\n(b) float32 torch.mm throughput (each figure: best of 7):")
    gemm_seen = [gemm_gflops(2048, 2048, 2048)]
    bq, br = kernel.BLOCK_Q, kernel.BLOCK_R
    feat = next(iter(keys.values())).features.shape[1]
    g_logits = gemm_gflops(bq, feat, br, transposed_b=True)
    g_values = gemm_gflops(bq, br, channels + 1, transposed_b=True)
    print(f"    kernel's logits-block GEMM ({bq}x{feat}) @ ({feat}x{br}): {g_logits:7.1f} GFLOP/s (cache-warm operands)")
    print(f"    kernel's values-block GEMM ({bq}x{br}) @ ({br}x{channels + 1}): {g_values:7.1f} GFLOP/s (cache-warm operands)")

    # ---- (a) kernel scan
    def run_scan(stats=(), **blocks):
        return scan(keys, plan, qset, stats, **blocks)

    run_scan()  # warm-up (allocations, thread pool)
    times, part = [], None
    for _ in range(args.repeat):
        gemm_seen.append(gemm_gflops(2048, 2048, 2048))
        t, _, part = best_of(run_scan, 1)
        times.append(t)
    gemm_seen.append(gemm_gflops(2048, 2048, 2048))
    peak = max(gemm_seen)
    print(f"    2048x2048 @ 2048x2048, measured {len(gemm_seen)} times around the scans: "
          f"{', '.join(f'{g:.1f}' for g in gemm_seen)} GFLOP/s")
    print(f"    GEMM bound used in (c) = best = {peak:.1f} GFLOP/s")
    best = min(times)
    rate = pairs / best
    ratio = rate * useful / (peak * 1e9)
    print(f"\n(a) kernel scan, float32, mean only, BLOCK_Q={bq}, BLOCK_R={br}:")
    print(f"    times {', '.join(f'{t:.3f}' for t in times)} s; best {best:.3f} s "
          f"(median {statistics.median(times):.3f} s)")
    print(f"    pairs/s = {rate:.3e}   ({rate * useful / 1e9:.1f} useful GFLOP/s)")
    print(f"(c) ratio to the GEMM bound = {rate:.3e} x {useful} / {peak * 1e9:.3e} = {100 * ratio:.1f} %"
          f"   [target >= 60 %: {'PASS' if ratio >= 0.6 else 'FAIL'}]")
    if not args.no_stats:
        best_s, times_s, _ = best_of(lambda: run_scan(("variance", "ess")), max(1, args.repeat - 1))
        rate_s = pairs / best_s
        ratio_s = rate_s * useful / (peak * 1e9)
        print(f"    with variance + ess: times {', '.join(f'{t:.3f}' for t in times_s)} s; pairs/s = {rate_s:.3e}, "
              f"{100 * ratio_s:.1f} % of the bound (same useful-flop count)   "
              f"[target >= 50 %: {'PASS' if ratio_s >= 0.5 else 'FAIL'}]")
    kernel_mean = finalize(part, n_rows)["mean"]

    # ---- optional block-size sweep
    for spec in filter(None, (s.strip() for s in args.blocks.split(","))):
        sq, sr = (int(v) for v in spec.lower().split("x"))
        sweep = functools.partial(run_scan, block_q=sq, block_r=sr)
        sweep()
        b, ts, _ = best_of(sweep, args.repeat)
        r = pairs / b
        print(f"    blocks {sq:>5}x{sr:<6} ({sq * sr * 4 / 2 ** 20:6.1f} MiB logits): best {b:.3f} s, "
              f"pairs/s = {r:.3e}, {100 * r * useful / (peak * 1e9):.1f} % of the bound "
              f"(times {', '.join(f'{t:.2f}' for t in ts)})")

    # ---- (d) straightforward version
    if not args.no_naive:
        del keys
        gc.collect()
        bank_keys = naive_patches(train.to(torch.float32))  # (R, d)
        bank_values = train.to(torch.float32).flatten(2).transpose(1, 2).reshape(-1, channels).contiguous()
        q = naive_patches(z.to(torch.float32))
        m = n_q_img * POSITIONS
        naive_mean(q[:args.naive_chunk], bank_keys, bank_values, args.sigma, args.naive_chunk)  # warm-up
        best_n, times_n, mean_n = best_of(
            lambda: naive_mean(q, bank_keys, bank_values, args.sigma, args.naive_chunk), args.naive_repeat)
        naive_pairs = m * bank_keys.shape[0]
        rate_n = naive_pairs / best_n
        diff = (mean_n - kernel_mean.reshape(mean_n.shape)).abs().max().item()
        speedup = rate / rate_n
        print(f"\n(d) straightforward (cdist + softmax over all {bank_keys.shape[0]:,} rows + w @ values, "
              f"query chunk {args.naive_chunk}):")
        print(f"    times {', '.join(f'{t:.3f}' for t in times_n)} s; pairs/s = {rate_n:.3e}")
        print(f"    kernel speed-up = {speedup:.2f}x   [target >= 3x: {'PASS' if speedup >= 3 else 'FAIL'}]")
        print(f"    max |mean_kernel - mean_straightforward| = {diff:.2e} (both float32; values in [0, 1])")
        if args.check > 0:  # which of the two float32 results is accurate: an exact float64 reference
            del bank_keys, bank_values
            gc.collect()
            n_check = min(args.check, m)
            keys64 = naive_patches(train)
            center = keys64[:POSITIONS * min(n_img, 64)].mean(dim=0)
            keys64 -= center
            values64 = train.flatten(2).transpose(1, 2).reshape(-1, channels)
            exact = naive_mean(naive_patches(z)[:n_check] - center, keys64, values64, args.sigma, 16)
            err_k = (kernel_mean[:n_check].to(torch.float64) - exact).abs().max().item()
            err_n = (mean_n[:n_check].to(torch.float64) - exact).abs().max().item()
            print(f"    float64 reference on the first {n_check} queries: max error kernel {err_k:.2e}, "
                  f"straightforward {err_n:.2e}")

    print("\nsummary: pairs/s = {:.3e}; GEMM = {:.1f} GFLOP/s; ratio = {:.1f} %{}{}".format(
        rate, peak, 100 * ratio, "" if args.no_stats else f"; with variance + ess {100 * ratio_s:.1f} %",
        "" if args.no_naive else f"; speed-up over straightforward = {speedup:.2f}x"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
