"""Full-size dress rehearsal on one machine: Fashion-MNIST- and CIFAR-10-shaped stand-ins through ``lemmse``.

    python benchmarks/full_size.py --data /tmp/standins --out /tmp/full [--sets fashion-mnist cifar10]
                                   [--patch-sizes 5 9] [--n-queries 64] [--spot-pixels 200]

The stand-ins have the real datasets' sizes and file formats, not their content: 60,000 + 10,000 grayscale
28×28 images written as Fashion-MNIST IDX files, 50,000 + 10,000 RGB 32×32 images written as CIFAR-10 binary
batches, each a seeded random crop of scikit-image's bundled photographs (grayscale: ITU-R 601 luma), so the
package's own loaders read them (``--dataset fashion-mnist|cifar10 --root``).  For each set and patch size
(denoising, zero padding, σ = 0.1, float32, every training image in the bank, ``--n-queries`` query images
per split, the main job's other defaults) it runs ``lemmse plan``, ``lemmse build-bank`` and ``lemmse
estimate`` as a user would (local Ray, all cores) and prints: each step's wall time, the estimate step's wall time (``timings.json``; the command's in brackets), the peak resident memory
of the process tree (the CLI, Ray and its workers), the bank's size on disk, ``lemmse plan``'s predicted
estimate time against the measured one (and the prediction the estimate step prints once its actors have
started and calibrated), and a spot check: ``--spot-pixels`` random query pixels of the test
split recomputed here in float64 (every training patch of the pixel's class, explicit distances, no code of
the package) against the stored means.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

SETS = {"fashion-mnist": (60_000, 10_000, 1, 28), "cifar10": (50_000, 10_000, 3, 32)}
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")  # the photos dataset's split
TEST_PHOTOS = ("coffee", "chelsea")
SIGMA = 0.1


def photo(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())[..., :3]


def crops(names: tuple[str, ...], n: int, size: int, gray: bool, seed: int) -> np.ndarray:
    """(n, size, size, C) uint8: seeded random crops of the photographs ``names``."""
    gen = np.random.default_rng(seed)
    images = [photo(name) for name in names]
    out = np.empty((n, size, size, 1 if gray else 3), dtype=np.uint8)
    which = gen.integers(len(images), size=n)
    for i in range(n):
        image = images[which[i]]
        top, left = gen.integers(image.shape[0] - size + 1), gen.integers(image.shape[1] - size + 1)
        tile = image[top:top + size, left:left + size].astype(np.float64)
        out[i] = np.rint(tile @ [0.299, 0.587, 0.114])[..., None] if gray else tile
    return out


def write_standin(root: Path, name: str) -> None:
    """The stand-in ``name`` under ``root/name`` in its dataset's file format (skipped when present)."""
    n_train, n_test, channels, size = SETS[name]
    folder = root / name
    marker = folder / "complete"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gray = channels == 1
    train = crops(TRAIN_PHOTOS, n_train, size, gray, seed=1)
    test = crops(TEST_PHOTOS, n_test, size, gray, seed=2)
    if name == "fashion-mnist":
        for prefix, images in (("train", train), ("t10k", test)):
            header = struct.pack(">IIII", 0x00000803, len(images), size, size)
            (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
            labels = struct.pack(">II", 0x00000801, len(images)) + bytes(len(images))
            (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    else:
        batches = folder / "cifar-10-batches-bin"
        batches.mkdir(exist_ok=True)
        planes = lambda images: images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # noqa: E731
        records = lambda images: np.concatenate([np.zeros((len(images), 1), np.uint8), planes(images)], axis=1)  # noqa: E731
        for b in range(5):
            (batches / f"data_batch_{b + 1}.bin").write_bytes(records(train[b * 10_000:(b + 1) * 10_000]).tobytes())
        (batches / "test_batch.bin").write_bytes(records(test).tobytes())
    marker.write_text("ok")


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        rss[int(entry.name)] = int(found.group(1)) * 1024 if found else 0
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak resident bytes of the process tree, stdout) of ``lemmse argv``."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lemmse_ray.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"lemmse {' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, peak[0], out


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def spot_check(group: zarr.Group, train: torch.Tensor, patch_size: int, n_pixels: int, seed: int) -> float:
    """max |stored mean − float64 LE-MMSE| over ``n_pixels`` random query pixels: zero-padded patches, a pixel
    meets the training patches of its own padding pattern (denoising), softmax of −‖q − k‖²/2σ² in float64."""
    z = torch.from_numpy(group["z"][...]).to(torch.float64)
    mean = group["mean"][...]
    n, channels, height, width = z.shape
    half = patch_size // 2
    gen = np.random.default_rng(seed)
    picks = [(int(gen.integers(n)), int(gen.integers(height)), int(gen.integers(width))) for _ in range(n_pixels)]

    def pattern(r: int, c: int) -> tuple[int, int, int, int]:
        return min(r, half), min(height - 1 - r, half), min(c, half), min(width - 1 - c, half)

    by_pattern: dict[tuple, list[tuple[int, int, int]]] = {}
    for b, r, c in picks:
        by_pattern.setdefault(pattern(r, c), []).append((b, r, c))
    worst = 0.0
    for key, pixels in by_pattern.items():
        positions = torch.tensor([r * width + c for r in range(height) for c in range(width) if pattern(r, c) == key])
        zq = F.unfold(F.pad(z, (half,) * 4), patch_size)  # (n, d, H·W)
        queries = torch.stack([zq[b, :, r * width + c] for b, r, c in pixels])  # (m, d)
        m_run = torch.full((len(pixels),), -torch.inf, dtype=torch.float64)
        l_run = torch.zeros(len(pixels), dtype=torch.float64)
        o_run = torch.zeros((len(pixels), channels), dtype=torch.float64)
        centre = (patch_size * patch_size) // 2
        for lo in range(0, train.shape[0], 1000):
            chunk = train[lo:lo + 1000].to(torch.float64)
            keys = F.unfold(F.pad(chunk, (half,) * 4), patch_size)[:, :, positions]  # (k, d, |pos|)
            keys = keys.permute(0, 2, 1).reshape(-1, keys.shape[1])
            values = keys.reshape(len(keys), channels, -1)[:, :, centre]
            d2 = (queries * queries).sum(1)[:, None] + (keys * keys).sum(1)[None] - 2 * queries @ keys.T
            logits = -d2 / (2 * SIGMA * SIGMA)
            m_new = torch.maximum(m_run, logits.max(1).values)
            weights = torch.exp(logits - m_new[:, None])
            scale = torch.exp(m_run - m_new)
            l_run = l_run * scale + weights.sum(1)
            o_run = o_run * scale[:, None] + weights @ values
            m_run = m_new
        reference = o_run / l_run[:, None]
        for i, (b, r, c) in enumerate(pixels):
            worst = max(worst, float(np.abs(mean[b, :, r, c] - reference[i].numpy()).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder for the stand-in datasets")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs (one per set and P)")
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    parser.add_argument("--patch-sizes", nargs="+", type=int, default=[5, 9])
    parser.add_argument("--n-queries", type=int, default=64, help="query images per split")
    parser.add_argument("--spot-pixels", type=int, default=200)
    parser.add_argument("--n-train", type=int, default=None, help="bank images (default: the whole training set)")
    args = parser.parse_args()

    from lemmse_ray.data.loaders import load_dataset

    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    print(f"machine: {os.cpu_count()} CPUs; {model.group(1) if model else 'unknown CPU'}")
    print("| set | P | bank build | bank on disk | estimate | `lemmse plan` predicted | predicted / measured | "
          "the step's own prediction (on its actors) | peak memory | spot check max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sets:
        write_standin(args.data, name)
        n_train = args.n_train or SETS[name][0]
        train = load_dataset(name, "train", root=args.data / name)[:n_train]
        for p in args.patch_sizes:
            out = args.out / f"{name}-p{p}"
            flags = ["--dataset", name, "--root", str(args.data / name), "--n-train", str(n_train), "--subset", "first",
                     "--n-queries",
                     str(args.n_queries), "--patch-size", str(p), "--padding", "zeros", "--sigmas", str(SIGMA),
                     "--out", str(out)]
            _, _, text = run(["plan", *flags])
            predicted = float(re.search(r"predicted estimate time ([0-9.]+) s", text).group(1))
            build_s, build_peak, _ = run(["build-bank", *flags])
            command_s, estimate_peak, text = run(["estimate", *flags])
            own = float(re.search(r"predicted estimate time ([0-9.]+) s", text).group(1))
            estimate_s = json.loads((out / "timings.json").read_text())["estimate"]["seconds"]  # the step alone
            group = zarr.open_group(str(out / "estimates" / f"test_sigma{SIGMA}.zarr"), mode="r")
            worst = spot_check(group, train, p, args.spot_pixels, seed=p)
            print(f"| {name} ({n_train:,} × {tuple(train.shape[1:])}) | {p} | {build_s:.0f} s | "
                  f"{disk_bytes(out / 'bank.zarr') / 1e6:.0f} MB | {estimate_s:.0f} s ({command_s:.0f} s command) | "
                  f"{predicted:.0f} s | "
                  f"{predicted / estimate_s:.2f} | {own:.0f} s ({own / estimate_s:.2f}) | "
                  f"{max(build_peak, estimate_peak) / 2**30:.1f} GiB | {worst:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
