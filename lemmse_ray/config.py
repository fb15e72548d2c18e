"""Run configuration: one dataclass, loadable from YAML and overridable by command-line flags.

Every field has a default that runs on the embedded data; ``lemmse run --help`` lists them with their help.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .kernel import STATS


@dataclass
class Config:
    # data
    dataset: str = field(default="photos", metadata={"help": "photos | faces | digits (embedded, offline) | "
                                                             "fashion-mnist | cifar10 | ffhq32 | folder (need --root)"})
    root: str | None = field(default=None, metadata={"help": "folder/file with the dataset's files"})
    grayscale: bool | None = field(default=None, metadata={"help": "convert to one luminance channel"})
    size: int | None = field(default=None, metadata={"help": "image size (tile size for photos)"})
    n_train: int | None = field(default=None, metadata={"help": "use the first N training images (default all)"})
    n_queries: int = field(default=8, metadata={"help": "query images per split (train and test)"})
    # problem
    problem: str = field(default="denoising", metadata={"help": "denoising | inpainting | deblurring"})
    input: str = field(default="direct", metadata={"help": "direct (agnostic) | adjoint | pinv | tikhonov (aware)"})
    mask: str = field(default="random", metadata={"help": "inpainting masks: random (iid per image) | fixed"})
    keep_prob: float = field(default=0.7, metadata={"help": "inpainting keep-probability"})
    blur_size: int = field(default=5, metadata={"help": "deblurring: Gaussian kernel size (odd)"})
    blur_std: float = field(default=1.0, metadata={"help": "deblurring: Gaussian kernel std (pixels)"})
    reg: float = field(default=0.01, metadata={"help": "Tikhonov regularisation λ"})
    threshold: float = field(default=0.01, metadata={"help": "pseudo-inverse spectral threshold"})
    sigmas: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "noise levels σ"})
    # estimator
    patch_size: int = field(default=5, metadata={"help": "receptive field P (odd)"})
    padding: str = field(default="zeros", metadata={"help": "zeros | circular"})
    candidates: str = field(default="all", metadata={"help": "all | interior (circular only)"})
    stats: list[str] = field(default_factory=lambda: ["variance", "ess", "max_weight", "entropy", "log_evidence",
                                                      "topk"], metadata={"help": f"statistics, from {STATS}"})
    topk: int = field(default=5, metadata={"help": "top-k attribution size"})
    dtype: str = field(default="float32", metadata={"help": "float32 | float64"})
    # networks and training (one network per name and σ)
    networks: list[str] = field(default_factory=lambda: ["patchmlp", "resnet"],
                                metadata={"help": "networks to train: patchmlp | resnet | unet"})
    hidden: int = field(default=256, metadata={"help": "PatchMLP hidden width"})
    width: int = field(default=64, metadata={"help": "ResNet / U-Net width"})
    epochs: int = field(default=8, metadata={"help": "training epochs"})
    steps_per_epoch: int = field(default=100, metadata={"help": "optimizer steps per epoch"})
    batch_size: int = field(default=32, metadata={"help": "training images per step (over all workers)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (cosine schedule to 0)"})
    n_workers: int = field(default=1, metadata={"help": "Ray Train data-parallel workers"})
    use_gpu: bool = field(default=False, metadata={"help": "train on GPU workers"})
    cpus_per_worker: int | None = field(default=None, metadata={"help": "CPUs per training worker (default: "
                                                                        "the free CPUs shared among the workers)"})
    # execution
    shard_rows: int = field(default=1 << 16, metadata={"help": "bank rows per Zarr shard (unit of work)"})
    n_actors: int | None = field(default=None, metadata={"help": "estimation actors (default: GPUs, else CPUs)"})
    batch_images: int = field(default=4, metadata={"help": "query images per batch"})
    seed: int = field(default=0, metadata={"help": "seed of the query noise/mask draws"})
    out: str = field(default="results/quickstart", metadata={"help": "output folder or URL"})
    bank: str | None = field(default=None, metadata={"help": "bank URL (default: <out>/bank.zarr)"})
    storage_options: dict | None = field(default=None, metadata={"help": "fsspec options for URLs (YAML only)"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing results with another config"})

    @property
    def bank_url(self) -> str:
        return self.bank or join(self.out, "bank.zarr")


def join(base: str, *parts: str) -> str:
    """Join a local path or URL with sub-paths."""
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else str(Path(base, *parts))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--patch-size``), plus ``--config file.yaml``."""
    parser.add_argument("--config", help="YAML file with any of the fields below (flags override it)")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name == "storage_options":
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, nargs="+", type=item, default=None, help=help_text)
        else:
            base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            parser.add_argument(flag, type=base[0], default=None, help=help_text)


def from_args(args: argparse.Namespace) -> Config:
    """Defaults ← YAML file ← flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {args.config} must hold a mapping of field: value")
        unknown = set(loaded) - {f.name for f in dataclasses.fields(Config)}
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)} in {args.config}")
        values.update(loaded)
    for f in dataclasses.fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return Config(**values)
