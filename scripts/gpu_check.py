#!/usr/bin/env python
"""GPU check of the exact kernels: accuracy against CPU float64, and throughput (not run by CI on a GPU).

Needs torch and Triton only (no Ray, no Zarr); about 5 minutes on one GPU for (a)–(c), a few more for (d)
(its banks are built on the CPU: about 10⁶ rows).

(a) Accuracy.  On ``photos`` cases (32×32 RGB tiles; synthetic smooth images, announced, when scikit-image or
    Pillow is missing) with P = 5 and 9, for the whitened (denoising) and the random-mask aware
    (inpainting, keep-probability 0.7, adjoint input) logit forms: the torch kernel on the device, the Triton
    kernel (``ieee``) and the Triton kernel with ``tf32x3`` products, all float32, against the torch kernel in
    float64 on the CPU.  Per statistic (mean, variance, ess, max_weight, entropy, log_evidence) the error is
    max |x − x_ref| / (|x_ref| + 1); a path fails above ``--tol`` (mean, variance) or ``--tol-log`` (the
    others, which follow the log-weights: at σ = 0.1 the logits reach ~10³, so float32 rounding alone moves
    them by ~10⁻⁴).  The error ratios fused/torch and tf32x3/ieee are reported (target ≤ 2).
(b) Throughput.  Pairs/s (query pixels × bank rows per second) of each path on one class of random features
    of the widths F of those cases, and the same run's float32 ``torch.mm`` throughput with TF32 off; each
    path's fraction of it counts 2(F + C + 1) useful flops per pair (the logit, and the weighted sums of
    [v, 1]).
(c) Split-K.  (b) for 1, 16 and 1024 query pixels against ``--rows`` (default 2²⁰ ≈ 10⁶) bank rows.
(d) The Triton sliding-window kernel (:mod:`lemmse_ray.kernels.triton_sliding`) on the class it evaluates
    (denoising, circular padding, every window a row: ``candidates="all"``).  Accuracy: on the ``photos``
    cases, P = 5 and 9, against the torch kernel in float64 *on the GPU*, the compiled C sliding kernel (CPU)
    beside it, with the tolerances of (a).  Throughput: on ``--sliding-train`` (default 256) smooth 64×64 RGB
    images against one query image, the same work — every window of the query image against every window of
    the bank — by the torch kernel, the fused Triton kernel (ieee and tf32x3) and the Triton sliding kernel:
    pairs/s, the median of ``--sliding-repeat`` (default 5) runs, and the sliding kernel's ratio to each.

It prints the summary tables and exits 1 on any accuracy failure (or when Triton cannot run), 2 without CUDA
unless ``--allow-cpu``: then everything runs on the CPU at tiny sizes with Triton's interpreter, to test the
script itself (its figures mean nothing).

    python scripts/gpu_check.py                 # on a GPU machine
    python scripts/gpu_check.py --allow-cpu     # plumbing test anywhere
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without an install

import torch

NAMES = ("mean", "variance", "ess", "max_weight", "entropy", "log_evidence")
STATS = ("variance", "ess", "entropy")  # finalize adds max_weight and log_evidence
BENCH_STATS = ("variance", "ess")  # the estimator's default statistics
PATHS = ("torch", "triton-ieee", "triton-tf32x3")
SLIDING_PATHS = (*PATHS, "triton-sliding")
TARGETS = "targets: fused ieee ≥ 50 % of GEMM and ≥ 3× torch; tf32x3 ≥ 2× ieee; 16 px ≥ 50 % of 1024 px"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run on the CPU at tiny sizes with Triton's interpreter")
    parser.add_argument("--sigma", type=float, default=0.1, help="noise level of the accuracy cases")
    parser.add_argument("--n-train", type=int, help="training tiles of the accuracy banks (GPU 64, CPU 2)")
    parser.add_argument("--rows", type=int, help="bank rows of the throughput runs (GPU 2^20, CPU 256)")
    parser.add_argument("--queries", type=int, nargs="+", help="query pixels of the throughput runs "
                        "(GPU 1 16 1024, CPU 1 16)")
    parser.add_argument("--repeat", type=int, help="timed repetitions, best kept (GPU 3, CPU 1)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest accepted error of mean and variance")
    parser.add_argument("--tol-log", type=float, default=1e-3,
                        help="largest accepted error of ess, max_weight, entropy, log_evidence")
    parser.add_argument("--sliding-train", type=int,
                        help="bank images of the sliding throughput runs (GPU 256 of 64×64, CPU 2 of 7×7)")
    parser.add_argument("--sliding-repeat", type=int, help="timed runs of (d), median kept (GPU 5, CPU 1)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    for name, on_gpu, on_cpu in (("n_train", 64, 2), ("rows", 1 << 20, 256), ("queries", [1, 16, 1024], [1, 16]),
                                 ("repeat", 3, 1), ("sliding_train", 256, 2), ("sliding_repeat", 5, 1)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up (compilation, caches)
    best = math.inf
    for _ in range(max(1, repeat)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def median_time(fn, device: torch.device, repeat: int) -> float:
    """The median of ``repeat`` timed runs, after one warm-up run (compilation, caches)."""
    fn()
    times = []
    for _ in range(max(1, repeat)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random RGB images (float64), bicubic upsamplings of a coarse grid."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, max(2, size // 4), max(2, size // 4)), generator=gen, dtype=torch.float64)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return smooth.clamp(0, 1)


def images(n_train: int, size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train, test) float64 images: ``photos`` tiles, or smooth synthetic images if its packages are missing."""
    try:
        from lemmse_ray.data.loaders import load_dataset
        return (load_dataset("photos", "train", n=n_train, size=size).double(),
                load_dataset("photos", "test", n=1, size=size).double(), f"photos {size}×{size}")
    except ImportError as err:
        print(f"gpu_check: the photos dataset cannot load here ({err}); using synthetic smooth images")
    smooth = synthetic(n_train + 1, size)
    return smooth[:n_train], smooth[n_train:], f"synthetic smooth {size}×{size}"


