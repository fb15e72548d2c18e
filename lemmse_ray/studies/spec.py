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

and two optional part keys: ``floor_images`` (the loss floor's training queries, drawn i.i.d. with fresh
noise; default 256 in a part that trains networks, else none) and ``references: true`` (the global and the
translation-equivariant MMSE beside the LE-MMSE; denoising with the direct input);
or, for several experiments in one study, ``parts: [<spec>, ...]`` (each with its own name, base, grid,
zip and figures) beside an optional shared ``base``.  Every combination is one ordinary :class:`Config`,
validated when the spec is read; a configuration with several noise levels ``sigmas`` gives one cell per
σ (cells of one training set and problem share one bank over all σ).  ``out``, ``bank`` and ``overwrite``
are set by the study, never by a spec.

Everything a spec can get wrong is refused here, before any work or write, on one line naming the key:

* the file itself -- at most 1 MiB, and YAML aliases may not expand it past a cap (an alias bomb in a
  description or a caption would otherwise take minutes and gigabytes when printed or recorded;
  :mod:`lemmse_ray.storage.inputs`); ``--set`` values are read the same way;
* the number of cells -- computed from the sizes of the grid, the zip and the σ lists before any cell is
  built (:func:`count_cells`), and refused above :data:`MAX_CELLS`;
* the figures -- their keys and types when the spec is parsed, and every column they name (``x``, ``y``,
  ``hue``, ``style``, ``band``, ``category``, ``value`` and the keys of ``where``) against the columns the
  study will write, with values, in the figure's part (:func:`check_figures`, :func:`study_columns`);
* ``storage_options`` -- never from ``--set`` (a command line is visible to other users and kept in shell
  histories; ``lemmse run`` takes them from YAML only, too), one set for the whole study.

The same checks run again when ``lemmse report`` reads a ``study.json`` (:func:`parse_record`): a study
folder is an input like any other.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import itertools
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.statistics import STATISTICS, STATS
from ..data.loaders import DATASETS, EMBEDDED
from ..models.networks import build_network
from ..runs.config import Config, ConfigError
from ..storage.inputs import load_yaml, read_yaml
from .analysis import QUANTILES
from .presets import SIZES as PRESET_SIZES

SPEC_KEYS = ("name", "description", "base", "grid", "zip", "figures", "floor_images", "references", "parts")
# a spec file's cells store every statistic unless it sets ``stats``, top-k included for the copy rates and the
# top-k mass (the main job leaves it out by default for the sliding kernel's speed); the presets set ``stats``
# themselves and keep top-k only where they report copy rates (presets/sizes.yaml)
STUDY_STATS = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")
FLOOR_IMAGES = 256  # the loss floor's training queries in a part that trains networks, unless it sets floor_images
MAX_FLOOR_IMAGES = 65536
RESERVED = ("out", "bank", "overwrite")  # set by the study
FIELDS = tuple(f.name for f in dataclasses.fields(Config))
_HINTS = typing.get_type_hints(Config)
MAX_CELLS = 10_000  # a study's cells (a grid's product); more is refused before expanding
SIZES = (None, *PRESET_SIZES)  # the size of a preset study (None: a spec file)

# Figures: kind -> (required keys, optional keys); every kind also takes file and title (required), caption,
# where and facet (optional).  Keys naming columns, and those that must name numeric columns:
FIGURES = {"line": (("x", "y", "xlabel", "ylabel"),
                    ("hue", "style", "band", "error", "logx", "logy", "hline", "references", "table")),
           "bar": (("category", "value", "ylabel", "hue"), ("xlabel", "error", "hline")),
           "binned": ((), ("style",))}
