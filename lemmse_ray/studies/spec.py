"""Study specifications: a base configuration and a grid of values, expanded into validated cells.

A spec (a YAML file or a built-in preset, :mod:`lemmse_ray.studies.presets`) is a mapping::

    name: my-study
    base:                      # Config fields shared by every cell (lemmse run --help lists them)
      dataset: digits
      n_train: 300
      networks: [patchmlp]
    grid:                      # field -> list of values: the cartesian product of all grid fields
      sigmas: [0.05, 0.2]      # a list-valued field takes one value (or a list) per cell
      patch_size: [3, 5]
    zip:                       # optional: fields that vary together (lists of one length)
      problem: [denoising, deblurring]
      input: [direct, tikhonov]
    figures: [...]             # optional: figures of the report (see lemmse_ray.studies.report)

or, for several experiments in one study, ``parts: [<spec>, ...]`` (each with its own name, base, grid,
zip and figures) beside an optional shared ``base``.  Every combination is one ordinary :class:`Config`,
validated when the spec is read; a configuration with several noise levels ``sigmas`` gives one cell per
σ (cells of one training set and problem share one bank over all σ).  ``out``, ``bank`` and ``overwrite``
are set by the study, never by a spec.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from ..data.datasets import DATASETS, EMBEDDED
from ..models.networks import build_network
from ..runs.config import Config, ConfigError

SPEC_KEYS = ("name", "description", "base", "grid", "zip", "figures", "parts")
RESERVED = ("out", "bank", "overwrite")  # set by the study
FIGURE_KEYS = {"line": ("x", "y", "xlabel", "ylabel"), "bar": ("category", "value", "ylabel"), "binned": ()}
FIELDS = tuple(f.name for f in dataclasses.fields(Config))
_HINTS = typing.get_type_hints(Config)


def is_list_field(name: str) -> bool:
    return typing.get_origin(_HINTS[name]) is list


@dataclass
class Part:
    """One experiment of a study: its base values, grid, zip and report figures."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list]
    zip: dict[str, list]
    figures: list[dict] = field(default_factory=list)
    description: str = ""

    @property
    def varying(self) -> list[str]:
        """Scalar fields that vary over the part's cells, and ``sigma`` when several noise levels are used
        (a varying ``networks`` shows in each row's network)."""
        names = [n for n in (*self.grid, *self.zip) if not is_list_field(n)]
        if "sigmas" in self.grid or "sigmas" in self.zip or len(self.base.get("sigmas", [])) > 1:
            names.append("sigma")
        return names


@dataclass
class Cell:
    """One cell: a validated single-σ :class:`Config` (its ``out`` is a placeholder) and its part."""

    index: int
    part: str
    cfg: Config
    values: dict[str, Any]  # the grid and zip values that made this cell

    @property
    def sigma(self) -> float:
        return self.cfg.sigmas[0]

    def label(self) -> str:
        shown = ", ".join(f"{k}={_short(v)}" for k, v in self.values.items())
        return f"cell {self.index} of {self.part} ({shown or 'base'}, sigma={self.sigma:g})"


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


class SpecError(ValueError):
    """An invalid study spec; the message names the key (``grid.patch_size …``)."""