def scan_tf32x3(keys, plan, queries, stats):
    """scan() with the Triton kernel in tf32x3 (scan's kernel="triton" is ieee)."""
    from lemmse_ray.core.partials import Partials, merge_into
    from lemmse_ray.core.statistics import sums_of
    from lemmse_ray.kernels.triton_kernel import triton_matmul_partials

    first = next(iter(keys.values())).values
    total = Partials.empty(queries.n, queries.channels, sums_of(stats), 0, first.dtype, first.device)
    for c, ck in keys.items():
        cq = queries.per_class[c]
        if cq is not None:
            merge_into(total, cq.index, triton_matmul_partials(cq.features, ck.features, ck.values, cq.shift, stats,
                                                               precision="tf32x3"))
    return total


def accuracy(args, device: torch.device, cpu: bool) -> tuple[list[dict], dict[str, int]]:
    """(a): one row per (case, path) with the error of each statistic; and the feature widths of the cases."""
    import lemmse_ray as lm
    from lemmse_ray.bank.features import (
        key_features,
        keys_to,
        prepare_queries,
        queries_to,
        scan,
    )
    from lemmse_ray.bank.rows import class_centers, memory_bank
    from lemmse_ray.core.classes import plan_classes
    from lemmse_ray.core.patches import PatchGeometry
    from lemmse_ray.core.statistics import finalize

    size = 9 if cpu else 32  # circular random-mask inpainting needs P ≤ size
    padding = "circular" if cpu else "zeros"  # one class per form on the CPU (fewer interpreted launches)
    train, test, label = images(args.n_train, size)
    print(f"(a) accuracy: {label}, {len(train)} training images, 1 query image, σ = {args.sigma}, {padding} padding")
    rows, widths = [], {}
    gen = torch.Generator().manual_seed(0)
    for form, problem in (("whitened", lm.Denoising()), ("masked", lm.Inpainting(keep_prob=0.7, input="adjoint"))):
        _, z, mask = problem.measure(test, args.sigma, gen)
        for p in (5, 9):
            plan = plan_classes(problem, PatchGeometry(tuple(train.shape[1:]), p, padding))
            centers = class_centers(train, problem, plan)
            arrays = memory_bank(train, problem, plan, centers)
            keys64 = key_features(arrays, plan, centers)
            widths[f"{form} P={p}"] = max(k.features.shape[1] for k in keys64.values())
            ref = finalize(scan(keys64, plan, prepare_queries(z, mask, problem, plan, centers, args.sigma,
                                                              torch.float64), STATS, 0, "torch"), len(arrays))
            keys = keys_to(key_features(arrays.to(torch.float32), plan, centers), device)
            queries = queries_to(prepare_queries(z, mask, problem, plan, centers, args.sigma, torch.float32), device)
            runs = {"torch": partial(scan, keys, plan, queries, STATS, 0, "torch"),
                    "triton-ieee": partial(scan, keys, plan, queries, STATS, 0, "triton"),
                    "triton-tf32x3": partial(scan_tf32x3, keys, plan, queries, STATS)}
            for path, fn in runs.items():
                out = finalize(fn().to(device="cpu"), len(arrays))
                err = {n: float(((out[n].double() - ref[n]).abs() / (ref[n].abs() + 1)).max()) for n in NAMES}
                ok = all(err[n] <= (args.tol if n in ("mean", "variance") else args.tol_log) for n in NAMES)
                rows.append({"case": f"{form} P={p}", "path": path, "rows": len(arrays), **err, "ok": ok})
    return rows, widths