TEXT_KEYS = ("file", "title", "caption", "xlabel", "ylabel", "x", "y", "category", "value", "error")
COLUMN_KEYS = ("x", "y", "category", "value", "hue", "style", "band", "error", "facet", "references")
NUMERIC_KEYS = ("x", "y", "value", "band", "error", "references")
#: the tables a line figure may draw from (``table``; default cells)
TABLES = {"cells": "cells.parquet", "classes": "classes.parquet", "epochs": "epochs.parquet"}


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
    where: str = ""  # the prefix of its keys in errors: "" or "parts[i]."
    floor_images: int | None = None  # None: FLOOR_IMAGES where a cell trains networks, else no floor
    references: bool = False  # the global and translation-equivariant MMSE beside the LE-MMSE (denoising)

    def floor_count(self, cfg: Config) -> int:
        """The loss floor's training queries of a cell of this part (0: no floor)."""
        if self.floor_images is not None:
            return self.floor_images
        return FLOOR_IMAGES if cfg.networks else 0

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
    files: set[str] = set()
    name = raw.get("name") or default_name
    if not _is_name(name):
        raise SpecError(f"{prefix}name must be letters, digits, - and _, got {name!r}")
    for i, figure in enumerate(figures):
        check_figure(figure, f"{prefix}figures[{i}]")
        if figure["file"] in files:
            raise SpecError(f"{prefix}figures[{i}].file {figure['file']!r} is used twice in {name}")
        files.add(figure["file"])
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise SpecError(f"{prefix}description must be a string")
    floor = raw.get("floor_images")
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int)
                              or not 0 <= floor <= MAX_FLOOR_IMAGES):
        raise SpecError(f"{prefix}floor_images must be an integer in [0, {MAX_FLOOR_IMAGES}], got {floor!r}")
    references = raw.get("references", False)
    if not isinstance(references, bool):
        raise SpecError(f"{prefix}references must be true or false, got {references!r}")
    return Part(name=name, base=base, grid=grid, zip=zipped, figures=[dict(f) for f in figures],
                description=description, where=prefix, floor_images=floor, references=references)


def _is_name(name: Any) -> bool:
    """Letters, digits, - and _ (a part's name and a figure's file make file names: no path may escape)."""
    return isinstance(name, str) and bool(name) and name.replace("-", "").replace("_", "").isalnum() \
        and name.isascii()


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int, float))


def check_figure(figure: Mapping, where: str) -> None:
    """A figure's keys and their types (the columns it names are checked by :func:`check_figures`)."""
    kind = figure.get("kind")
    if kind not in FIGURES:
        raise SpecError(f"{where}.kind must be one of {', '.join(FIGURES)}, got {kind!r}")
    required, optional = FIGURES[kind]
    allowed = ("kind", "file", "title", "caption", "where", "facet", *required, *optional)
    unknown = [k for k in figure if k not in allowed]
    if unknown:
        raise SpecError(f"{where}.{unknown[0]} is not a key of a {kind} figure (keys: {', '.join(allowed)})")
    for name in ("file", "title", *required):
        if name not in figure:
            kind_of = "a string" if name in TEXT_KEYS else "a column or a list of columns"
            raise SpecError(f"{where}.{name} is required ({kind_of}) for a {kind} figure")
    for name in TEXT_KEYS:
        if name in figure and (not isinstance(figure[name], str) or not figure[name]):
            raise SpecError(f"{where}.{name} must be a string, got {type(figure[name]).__name__}")
    if not _is_name(figure["file"]):
        raise SpecError(f"{where}.file must be letters, digits, - and _, got {figure['file']!r}")
    for name in ("hue", "style"):
        value = figure.get(name)
        if name in figure and not (isinstance(value, str) and value or isinstance(value, list) and value
                                   and all(isinstance(c, str) and c for c in value)):
            raise SpecError(f"{where}.{name} must be a column or a non-empty list of columns")
    if "band" in figure and not (isinstance(figure["band"], list) and len(figure["band"]) == 2
                                 and all(isinstance(c, str) and c for c in figure["band"])):
        raise SpecError(f"{where}.band must be a list of two column names (low, high)")
    if "facet" in figure and not (isinstance(figure["facet"], str) and figure["facet"]):
        raise SpecError(f"{where}.facet must be a column name")
    if "hline" in figure and not (isinstance(figure["hline"], (int, float)) and not isinstance(figure["hline"], bool)
                                  and math.isfinite(figure["hline"])):
        raise SpecError(f"{where}.hline must be a number (a reference level drawn across the figure)")
    references = figure.get("references")
    if "references" in figure and not (isinstance(references, dict) and references and all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in references.items())):
        raise SpecError(f"{where}.references must be a mapping of column: label")
    if "table" in figure and figure["table"] not in TABLES:
        raise SpecError(f"{where}.table must be one of {', '.join(TABLES)}, got {figure['table']!r}")
    for name in ("logx", "logy"):
        if name in figure and not isinstance(figure[name], bool):
            raise SpecError(f"{where}.{name} must be true or false")
    selection = figure.get("where", {})
    if not isinstance(selection, dict) or not all(isinstance(k, str) for k in selection):
        raise SpecError(f"{where}.where must be a mapping of column: value or list of values")
    for column, value in selection.items():
        if not (_is_scalar(value) or isinstance(value, list) and value and all(map(_is_scalar, value))):
            raise SpecError(f"{where}.where.{column} must be a value or a list of values")


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
    name = raw.get("name") or "study"
    if not _is_name(name):
        raise SpecError(f"name must be letters, digits, - and _, got {name!r}")
    if not isinstance(raw.get("description") or "", str):
        raise SpecError("description must be a string")
    return name, parts


