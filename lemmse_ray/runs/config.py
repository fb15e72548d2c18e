"""Run configuration: one dataclass, loadable from YAML and overridable by command-line flags.

Every field has a default that runs on the embedded data; ``lemmse run --help`` lists them with their help.
A :class:`Config` is validated when it is built, before Ray starts or anything is written: types are taken
strictly (a boolean only from a boolean, a list only from a list, an integer never from a float or a
boolean; a number may come from a string such as ``1e-3``, which YAML 1.1 reads as a string), then ranges,
choices and duplicates, then the rules that tie fields together.  A violation raises :class:`ConfigError`
(a ``ValueError``) naming the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.problems import INPUT_MODES
from ..core.statistics import STATS
from ..kernels.resolver import KERNELS, check_kernel
from ..core.validation import CANDIDATES, DTYPES, PADDINGS, check_noise_level
from ..data.loaders import DATASETS, EMBEDDED
from ..models.networks import NETWORKS
from ..storage.inputs import read_yaml

PROBLEMS = ("denoising", "inpainting", "deblurring")
# The largest seed.  torch's generators take seeds in [0, 2**64); the noise and mask draws are seeded with
# seed * 1_000_003 + 1009 * split + σ index (lemmse_ray.runs.pipeline.query_seed), and 1_000_003 < 2**20, so
# every seed below 2**44 keeps that below 2**64 for any number of σ a run can hold.  Also below 2**63: the
# study tables store the seed as a Parquet int64.
MAX_SEED = 2**44 - 1


def _field(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with its help text and validation rules (``choices``, ``min``, ``gt``, ``max``,
    ``odd``, ``unique``), as metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class Config:
    # data
    dataset: str = _field("photos", "dataset: the embedded photos, faces and digits work offline; the others "
                                    "need --root", choices=DATASETS)
    root: str | None = _field(None, "folder or file holding the dataset's files (file datasets only)",
                              metavar="PATH")
    grayscale: bool | None = _field(None, "convert to one luminance channel (--no-grayscale: three channels; "
                                          "unset: the dataset's own)")
    size: int | None = _field(None, "image size in pixels (tile size for photos; unset: the dataset's own)",
                              min=1, max=4096)
    n_train: int | None = _field(None, "number of training images (unset: all)", min=1)
    subset: str = _field("random", "training images: a seeded random subset (nested: a smaller one is a prefix "
                                   "of a larger one) or the first n_train", choices=("random", "first"))
    n_queries: int = _field(8, "query images per split: the first n_queries training images, and seeded "
                               "random test images", min=1)
    # problem
    problem: str = _field("denoising", "inverse problem", choices=PROBLEMS)
    input: str = _field("direct", "estimator input: direct (physics-agnostic) or an approximate inverse "
                                  "(physics-aware)", choices=INPUT_MODES)
    mask: str = _field("random", "inpainting masks: random (iid per image) or fixed (one seeded mask)",
                       choices=("random", "fixed"))
    keep_prob: float = _field(0.7, "inpainting keep-probability", gt=0.0, max=1.0)
    blur_size: int = _field(5, "deblurring: Gaussian kernel size (odd)", min=1, odd=True)
    blur_std: float = _field(1.0, "deblurring: Gaussian kernel std, in pixels", gt=0.0)
    reg: float = _field(0.01, "Tikhonov regularisation λ", min=0.0)
    threshold: float = _field(0.01, "pseudo-inverse spectral threshold", min=0.0)
    sigmas: list[float] = _field([0.1], "noise levels σ (data range 1)", gt=0.0, unique=True, nonempty=True)
    # estimator
    patch_size: int = _field(5, "receptive field P in pixels (odd)", min=1, odd=True)
    padding: str = _field("zeros", "boundary rule of patches and networks", choices=PADDINGS)
    candidates: str = _field("all", "bank positions (interior: circular padding only)", choices=CANDIDATES)
    stats: list[str] = _field(["variance", "ess", "max_weight", "entropy", "log_evidence"],
                              "statistics stored beside the estimate (add topk for the top-k attribution: it "
                              "needs the matrix product, several times slower than the sliding-window kernel)",
                              choices=STATS, unique=True)
    topk: int = _field(5, "top-k attribution size", min=1, max=1024)
    dtype: str = _field("float32", "kernel arithmetic", choices=tuple(DTYPES))
    kernel: str = _field("auto", "kernel backend of the estimation: auto (the fastest that applies), torch "
                                 "(matrix product), sliding (the sliding-window kernel: CPU, float32, no top-k) or triton (CUDA)",
                         choices=KERNELS)
    # networks and training (one network per name and σ)
    networks: list[str] = _field(["patchmlp", "resnet"], "networks to train (one per name and σ)",
                                 choices=NETWORKS, unique=True)
    hidden: int = _field(256, "PatchMLP hidden width", min=1, max=65536)
    width: int = _field(64, "ResNet / U-Net width", min=1, max=4096)
    epochs: int = _field(8, "training epochs", min=1)
    steps_per_epoch: int = _field(100, "optimizer steps per epoch", min=1)
    batch_size: int = _field(32, "training images per step (over all workers)", min=1)
    lr: float = _field(1e-3, "Adam learning rate (cosine schedule to 0)", gt=0.0)
    n_workers: int = _field(1, "Ray Train data-parallel workers", min=1)
    use_gpu: bool = _field(False, "train on GPU workers")
    cpus_per_worker: int | None = _field(None, "CPUs per training worker (unset: the free CPUs shared among "
                                               "the workers)", min=1)
    # execution
    shard_rows: int = _field(1 << 16, "bank rows per Zarr shard, rounded down to whole images (the unit of work)",
                             min=1)
    n_actors: int | None = _field(None, "estimation actors (unset: one per GPU, else one per CPU)", min=1)
    batch_images: int = _field(4, "query images per batch", min=1)
    actor_memory_mb: int | None = _field(None, "MB of key features an estimation actor keeps in memory; past it "
                                               "the actor streams its shards from the store for every query batch "
                                               "(unset: 80 percent of its GPU's free memory, or half the host's "
                                               "available memory per CPU)", min=0)
    seed: int = _field(0, "seed of the training subset, the test queries and the noise and mask draws", min=0,
                       max=MAX_SEED)
    out: str = _field("results/quickstart", "output folder or URL", metavar="URL")
    bank: str | None = _field(None, "bank URL (unset: <out>/bank.zarr)", metavar="URL")
    storage_options: dict | None = _field(None, "fsspec options for URLs (YAML only; never written to outputs)")
    overwrite: bool = _field(False, "replace this project's results of another configuration")

    def __post_init__(self) -> None:
        hints = _hints()
        for f in dataclasses.fields(self):
            value = _coerce(f.name, hints[f.name], getattr(self, f.name))
            _check_rules(f.name, value, f.metadata)
            object.__setattr__(self, f.name, value)
        self._check_together()

    def _check_together(self) -> None:
        if self.dataset in EMBEDDED and self.root is not None:
            raise ConfigError("root", f"must be unset for the embedded dataset {self.dataset!r}")
        if self.dataset not in EMBEDDED and self.root is None:
            raise ConfigError("root", f"is required for dataset {self.dataset!r}: the folder holding its files")
        if self.candidates == "interior" and self.padding != "circular":
            raise ConfigError("candidates", "interior needs padding circular")
        if self.input == "tikhonov" and self.reg == 0:
            raise ConfigError("reg", "must be > 0 for input tikhonov")
        if self.batch_size % self.n_workers:
            raise ConfigError("batch_size", f"must be a multiple of n_workers={self.n_workers}, got "
                                            f"{self.batch_size}")
        if not self.out.strip():
            raise ConfigError("out", "must not be empty")
        try:
            check_kernel(self.kernel, DTYPES[self.dtype])
        except ValueError as err:
            raise ConfigError("kernel", str(err).removeprefix(f"kernel={self.kernel!r} ")) from None
        for sigma in self.sigmas:
            try:
                check_noise_level(sigma, DTYPES[self.dtype])
            except ValueError as err:
                raise ConfigError("sigmas", "value " + str(err).removeprefix("sigma=")) from None

    @property
    def bank_url(self) -> str:
        return self.bank or join(self.out, "bank.zarr")


@functools.cache
def _hints() -> dict[str, Any]:
    """The field types of :class:`Config`, resolved once (resolving them took most of the time of building a
    Config, which a study does once per cell)."""
    return typing.get_type_hints(Config)


class ConfigError(ValueError):
    """An invalid configuration field; ``str`` names the field as the library does (``patch_size must …``)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem

    def named(self, label: str) -> "ConfigError":
        """The same error with the field shown as ``label`` (a flag, or the field in a YAML file)."""
        err = ConfigError(self.name, self.problem)
        err.args = (f"{label} {self.problem}",)
        return err


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """``value`` as type ``kind``, strictly (see the module docstring)."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"must be a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return [_coerce(name, item, v) for v in value]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value
    if kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(name, "must be a mapping with string keys")
        return value
    raise TypeError(f"unsupported config type {kind} for {name}")


def _check_rules(name: str, value: Any, rules: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    if rules.get("nonempty") and not items:
        raise ConfigError(name, "must not be empty")
    if rules.get("unique") and len(set(items)) != len(items):
        repeated = sorted({v for v in items if items.count(v) > 1}, key=str)
        raise ConfigError(name, f"must not repeat values, got {', '.join(map(str, repeated))} twice")
    for v in items:
        if "choices" in rules and v not in rules["choices"]:
            raise ConfigError(name, f"must be one of {', '.join(rules['choices'])}, got {v!r}")
        if "min" in rules and v < rules["min"]:
            raise ConfigError(name, f"must be >= {rules['min']}, got {v!r}")
        if "gt" in rules and v <= rules["gt"]:
            raise ConfigError(name, f"must be > {rules['gt']}, got {v!r}")
        if "max" in rules and v > rules["max"]:
            raise ConfigError(name, f"must be <= {rules['max']}, got {v!r}")
        if rules.get("odd") and v % 2 == 0:
            raise ConfigError(name, f"must be odd, got {v!r}")


def join(base: str, *parts: str) -> str:
    """Join a local path or URL with sub-paths."""
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else str(Path(base, *parts))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--patch-size``), plus ``--config file.yaml``.

    Flags default to None (unset), so that a YAML file's values are overridden only by flags given; the
    help shows the dataclass default.  Types and choices are checked by :class:`Config`, which names the flag.
    """
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the fields below, by their "
                                                              "field names (patch_size: 5); flags override it")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name == "storage_options":
            continue
        kind = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = f.metadata["help"] + ("" if default is None else f" (default: {shown})")
        metavar = "{" + ",".join(choices) + "}" if choices else f.metadata.get("metavar")
        if kind in (bool, bool | None):
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            parser.add_argument(flag(f.name), nargs="+", type=_flag_type(f.name, item), default=None,
                                metavar=metavar or item.__name__.upper(), help=help_text)
        else:
            base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            parser.add_argument(flag(f.name), type=_flag_type(f.name, base[0]), default=None,
                                metavar=metavar or base[0].__name__.upper(), help=help_text)


def _flag_type(name: str, kind: type):
    """argparse ``type=``: parse the text as ``kind``, with an error that names the flag."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
    return parse if kind in (int, float) else kind


def from_args(args: argparse.Namespace) -> Config:
    """Defaults ← YAML file ← flags, validated; errors name the flag or the YAML field they came from."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    path = getattr(args, "config", None)
    if path:
        loaded = read_yaml(path, "--config")  # capped: size, alias expansion, nesting
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ValueError(f"--config: {path} must hold a mapping of field: value")
        unknown = sorted(set(loaded) - {f.name for f in dataclasses.fields(Config)}, key=str)
        if unknown:
            raise ValueError(f"--config: unknown fields {', '.join(map(str, unknown))} in {path}")
        values.update(loaded)
        source.update({name: f"{name} in {path}" for name in loaded})
    for f in dataclasses.fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
            source[f.name] = flag(f.name)
    try:
        return Config(**values)
    except ConfigError as err:
        raise err.named(source.get(err.name, err.name)) from None