def throughput(args, device: torch.device, widths: dict[str, int], gemm_flops: float) -> list[dict]:
    """(b), (c): pairs/s of each path for each feature width and query count against ``args.rows`` rows."""
    from lemmse_ray.kernels.torch_kernels import matmul_partials
    from lemmse_ray.kernels.triton_kernel import triton_matmul_partials

    channels = 3
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for case, width in widths.items():
        k = torch.randn((args.rows, width), generator=gen, device=device)
        v = torch.rand((args.rows, channels), generator=gen, device=device)
        for n in args.queries:
            q = torch.randn((n, width), generator=gen, device=device) / math.sqrt(width)
            shift = torch.zeros(n, device=device)
            runs = {"torch": partial(matmul_partials, q, k, v, shift, None, BENCH_STATS, 0),
                    "triton-ieee": partial(triton_matmul_partials, q, k, v, shift, BENCH_STATS, "ieee"),
                    "triton-tf32x3": partial(triton_matmul_partials, q, k, v, shift, BENCH_STATS, "tf32x3")}
            for path, fn in runs.items():
                seconds = best_time(fn, device, args.repeat)
                pairs = n * args.rows / seconds
                out.append({"case": case, "F": width, "queries": n, "path": path, "pairs_per_s": pairs,
                            "gemm_fraction": pairs * 2 * (width + channels + 1) / gemm_flops})
        del k, v
    return out


def gemm_throughput(device: torch.device, n: int, repeat: int) -> float:
    """float32 torch.mm flop/s, TF32 off, n × n × n."""
    a = torch.randn((n, n), device=device)
    b = torch.randn((n, n), device=device)
    return 2 * n ** 3 / best_time(lambda: torch.mm(a, b), device, repeat)