def apply_overrides(parts: list[Part], overrides: dict[str, Any]) -> list[Part]:
    """``--set field=value``: the value replaces the field in every part's base, grid and zip (a field
    removed from a zip must leave its other fields' lists as they are); ``--set floor_images=N`` sets the
    part key of every part."""
    overrides = dict(overrides)
    if "floor_images" in overrides:
        floor = overrides.pop("floor_images")
        parse_part({"floor_images": floor}, "--set")  # the same check as in a spec
        parts = [dataclasses.replace(p, floor_images=floor) for p in parts]
    _check_fields(overrides, "--set")
    out = []
    for part in parts:
        grid = {k: v for k, v in part.grid.items() if k not in overrides}
        zipped = {k: v for k, v in part.zip.items() if k not in overrides}
        out.append(dataclasses.replace(part, base={**part.base, **overrides}, grid=grid, zip=zipped))
    return out


def _sigma_count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 1


def count_cells(parts: list[Part]) -> int:
    """The number of cells of ``parts``, from the sizes of their grids, zips and σ lists alone (exact for a
    spec that :func:`expand` accepts; no cell is built): per part, the product of the grid's sizes times the
    zip's length, where the σ values (a grid, zip or base ``sigmas``) count one cell per σ of each list."""
    total = 0
    for part in parts:
        if "sigmas" in part.grid:
            per_sigma = sum(map(_sigma_count, part.grid["sigmas"]))
        elif "sigmas" in part.zip:
            per_sigma = sum(map(_sigma_count, part.zip["sigmas"]))
        else:
            per_sigma = _sigma_count(part.base.get("sigmas", [None]))
        others = math.prod(len(v) for k, v in part.grid.items() if k != "sigmas")
        rows = 1 if "sigmas" in part.zip else max(1, len(next(iter(part.zip.values()), [None])))
        total += others * rows * per_sigma
    return total


def check_size(parts: list[Part]) -> int:
    """:func:`count_cells`, refused above :data:`MAX_CELLS` with the sizes that make it (before expanding:
    a grid of 10¹² cells would otherwise expand until memory runs out)."""
    n = count_cells(parts)
    if n > MAX_CELLS:
        sizes = "; ".join(f"{p.name}: " + " × ".join(f"{k} {len(v)}" for k, v in {**p.grid, **p.zip}.items())
                          for p in parts if p.grid or p.zip)
        raise SpecError(f"grid: the study has {n:,} cells, more than the limit of {MAX_CELLS:,} ({sizes}); "
                        "split it into several studies sharing one --work")
    return n


