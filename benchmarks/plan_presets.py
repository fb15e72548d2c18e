"""The plan (``lemmse plan``'s counts and predicted time) of the full-size presets on 8 GPUs of ``cluster.yaml``.

    python benchmarks/plan_presets.py [--pairs-per-s-scale 1.0]

No cluster is needed: the counts are exact (:func:`lemmse_ray.cluster.plan.count`, denoising, zero padding, every
position a candidate, float32, 8 actors, 4 query images per batch, shards of 65,536 rows), and the time uses an
*assumed* calibration, not a measured one (printed first): per actor (one NVIDIA A10G, g5.xlarge) the kernel at
50 % of a 25 TFLOP/s float32 GEMM bound, i.e. 12.5e12 / (2 (d + C + 1)) pairs/s; the store read at 200 MB/s
per actor; 0.5 s of driver overhead per batch.  Replace them with ``lemmse plan``'s figures measured on the
cluster.  Two query sets: the main job's 16 images (8 per split, batches of 4), and 10,000 test images in
batches of 64 (pairs per image are the same for every image under denoising, so those counts follow from the
first's).
"""
from __future__ import annotations

import argparse

import torch

import lemmse_ray as lm
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.core.patches import PatchGeometry
from lemmse_ray.cluster.plan import count, predict

PRESETS = {"CIFAR-10": (50_000, (3, 32, 32)), "FFHQ-32": (60_000, (3, 32, 32)), "FashionMNIST": (60_000, (1, 28, 28))}
GEMM_FLOPS, KERNEL_FRACTION, READ_MB_S, BATCH_OVERHEAD_S, ACTORS, LARGE_BATCH = 25e12, 0.5, 200.0, 0.5, 8, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs-per-s-scale", type=float, default=1.0, help="multiply the assumed pairs/s")
    args = parser.parse_args()
    print(f"assumed calibration: {KERNEL_FRACTION:.0%} of {GEMM_FLOPS / 1e12:.0f} TFLOP/s per A10G actor, store "
          f"read {READ_MB_S:.0f} MB/s per actor, {BATCH_OVERHEAD_S} s per batch, {ACTORS} actors")
    print("| preset | P | bank rows | bank GB | per actor GB (resident) | pairs (16 queries) | predicted "
          "(16 queries) | pairs (10,000 queries) | predicted (10,000 queries) |")
    print("|---|---|---|---|---|---|---|---|---|")
    problem = lm.Denoising()
    for name, (n_images, shape) in PRESETS.items():
        for p in (5, 9):
            plan = plan_classes(problem, PatchGeometry(shape, p, "zeros", "all"))
            z = torch.zeros((8, *shape), dtype=torch.float64)
            got = count(problem, plan, n_images, [(z, None), (z, None)], ACTORS, 4, 1 << 16)
            d = shape[0] * p * p
            calibration = {"pairs_per_s": args.pairs_per_s_scale * KERNEL_FRACTION * GEMM_FLOPS / (2 * (d + shape[0] + 1)),
                           "read_mb_s": READ_MB_S, "batch_overhead_s": BATCH_OVERHEAD_S}
            small = predict(got, calibration)
            per_image = got.pairs // 16
            got.pairs_per_batch = [per_image * min(LARGE_BATCH, 10_000 - lo) for lo in range(0, 10_000, LARGE_BATCH)]
            got.pairs, got.outputs = sum(got.pairs_per_batch), 1
            large = predict(got, calibration)
            print(f"| {name} | {p} | {got.rows:,} | {got.bank_bytes / 1e9:.1f} | {got.actor_bytes / 1e9:.1f} | "
                  f"{16 * per_image:.3g} | {small:.0f} s | {got.pairs:.3g} | {large / 60:.0f} min |")


if __name__ == "__main__":
    main()