def sliding_setup(train: torch.Tensor, z: torch.Tensor, patch: int, sigma: float, device: torch.device):
    """The class the sliding kernel evaluates — denoising, circular padding, every window a row — of ``train`` and
    the query images ``z``, both in the form of each kernel: the in-memory bank (its SlidingRows, on the CPU;
    None without the compiled library, which fixes their layout), the class plan, the bank rows, and a function
    ``dtype → (keys, queries)`` giving the matrix-product form on ``device``."""
    import lemmse_ray as lm
    from lemmse_ray.bank.features import (
        key_features,
        keys_to,
        prepare_queries,
        queries_to,
    )
    from lemmse_ray.bank.rows import class_centers, memory_bank

    problem = lm.Denoising()
    bank = lm.PatchBank(train, problem, patch, "circular", "all")
    centers = class_centers(train, problem, bank.plan)
    arrays = memory_bank(train, problem, bank.plan, centers)

    def matmul_form(dtype: torch.dtype):
        keys = keys_to(key_features(arrays.to(dtype), bank.plan, centers), device)
        return keys, queries_to(prepare_queries(z, None, problem, bank.plan, centers, sigma, dtype), device)

    return bank.sliding, bank.plan, len(arrays), matmul_form


def sliding_blocks(cpu: bool) -> dict[str, int]:
    """The Triton sliding kernel's tile: its defaults on a GPU; in the interpreter, tiles covering the tiny images
    (each interpreted operation costs about 0.3 ms, whatever its size)."""
    return {"block_y": 16, "block_r": 128, "block_t": 64} if cpu else {}


def sliding_accuracy(args, device: torch.device, cpu: bool) -> list[dict] | None:
    """(d) accuracy: one row per (case, path), the Triton sliding kernel and the compiled one against the torch
    kernel in float64 on ``device``; None where the sliding kernel's rows cannot be built here."""
    import lemmse_ray as lm
    from lemmse_ray.bank.features import scan
    from lemmse_ray.core.statistics import finalize
    from lemmse_ray.kernels.resolver import (
        SLIDING_COMPILED,
        SLIDING_TRITON,
        sliding_backend_partials,
    )

    size = 9 if cpu else 32
    train, test, label = images(args.n_train, size)
    _, z, _ = lm.Denoising().measure(test, args.sigma, torch.Generator().manual_seed(1))
    print(f"(d) sliding accuracy: {label}, {len(train)} training images, 1 query image, σ = {args.sigma}, "
          "circular padding, every window a row; reference: torch kernel, float64, on the device")
    out = []
    for p in (3, 5) if cpu else (5, 9):
        rows, plan, n_rows, matmul_form = sliding_setup(train, z, p, args.sigma, device)
        if rows is None:
            print("(d) skipped: the sliding kernel's rows need the compiled sliding library (a C compiler) here")
            return None
        keys64, queries64 = matmul_form(torch.float64)
        ref = finalize(scan(keys64, plan, queries64, STATS, 0, "torch").to(device="cpu"), n_rows)
        runs = {"triton-sliding": partial(sliding_backend_partials, SLIDING_TRITON, rows.to(device), z.to(device),
                                          args.sigma, STATS, **sliding_blocks(cpu)),
                "compiled (CPU)": partial(sliding_backend_partials, SLIDING_COMPILED, rows, z, args.sigma, STATS)}
        for path, fn in runs.items():
            got = finalize(fn().to(dtype=torch.float64, device="cpu"), n_rows)
            err = {n: float(((got[n] - ref[n]).abs() / (ref[n].abs() + 1)).max()) for n in NAMES}
            ok = all(err[n] <= (args.tol if n in ("mean", "variance") else args.tol_log) for n in NAMES)
            out.append({"case": f"sliding P={p}", "path": path, "rows": n_rows, **err, "ok": ok})
    return out