def expand(parts: list[Part], out: str = "<study>", roots: Mapping[str, str] | None = None) -> list[Cell]:
    """Every cell of every part, validated (:class:`Config`; the message names the cell), one per σ.

    The number of cells is checked first (:func:`check_size`).  One :class:`Config` is built and validated
    per combination of grid and zip values; its single-σ cells are copies with ``sigmas`` replaced, with no
    second validation: every σ of the list was checked, each on its own, by the first (no rule of
    :class:`Config` ties σ to the number of σ), and a second validation per σ doubled the cost of a large
    ``--dry-run``; the copies share their other values, which nothing changes after validation.  ``roots`` ({dataset: folder}) gives ``root`` to the cells of a file dataset that do not
    set it."""
    check_size(parts)
    cells: list[Cell] = []
    roots = dict(roots or {})
    for part in parts:
        grid_keys = list(part.grid)
        zip_rows = list(zip(*part.zip.values())) or [()]
        for combo in itertools.product(*part.grid.values()):
            for zrow in zip_rows:
                values = {**dict(zip(grid_keys, combo)), **dict(zip(part.zip, zrow))}
                fields = {"stats": list(STUDY_STATS), **part.base, **values, "out": out}
                if fields.get("root") is None and fields.get("dataset") in roots:
                    fields["root"] = roots[fields["dataset"]]
                try:
                    cfg = Config(**fields)
                except ConfigError as err:
                    shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items()) or "base"
                    hint = f"; pass --root {fields['dataset']}=PATH" if err.name == "root" and fields.get("root") is None else ""
                    raise SpecError(f"{err} (in the cell {shown} of {part.name}{hint})") from None
                shown = {k: v for k, v in values.items() if k != "sigmas"}
                for sigma in cfg.sigmas:
                    single = copy.copy(cfg)
                    single.sigmas = [sigma]
                    cells.append(Cell(len(cells), part.name, single, shown))
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


# --- the columns of a study's tables, and the figures that name them ---------------------------------------

# Config fields written to every row (lists, secrets and the study's own fields are not)
CELL_FIELDS = tuple(f for f in FIELDS if f not in ("sigmas", "stats", "networks", "storage_options", *RESERVED))
ROW_COLUMNS = ("part", "cell", "sigma", "bank_key", *CELL_FIELDS, "split", "estimate_key")
# the PSNR columns of one metric (analysis.psnr_columns): the pooled headline and its companions
PSNR_SUFFIXES = ("", "_se", "_lo", "_hi", "_mean", "_median", "_capped")


def psnr_family(metric: str) -> list[str]:
    return [f"{metric}{suffix}" for suffix in PSNR_SUFFIXES]


# cells.parquet (engine.cell_rows): columns with values whatever the statistics, with the statistic
# variance, with the loss floor (floor_images > 0), with a network and with the references; ``setting`` and
# ``data`` are the report's labels (problem (input); dataset, size and channels)
CELLS_ALWAYS = ("network", "receptive_field", "setting", "data", "n_images", *psnr_family("psnr_z_x"), "mse_z_x",
                *psnr_family("psnr_lemmse_x"), "mse_lemmse_x", "pixels", "interior_share",
                "class_mean_distance_interior_q25", "class_mean_distance_interior_median",
                "class_mean_distance_interior_q75", "below_floor_mse", "below_floor_train_loss", "below_floor")
CELLS_VARIANCE = ("posterior_variance", "posterior_variance_se")
CELLS_FLOOR = ("floor_images", "loss_floor", "loss_floor_se", "mse_gap", "mse_gap_se")
CELLS_NETWORK = ("network_key", "epochs_done", "in_lemmse_class", *psnr_family("psnr_net_lemmse"),
                 *psnr_family("psnr_net_x"), "mse_net_lemmse", "mse_net_x", "train_loss")