def _mapping(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SpecError(f"{name} must be a mapping of field: value")
    return dict(value)


def _check_fields(values: dict, where: str) -> None:
    for key in values:
        if key in RESERVED:
            raise SpecError(f"{where}.{key} is set by the study (use the --out option)")
        if key not in FIELDS:
            raise SpecError(f"{where}.{key} is not a configuration field ('lemmse run --help' lists them)")


def _values(raw: dict, where: str, equal_length: bool) -> dict[str, list]:
    out: dict[str, list] = {}
    _check_fields(raw, where)
    for key, values in raw.items():
        if not isinstance(values, list):
            raise SpecError(f"{where}.{key} must be a list of values, got {values!r}")
        if not values:
            raise SpecError(f"{where}.{key} must not be empty")
        if key == "storage_options":
            raise SpecError(f"{where}.{key} cannot vary (set it in base)")
        out[key] = [v if not is_list_field(key) or isinstance(v, list) else [v] for v in values]
    if equal_length and out:
        lengths = {key: len(v) for key, v in out.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            raise SpecError(f"{where} lists must have one length, got {shown}")
    return out


def parse_part(raw: Any, where: str, shared: dict | None = None, default_name: str = "study") -> Part:
    """A :class:`Part` from a spec mapping (``where`` prefixes the names in errors)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping with base, grid, zip, figures")
    keys = [k for k in SPEC_KEYS if k != "parts"]
    unknown = sorted(set(raw) - set(keys), key=str)
    if unknown:
        raise SpecError(f"{where}{'.' if where else ''}{unknown[0]} is not a spec key (keys: {', '.join(keys)})")
    prefix = f"{where}." if where else ""
    base = {**(shared or {}), **_mapping(raw.get("base"), prefix + "base")}
    _check_fields(base, prefix + "base")
    grid = _values(_mapping(raw.get("grid"), prefix + "grid"), prefix + "grid", equal_length=False)
    zipped = _values(_mapping(raw.get("zip"), prefix + "zip"), prefix + "zip", equal_length=True)
    both = sorted(set(grid) & set(zipped))
    if both:
        raise SpecError(f"{prefix}zip.{both[0]} is also in {prefix}grid; a field varies in one of them")
    if "grid" in raw and not grid:
        raise SpecError(f"{prefix}grid must not be empty (remove it for a single cell)")
    figures = raw.get("figures") or []
    if not isinstance(figures, list) or not all(isinstance(f, dict) for f in figures):
        raise SpecError(f"{prefix}figures must be a list of mappings")
    for i, figure in enumerate(figures):
        kind = figure.get("kind")
        if kind not in FIGURE_KEYS:
            raise SpecError(f"{prefix}figures[{i}].kind must be one of {', '.join(FIGURE_KEYS)}, got {kind!r}")
        for name in ("file", "title", *FIGURE_KEYS[kind]):
            if not isinstance(figure.get(name), str) or not figure[name]:
                raise SpecError(f"{prefix}figures[{i}].{name} is required (a string) for a {kind} figure")
        if not figure["file"].replace("-", "").replace("_", "").isalnum():
            raise SpecError(f"{prefix}figures[{i}].file must be letters, digits, - and _, got {figure['file']!r}")
    name = raw.get("name") or default_name
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"{prefix}name must be letters, digits, - and _, got {name!r}")
    return Part(name=name, base=base, grid=grid, zip=zipped, figures=[dict(f) for f in figures],
                description=str(raw.get("description") or ""))


def parse_spec(raw: Any) -> tuple[str, list[Part]]:
    """(study name, parts) of a spec mapping; raises :class:`SpecError` naming the bad key."""
    if not isinstance(raw, dict):
        raise SpecError("spec must be a mapping with base, grid (and zip, figures) or parts")
    if "parts" not in raw:
        part = parse_part(raw, "")
        return part.name, [part]
    unknown = sorted(set(raw) - {"name", "description", "base", "parts"}, key=str)
    if unknown:
        raise SpecError(f"{unknown[0]} is not a key of a spec with parts (name, description, base, parts)")
    shared = _mapping(raw.get("base"), "base")
    _check_fields(shared, "base")
    if not isinstance(raw["parts"], list) or not raw["parts"]:
        raise SpecError("parts must be a non-empty list of specs")
    parts = [parse_part(p, f"parts[{i}]", shared, default_name=f"part{i}") for i, p in enumerate(raw["parts"])]
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise SpecError(f"parts: names must be unique, got {', '.join(names)}")
    return str(raw.get("name") or "study"), parts


def apply_overrides(parts: list[Part], overrides: dict[str, Any]) -> list[Part]:
    """``--set field=value``: the value replaces the field in every part's base, grid and zip (a field
    removed from a zip must leave its other fields' lists as they are)."""
    _check_fields(overrides, "--set")
    out = []
    for part in parts:
        grid = {k: v for k, v in part.grid.items() if k not in overrides}
        zipped = {k: v for k, v in part.zip.items() if k not in overrides}
        out.append(dataclasses.replace(part, base={**part.base, **overrides}, grid=grid, zip=zipped))
    return out


def expand(parts: list[Part], out: str = "<study>", roots: Mapping[str, str] | None = None) -> list[Cell]:
    """Every cell of every part, validated (:class:`Config`; the message names the cell), one per σ.

    ``roots`` ({dataset: folder}) gives ``root`` to the cells of a file dataset that do not set it."""
    cells: list[Cell] = []
    roots = dict(roots or {})
    for part in parts:
        grid_keys = list(part.grid)
        zip_rows = list(zip(*part.zip.values())) or [()]
        for combo in itertools.product(*part.grid.values()):
            for zrow in zip_rows:
                values = {**dict(zip(grid_keys, combo)), **dict(zip(part.zip, zrow))}
                fields = {**part.base, **values, "out": out}
                if fields.get("root") is None and fields.get("dataset") in roots:
                    fields["root"] = roots[fields["dataset"]]
                try:
                    cfg = Config(**fields)
                except ConfigError as err:
                    shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items()) or "base"
                    hint = f"; pass --root {fields['dataset']}=PATH" if err.name == "root" and fields.get("root") is None else ""
                    raise SpecError(f"{err} (in the cell {shown} of {part.name}{hint})") from None
                for sigma in cfg.sigmas:
                    shown = {k: v for k, v in values.items() if k != "sigmas"}
                    cells.append(Cell(len(cells), part.name, dataclasses.replace(cfg, sigmas=[sigma]), shown))
    return cells


def check_networks(cells: list[Cell]) -> None:
    """Every network of every cell, built on the meta device (no memory), must have receptive field P."""
    seen = set()
    for cell in cells:
        cfg = cell.cfg
        for name in cfg.networks:
            key = (name, cfg.patch_size, cfg.padding, cfg.hidden, cfg.width)
            if key in seen:
                continue
            seen.add(key)
            kwargs = {"hidden": cfg.hidden} if name == "patchmlp" else {"width": cfg.width}
            try:
                with torch.device("meta"):
                    net = build_network(name, in_channels=1, out_channels=1, patch_size=cfg.patch_size,
                                        padding=cfg.padding, **kwargs)
            except ValueError as err:
                raise SpecError(f"networks: {name} cannot be built with patch_size={cfg.patch_size} ({err}) "
                                f"in {cell.label()}") from None
            if net.receptive_field != cfg.patch_size:
                raise SpecError(f"networks: {name} has receptive field {net.receptive_field}, not "
                                f"patch_size={cfg.patch_size}, in {cell.label()}")


def read_spec_file(path: str) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise SpecError(f"SPEC: cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"SPEC: {path} is not valid YAML ({str(err).splitlines()[0]})") from None


def parse_roots(items: list[str]) -> dict[str, str]:
    """``--root DATASET=PATH`` pairs."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SpecError(f"--root must be DATASET=PATH, got {item!r}")
        if name not in DATASETS or name in EMBEDDED:
            raise SpecError(f"--root: {name!r} is not a file dataset ({', '.join(d for d in DATASETS if d not in EMBEDDED)})")
        out[name] = path
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set field=value`` pairs, each value read as YAML (``--set sigmas=[0.1,0.2]``)."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SpecError(f"--set must be FIELD=VALUE, got {item!r}")
        try:
            out[name.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SpecError(f"--set {name}: {text!r} is not a valid YAML value") from None
    return out


def canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the text that identity hashes are of.  Values come from a
    validated :class:`Config` (floats stay floats, integers integers), so equal identities give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