def sliding_throughput(args, device: torch.device, cpu: bool) -> list[dict]:
    """(d) throughput: pairs/s (median of ``args.sliding_repeat`` runs) of every path on the same work, every
    window of one query image against every window of ``args.sliding_train`` bank images."""
    from lemmse_ray.bank.features import scan
    from lemmse_ray.kernels.resolver import SLIDING_TRITON, sliding_backend_partials

    size = 7 if cpu else 64
    data = synthetic(args.sliding_train + 1, size, seed=2)
    train = data[:-1]
    z = data[-1:] + args.sigma * torch.randn(data[-1:].shape, generator=torch.Generator().manual_seed(3),
                                             dtype=torch.float64)
    print(f"(d) sliding throughput: {len(train)} synthetic {size}×{size} RGB images, 1 query image, median of "
          f"{args.sliding_repeat} runs")
    out = []
    for p in (3,) if cpu else (5, 9):
        rows, plan, n_rows, matmul_form = sliding_setup(train, z, p, args.sigma, device)
        if rows is None:
            return out
        keys, queries = matmul_form(torch.float32)
        runs = {"torch": partial(scan, keys, plan, queries, BENCH_STATS, 0, "torch"),
                "triton-ieee": partial(scan, keys, plan, queries, BENCH_STATS, 0, "triton"),
                "triton-tf32x3": partial(scan_tf32x3, keys, plan, queries, BENCH_STATS),
                "triton-sliding": partial(sliding_backend_partials, SLIDING_TRITON, rows.to(device), z.to(device),
                                          args.sigma, BENCH_STATS, **sliding_blocks(cpu))}
        pairs = size * size * n_rows
        for path, fn in runs.items():
            seconds = median_time(fn, device, args.sliding_repeat)
            out.append({"case": f"sliding P={p}", "rows": n_rows, "queries": size * size, "path": path,
                        "seconds": seconds, "pairs_per_s": pairs / seconds})
        del keys, queries, runs
    return out


def sliding_summary(acc: list[dict] | None, speed: list[dict], tol: float, tol_log: float) -> None:
    print("\n(d) the Triton sliding kernel (denoising, circular padding, every window a row)")
    if acc is None:
        print("skipped: no compiled sliding library here (its rows' layout needs it)")
        return
    print(f"accuracy: max |x − x_ref| / (|x_ref| + 1) against the torch kernel in float64 on the device; tol {tol:g} "
          f"(mean, variance), {tol_log:g} (others)")
    print(f"{'case':<16}{'path':<17}" + "".join(f"{n:>13}" for n in NAMES) + "  verdict")
    for r in acc:
        print(f"{r['case']:<16}{r['path']:<17}" + "".join(f"{r[n]:>13.2e}" for n in NAMES)
              + ("  ok" if r["ok"] else "  FAIL"))
    print("throughput, pairs/s (query windows × bank windows per second), the same work on every path")
    print(f"{'case':<16}{'rows':>9}{'queries':>9}" + "".join(f"{p:>16}" for p in SLIDING_PATHS)
          + "".join(f"{'sliding/' + p.replace('triton-', ''):>17}" for p in PATHS))
    cells = {(r["case"], r["path"]): r for r in speed}
    for case in dict.fromkeys(r["case"] for r in speed):
        row = [cells[(case, p)] for p in SLIDING_PATHS]
        sliding = row[-1]["pairs_per_s"]
        print(f"{case:<16}{row[0]['rows']:>9}{row[0]['queries']:>9}"
              + "".join(f"{r['pairs_per_s']:>16.3g}" for r in row)
              + "".join(f"{sliding / r['pairs_per_s']:>17.2f}" for r in row[:-1]))