CELLS_REFERENCES = ("psnr_global_mmse_x", "psnr_te_mmse_x")
# classes.parquet (analysis.class_rows), one row per cell × split × class holding query pixels
CLASSES = ("class", "padded_pixels", "interior", "positions", "pixels", "rows_met_median", "setting", "data")
# epochs.parquet (engine.epoch_rows): each network's agreement after each epoch, on the fixed query sets
EPOCHS = ("network", "epoch", "step", "train_loss", *psnr_family("psnr_net_lemmse"), *psnr_family("psnr_net_x"),
          "mse_net_lemmse", "mse_net_x",
          "setting", "data")
# density.parquet (analysis.density_rows), written for cells that store log_evidence
DENSITY = ("metric", "network", "bin", "lo", "hi", "pixels", "mean", "se", "median", "mean_extra_evidence_centred",
           "setting", "data")
# columns holding text or booleans (a line's x and y, a bar's value and a band need numbers)
TEXT_COLUMNS = frozenset(("part", "bank_key", "split", "estimate_key", "network", "network_key", "setting", "data",
                          "metric", "density_metric", "below_floor_mse", "below_floor_train_loss", "below_floor",
                          "in_lemmse_class", "interior",
                          *(f for f in CELL_FIELDS
                            if not {int, float} & set(typing.get_args(_HINTS[f]) or (_HINTS[f],)))))


def _quantiles(stat: str) -> list[str]:
    return [f"{stat}_{label}" for label in QUANTILES]


def columns_for(stats: frozenset[str], networks: bool, floor: bool = False,
                references: bool = False) -> dict[str, set[str]]:
    """{table: the columns that hold values} for cells that store ``stats``, train networks (``networks``),
    compute the loss floor (``floor``: floor_images > 0) and the references (``references``): the columns of
    :func:`lemmse_ray.studies.engine.cell_rows` and :func:`lemmse_ray.studies.analysis.cell_metrics`, with
    what each needs (``tests/studies/test_study_inputs.py`` checks this list against the tables of a real
    study), plus ``setting`` and ``data`` (the report's labels)."""
    cells = {*ROW_COLUMNS, *CELLS_ALWAYS}
    measures = ["class_mean_distance"]
    if "variance" in stats:
        cells.update(CELLS_VARIANCE)
    if floor:
        cells.update(CELLS_FLOOR)
    for stat in stats & set(STATISTICS):  # the stored measures of concentration, from the statistics table
        if STATISTICS[stat].concentration:
            measures += [output.name for output in STATISTICS[stat].outputs]
    if "ess" in stats:
        measures.append("ess_fraction")
        cells.update(["frac_ess_lt2", *_quantiles("ess_fraction")])
    if "topk" in stats:
        cells.update(["copy_rate", "copy_undecided"])
        if {"max_weight", "log_evidence"} & set(stats):
            measures.append("topk_mass")
            cells.add("topk")
    for measure in measures:
        cells.update(_quantiles(f"{measure}_interior"))
    if "log_evidence" in stats:
        cells.update(["density_metric", "density_low", "density_high"])
    if networks:
        cells.update(CELLS_NETWORK)
    if references:
        cells.update(CELLS_REFERENCES)
    classes = {*ROW_COLUMNS, *CLASSES, *(c for m in measures for c in _quantiles(m))}
    if "ess" in stats:
        classes.add("frac_ess_lt2")
    density = {*ROW_COLUMNS, *DENSITY} if "log_evidence" in stats else set()
    epochs = {*ROW_COLUMNS, *EPOCHS} if networks else set()
    return {"cells.parquet": cells, "classes.parquet": classes, "epochs.parquet": epochs,
            "density.parquet": density}


