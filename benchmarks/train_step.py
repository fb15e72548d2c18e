#!/usr/bin/env python
"""One training step of each network at the quick presets' sizes: where the studies' training time goes.

    python benchmarks/train_step.py [--steps 20] [--runs 3]

Workload: the quick presets' networks (``presets/sizes.yaml``: PatchMLP hidden 96, ResNet and U-Net width 24,
receptive field P = 5), one grayscale 28×28 batch of 32 images, MSE loss, Adam; a step is forward, backward
and the optimizer update, as in :mod:`lemmse_ray.runs.training`'s loop.  Each network is timed over
``--steps`` steps after 3 warm-up steps, ``--runs`` times interleaved; the median milliseconds per step and
each network's ratio to the ResNet's are printed (a quick preset trains for 100 steps per epoch).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lemmse_ray.models.networks import build_network

NETWORKS = {"patchmlp": {"hidden": 96}, "resnet": {"width": 24}, "unet": {"width": 24}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="runs per network (default 3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(32, 1, 28, 28)
    z = x + 0.1 * torch.randn_like(x)
    steps = {}
    for name, options in NETWORKS.items():
        net = build_network(name, in_channels=1, out_channels=1, patch_size=5, **options)
        steps[name] = (net, torch.optim.Adam(net.parameters(), 1e-3))

    def step(name: str) -> None:
        net, opt = steps[name]
        opt.zero_grad()
        loss = ((net(z) - x) ** 2).mean()
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {name: [] for name in NETWORKS}
    for name in NETWORKS:
        for _ in range(3):
            step(name)
    for _ in range(args.runs):
        for name in NETWORKS:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - t0) / args.steps)
    print(f"batch 32 × 1 × 28 × 28, {torch.get_num_threads()} threads; median of {args.runs} runs of {args.steps} steps")
    base = statistics.median(times["resnet"])
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        print(f"{name}: {ms:.1f} ms per step ({ms / 1000 / base:.2f}× the ResNet's)")


if __name__ == "__main__":
    main()