def summary(acc: list[dict], speed: list[dict], gemm: float, tol: float, tol_log: float) -> None:
    print("\n================ gpu_check summary ================")
    print(f"(a) accuracy: max |x − x_ref| / (|x_ref| + 1) against CPU float64; tol {tol:g} (mean, variance), "
          f"{tol_log:g} (others)")
    print(f"{'case':<16}{'path':<15}" + "".join(f"{n:>13}" for n in NAMES) + "  verdict")
    by = {(r["case"], r["path"]): r for r in acc}
    for r in acc:
        print(f"{r['case']:<16}{r['path']:<15}" + "".join(f"{r[n]:>13.2e}" for n in NAMES)
              + ("  ok" if r["ok"] else "  FAIL"))
    def largest(case: str, path: str) -> float:
        return max(max(by[(case, path)][n] for n in NAMES), 1e-30)

    for case in dict.fromkeys(r["case"] for r in acc):
        print(f"{case:<16}largest error, ieee / torch: {largest(case, 'triton-ieee') / largest(case, 'torch'):.2f}, "
              f"tf32x3 / ieee: {largest(case, 'triton-tf32x3') / largest(case, 'triton-ieee'):.2f} (target ≤ 2)")
    print(f"\n(b, c) throughput, pairs/s; float32 torch.mm (TF32 off) in this run: {gemm / 1e12:.2f} TFLOP/s; "
          "fraction = pairs/s · 2(F + C + 1) / GEMM flop/s")
    print(f"{'case':<16}{'F':>5}{'queries':>9}" + "".join(f"{p:>26}" for p in PATHS) + "   fused/torch  x3/ieee")
    cells = {(r["case"], r["queries"], r["path"]): r for r in speed}
    for case, width in dict.fromkeys((r["case"], r["F"]) for r in speed):
        for n in dict.fromkeys(r["queries"] for r in speed):
            row = [cells[(case, n, p)] for p in PATHS]
            text = "".join(f"{r['pairs_per_s']:>14.3g} ({100 * r['gemm_fraction']:5.1f} %)" for r in row)
            print(f"{case:<16}{width:>5}{n:>9}{text}{row[1]['pairs_per_s'] / row[0]['pairs_per_s']:>13.2f}"
                  f"{row[2]['pairs_per_s'] / row[1]['pairs_per_s']:>9.2f}")
        counts = sorted({r["queries"] for r in speed})
        if 16 in counts and counts[-1] > 16:
            hi = counts[-1]
            ratio = cells[(case, 16, "triton-ieee")]["pairs_per_s"] / cells[(case, hi, "triton-ieee")]["pairs_per_s"]
            print(f"{case:<16}ieee at 16 px / at {hi} px: {ratio:.2f}")
    print(TARGETS)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cpu = not torch.cuda.is_available()
    if cpu and not args.allow_cpu:
        print("gpu_check: CUDA is not available to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing to check. "
              "Run it on a GPU machine, or pass --allow-cpu to test the script on the CPU.", file=sys.stderr)
        return 2
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernel is decorated, i.e. imported below
    try:
        import triton

        from lemmse_ray.kernels import triton_kernel  # noqa: F401
    except ImportError as err:
        print(f"gpu_check: FAILED: Triton cannot be imported ({err})", file=sys.stderr)
        return 1
    device = torch.device("cpu" if cpu else "cuda")
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    name = "CPU, Triton interpreter (--allow-cpu: figures are meaningless)" if cpu else torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}")
    t0 = time.perf_counter()
    acc, widths = accuracy(args, device, cpu)
    print(f"(a) done in {time.perf_counter() - t0:.1f} s")
    gemm = gemm_throughput(device, 512 if cpu else 8192, args.repeat)
    t1 = time.perf_counter()
    speed = throughput(args, device, widths, gemm)
    print(f"(b, c) done in {time.perf_counter() - t1:.1f} s")
    t2 = time.perf_counter()
    sliding_acc = sliding_accuracy(args, device, cpu)
    sliding_speed = sliding_throughput(args, device, cpu) if sliding_acc is not None else []
    print(f"(d) done in {time.perf_counter() - t2:.1f} s")
    summary(acc, speed, gemm, args.tol, args.tol_log)
    sliding_summary(sliding_acc, sliding_speed, args.tol, args.tol_log)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "gemm_flops": gemm, "accuracy": acc,
                                               "throughput": speed, "sliding_accuracy": sliding_acc,
                                               "sliding_throughput": sliding_speed}, indent=2))
    failed = [f"{r['case']} {r['path']}" for r in acc + (sliding_acc or []) if not r["ok"]]
    if failed:
        print(f"gpu_check: FAILED: error above tolerance for {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"gpu_check: OK ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