def part_columns(part: Part, cells: list[Cell]) -> dict[str, set[str]]:
    """{table: columns with values} of the cells of ``part`` among ``cells`` (:func:`columns_for` of their
    statistics, networks, loss floor and references)."""
    members = [c for c in cells if c.part == part.name]
    stats = frozenset(s for c in members for s in c.cfg.stats)
    return columns_for(stats, any(c.cfg.networks for c in members),
                       any(part.floor_count(c.cfg) > 0 for c in members), part.references)


def study_columns(parts: list[Part], cells: list[Cell]) -> dict[str, set[str]]:
    """{table: columns with values} of a study made of ``parts`` and their ``cells``."""
    out: dict[str, set[str]] = {}
    for part in parts:
        for table, columns in part_columns(part, cells).items():
            out.setdefault(table, set()).update(columns)
    return out


def _needs(column: str, table: str, stats: frozenset[str], networks: bool, floor: bool,
           references: bool) -> str | None:
    """What a column that holds no value in a part needs, or None when no study writes such a column."""
    everything = columns_for(frozenset(STATS), True, True, True)[table]
    if column not in everything:
        return None
    missing = [s for s in STATS if s not in stats]
    for stat in missing:
        if column in columns_for(stats | {stat}, networks, floor, references)[table]:
            return f"the statistic {stat!r} (stats)"
    for pair in itertools.combinations(missing, 2):
        if column in columns_for(stats | set(pair), networks, floor, references)[table]:
            return f"the statistics {pair[0]!r} and {pair[1]!r} (stats)"
    if not networks and column in columns_for(stats, True, floor, references)[table]:
        return "a network (networks)"
    if not floor and column in columns_for(stats, networks, True, references)[table]:
        return "the loss floor (floor_images > 0)"
    if not references and column in columns_for(stats, networks, floor, True)[table]:
        return "the references (references: true)"
    return f"the statistics {', '.join(missing)} (stats), a network (networks) and the loss floor (floor_images)"


def figure_columns(figure: Mapping) -> list[tuple[str, str]]:
    """(key, column) of every column a figure names, ``where``'s keys included."""
    out = []
    for key in COLUMN_KEYS:
        value = figure.get(key)
        out += [(key, c) for c in ([value] if isinstance(value, str) else value or [])]
    return out + [("where", c) for c in figure.get("where", {})]


def check_columns(figure: Mapping, where: str, table: str, available: set[str], text: set[str] | frozenset[str],
                  needs: Any = None) -> None:
    """``SpecError`` when a column named by ``figure`` (at ``where``) is not in ``available`` (the columns of
    ``table`` with values), or holds text where the figure needs numbers.  ``needs(column)``: why a known
    column holds no value (or None: it is no column at all)."""
    for key, column in figure_columns(figure):
        if column not in available:
            reason = needs(column) if needs is not None else None
            if reason is not None:
                raise SpecError(f"{where}.{key}: the column {column!r} holds no value in this part: it needs {reason}")
            close = difflib.get_close_matches(column, sorted(available), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{where}.{key}: {column!r} is not a column of {table}{hint}")
        if key in NUMERIC_KEYS and column in text:
            raise SpecError(f"{where}.{key}: the column {column!r} holds text; a {figure['kind']} figure needs "
                            "numbers there")


def check_figures(parts: list[Part], cells: list[Cell]) -> None:
    """Every figure's columns against the columns its part's cells will write with values (before any work:
    a misspelt column would otherwise fail after the whole study was computed, and a column without values
    would silently drop the figure)."""
    for part in parts:
        members = [c for c in cells if c.part == part.name]
        stats = frozenset(s for c in members for s in c.cfg.stats)
        networks = any(c.cfg.networks for c in members)
        floor = any(part.floor_count(c.cfg) > 0 for c in members)
        available = part_columns(part, cells)
        for i, figure in enumerate(part.figures):
            where = f"{part.where}figures[{i}]"
            table = ("density.parquet" if figure["kind"] == "binned" else TABLES[figure.get("table", "cells")])
            if figure["kind"] == "binned" and "log_evidence" not in stats:
                raise SpecError(f"{where}: a binned figure needs the statistic 'log_evidence' (stats) in {part.name}")
            if table == "epochs.parquet" and not networks:
                raise SpecError(f"{where}.table: epochs needs a network (networks) in {part.name}")
            try:
                check_columns(figure, where, table, available[table], TEXT_COLUMNS,
                              functools.partial(_needs, table=table, stats=stats, networks=networks, floor=floor,
                                                references=part.references))
            except SpecError as err:
                raise SpecError(str(err).replace("in this part", f"in {part.name}")) from None
        for member in members:
            if part.references and (member.cfg.problem, member.cfg.input) != ("denoising", "direct"):
                raise SpecError(f"{part.where}references: the global and translation-equivariant MMSE are "
                                f"computed for denoising with the direct input, not in {member.label()}")


def parse_record(record: Any, path: str) -> tuple[str, str | None, list[Part]]:
    """(name, size, parts) of a study record (``study.json``), checked as a spec is: every part through
    :func:`parse_part` (names, figures and their keys; the fields of its base, grid and zip), so that a
    tampered record cannot name a file outside the study folder.  Errors start with ``path``."""
    if not isinstance(record, dict):
        raise SpecError(f"{path}: not a study record (a mapping with name, size and parts)")
    name, size, parts = record.get("name"), record.get("size"), record.get("parts")
    if not _is_name(name):
        raise SpecError(f"{path}: name must be letters, digits, - and _, got {name!r}")
    if size not in SIZES:
        raise SpecError(f"{path}: size must be quick, full or null, got {size!r}")
    if not isinstance(parts, list) or not parts:
        raise SpecError(f"{path}: parts must be a non-empty list of parts")
    out = []
    for i, part in enumerate(parts):
        raw = {k: v for k, v in part.items() if k != "varying"} if isinstance(part, dict) else part
        if isinstance(raw, dict) and "name" not in raw:
            raise SpecError(f"{path}: parts[{i}].name is missing")
        try:
            out.append(parse_part(raw, f"parts[{i}]"))
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise SpecError(f"{path}: part names must be unique, got {', '.join(names)}")
    return name, size, out


def read_spec_file(path: str) -> Any:
    """The YAML mapping of a spec file, read with the caps of :func:`lemmse_ray.storage.inputs.read_yaml`
    (size, alias expansion, nesting); errors start with ``SPEC:`` and name the file."""
    try:
        return read_yaml(path, "SPEC")
    except ValueError as err:
        raise SpecError(str(err)) from None


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
    """``--set field=value`` pairs, each value read as YAML (``--set sigmas=[0.1,0.2]``) with the caps of
    :func:`lemmse_ray.storage.inputs.load_yaml`.  ``storage_options`` are refused, before their value is
    read: a command line is visible to every user of the machine (``ps``) and kept in shell histories, and
    ``lemmse run`` takes them from YAML only for the same reason."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SpecError(f"--set must be FIELD=VALUE, got {item!r}")
        if name == "storage_options":
            raise SpecError("--set storage_options: credentials are not taken from the command line (other users "
                            "can read it); put storage_options in the base of a spec file, or configure fsspec "
                            "itself (environment variables, its configuration files)")
        try:
            out[name] = load_yaml(text, f"--set {name}")
        except ValueError as err:
            raise SpecError(str(err)) from None
    return out


def data_label(dataset: str, size: int | None, grayscale: bool | None) -> str:
    """The data of a cell in words: the dataset, then its size and channels where the cell sets them
    (``photos 28px gray``); the reports' ``data`` column, by which figures are faceted."""
    return " ".join([dataset, *([f"{size}px"] if size else []),
                     *(["gray"] if grayscale else ["rgb"] if grayscale is False else [])])


def canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the text that identity hashes are of.  Values come from a
    validated :class:`Config` (floats stay floats, integers integers), so equal identities give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
