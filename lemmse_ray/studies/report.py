"""``report.md`` and ``figures/*.png`` of a study, from its Parquet tables alone (no Ray, no arrays).

:func:`render` reads ``study.json`` (the spec: parts, their varying fields and declared figures),
``cells.parquet``, ``density.parquet`` and ``history.json``, and writes, per part, a table (varying
fields, split, network, receptive field and the main metrics), the part's figures with their one-sentence
captions, and a call-out of every network more than 3 standard errors below the loss floor.

A figure is declared in a spec as a mapping:

* ``kind: line`` -- ``x``, ``y`` columns of ``cells.parquet`` (or, with ``table: classes`` / ``table:
  epochs``, of ``classes.parquet`` / ``epochs.parquet``), optional ``hue``, ``style`` (column or list),
  ``band: [lo, hi]``, ``error`` (a column of standard errors: error bars), ``hline`` (a reference level),
  ``references`` ({column: label}: levels constant in x), ``logx``, ``logy``;
* ``kind: bar`` -- ``category``, ``value``, ``hue``, optional ``error``, ``hline``;
* ``kind: binned`` -- the evidence-binned curves of ``density.parquet``, optional ``style`` (default σ);

each with ``file`` (PNG name), ``title``, ``xlabel``, ``ylabel``, ``caption``, ``where`` ({column:
value or list of values}, e.g. ``network: none`` for the LE-MMSE-only rows) and ``facet`` (a column: one
panel per value).  Rows that share every plotted key (x, hue, style, facet or category) are averaged only
when they also share every field the part varies: a figure that would average over a varying field (σ, the
dataset, P …) is refused, naming the field.  A part with several datasets is faceted by ``data`` (dataset,
size and channels) unless the figure names its facet.  The column ``setting`` is ``problem (input)``, the
column ``data`` the data in words.  A figure whose rows hold no value to draw is named in the report, not left
out silently.

A study folder is an input like any other (anyone who can write it can tamper with it), so nothing in it is
trusted, and nothing is written before every check passed: ``study.json`` is re-checked as a spec is
(:func:`lemmse_ray.studies.spec.parse_record`: part names and figure files make file names, so none may leave
the folder); each file is read with a cap on its bytes, the tables with caps on their rows read from the
Parquet footer first (:mod:`lemmse_ray.storage.inputs`; a small file can decode to gigabytes), and the
columns the report uses, and every column a figure names, must be there with the right type; every figure is
drawn in memory first.  Each refusal is one ``ValueError`` naming the file.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.metrics import PSNR_CAP
from ..models.networks import NETWORKS
from ..runs.config import join
from ..storage.files import file_exists, save_text, write_bytes
from ..storage.inputs import read_json, read_table
from .figures import bar_figure, binned_figure, line_figure
from .spec import (
    MAX_CELLS,
    NUMERIC_KEYS,
    TABLES,
    Part,
    SpecError,
    data_label,
    figure_columns,
    parse_record,
)

STUDY, CELLS, DENSITY, HISTORY = "study.json", "cells.parquet", "density.parquet", "history.json"
PAPER_AGREEMENT = 25.0  # dB: the paper's PSNR(network, LE-MMSE) on training queries
PANEL = "panel"  # the facet of a figure faceted by the data and by a named column
MAX_TABLE_BYTES = 256 << 20
DENSITY_BINS = 10  # the bins of analysis.cell_metrics (its default n_bins), per cell × split × network
# one cells row per cell × split × (the LE-MMSE and each network): the most a study can write
MAX_CELL_ROWS = 2 * MAX_CELLS * (1 + len(NETWORKS))
MAX_DENSITY_ROWS = DENSITY_BINS * MAX_CELL_ROWS
MAX_CLASS_ROWS = 2 * MAX_CELLS * 64  # classes holding query pixels, per cell × split: far fewer in practice
MAX_EPOCH_ROWS = MAX_CELL_ROWS * 100
MAX_ROWS = {"cells": MAX_CELL_ROWS, "classes": MAX_CLASS_ROWS, "epochs": MAX_EPOCH_ROWS}
# the columns the report itself reads, by kind of value (figures add theirs)
CELL_COLUMNS = {"part": "text", "cell": "integer", "split": "text", "network": "text", "problem": "text",
                "input": "text", "sigma": "number", "patch_size": "integer"}
CLASS_COLUMNS = {k: v for k, v in CELL_COLUMNS.items() if k != "network"} | {"class": "integer"}
DENSITY_COLUMNS = {"part": "text", "metric": "text", "network": "text", "bin": "integer", "lo": "number",
                   "hi": "number", "mean": "number", "se": "number"}
NULLABLE = ("mean", "se")  # an empty bin's statistics
KINDS = {"text": (pa.types.is_string, pa.types.is_large_string),
         "integer": (pa.types.is_integer,),
         "number": (pa.types.is_integer, pa.types.is_floating)}
NAMES = {"text": "text", "integer": "integers", "number": "numbers"}

TABLE_METRICS = (("n_images", "images"), ("psnr_z_x", "PSNR(z,x)"), ("psnr_lemmse_x", "PSNR(LE,x)"),
                 ("psnr_lemmse_x_se", "± s.e."), ("psnr_lemmse_x_mean", "mean/img"),
                 ("psnr_lemmse_x_median", "median/img"), ("psnr_net_lemmse", "PSNR(net,LE)"),
                 ("psnr_net_lemmse_se", "± s.e."), ("psnr_net_x", "PSNR(net,x)"),
                 ("ess_interior_median", "ESS int. med"), ("ess_fraction_interior_median", "ESS/rows int."),
                 ("frac_ess_lt2", "ESS<2"), ("copy_rate", "copy"), ("floor_images", "floor imgs"),
                 ("loss_floor", "floor"), ("loss_floor_se", "floor s.e."), ("mse_gap", "MSE−floor"),
                 ("mse_gap_se", "gap s.e."), ("train_loss", "train loss"))


EXAMPLES = (("grid", ("Test image 0 of each setting of this part (rows): input, LE-MMSE, each network and the "
                      "ground truth, with the PSNR against the ground truth under each tile (drawn by the run).")),
            ("examples", ("Test queries of one cell of this part: input, LE-MMSE, each network and the ground "
                          "truth, with the PSNR against the ground truth under each tile (drawn by the run).")),
            ("ess", ("Per-pixel effective number of training patches of the same queries, log scale (drawn by the "
                     "run).")))


def _check_kinds(table: pa.Table, kinds: Mapping[str, str], path: str) -> None:
    for column, kind in kinds.items():
        if not any(test(table.schema.field(column).type) for test in KINDS[kind]):
            raise ValueError(f"out: {path}: the column {column!r} must hold {NAMES[kind]}, "
                             f"got {table.schema.field(column).type}")
        if column not in NULLABLE and table.column(column).null_count:
            raise ValueError(f"out: {path}: the column {column!r} has empty values")


def read_rows(path: str, kinds: Mapping[str, str], max_rows: int, columns: Sequence[str] | None = None,
              storage_options: dict | None = None) -> pa.Table:
    """A study table, checked (:func:`lemmse_ray.storage.inputs.read_table`: bytes, rows, the columns of
    ``kinds`` present and of their kind); ``columns``: read only these (and those of ``kinds``)."""
    wanted = None if columns is None else [*kinds, *columns]
    table = read_table(path, "out", required=list(kinds), columns=wanted, max_bytes=MAX_TABLE_BYTES,
                       max_rows=max_rows, storage_options=storage_options)
    if table is None:
        raise ValueError(f"out: {path} is missing; run the study first")
    _check_kinds(table, kinds, path)
    return table


def as_rows(table: pa.Table) -> list[dict]:
    """The rows of a table as dicts, with ``setting`` = ``problem (input)`` and ``data``
    (:func:`lemmse_ray.studies.spec.data_label`) where their fields are known."""
    rows = table.to_pylist()
    for row in rows:
        if "problem" in row and "input" in row:
            row["setting"] = f"{row['problem']} ({row['input']})"
        if "dataset" in row:
            row["data"] = data_label(row["dataset"], row.get("size"), row.get("grayscale"))
    return rows


def check_figure_columns(figure: Mapping, where: str, table: pa.Table, path: str, study: str) -> None:
    """Every column ``figure`` (``where`` in the record ``study``) names must be in ``table`` (read from
    ``path``; or be ``setting``), numeric where it is drawn as a number."""
    names = set(table.column_names)
    derived = ({"setting"} if {"problem", "input"} <= names else set()) | ({"data"} if "dataset" in names else set())
    for key, column in figure_columns(figure):
        if column not in names | derived:
            raise ValueError(f"out: {path} has no column {column!r} ({where}.{key} in {study})")
        numeric = column in names and any(test(table.schema.field(column).type) for test in KINDS["number"])
        if key in NUMERIC_KEYS and not numeric:
            raise ValueError(f"out: {study}: {where}.{key}: the column {column!r} holds text; a {figure['kind']} "
                             "figure needs numbers there")


def read_history(path: str, storage_options: dict | None = None) -> list[dict]:
    """``history.json`` (none: []), a list of mappings of one set of keys with ``time`` and ``seconds``."""
    history = read_json(path, "out", storage_options=storage_options)
    if history is None or history == []:
        return []
    keys = set(history[0]) if isinstance(history, list) and history and isinstance(history[0], dict) else set()
    if not isinstance(history, list) or not {"time", "seconds"} <= keys or not all(
            isinstance(h, dict) and set(h) == keys and all(v is None or isinstance(v, (str, int, float))
                                                            for v in h.values()) for h in history):
        raise ValueError(f"out: {path} must be a list of mappings with time, seconds and the same keys "
                         "(as 'lemmse study' writes it)")
    return history


def select(rows: Sequence[Mapping], where: Mapping[str, Any] | None) -> list[Mapping]:
    """Rows whose columns equal ``where``'s values (a list: any of them)."""
    def keep(row: Mapping) -> bool:
        for column, wanted in (where or {}).items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if row.get(column) not in allowed:
                return False
        return True
    return [r for r in rows if keep(r)]


def _columns(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def average(rows: Sequence[Mapping], keys: Sequence[str], values: Sequence[str]) -> list[dict]:
    """Mean of each ``values`` column over the rows of each distinct ``keys`` (NaN and None skipped)."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for group_key, members in groups.items():
        row = dict(zip(keys, group_key))
        for column in values:
            numbers = [float(m[column]) for m in members if m.get(column) is not None
                       and not (isinstance(m[column], float) and math.isnan(m[column]))]
            row[column] = float(np.mean(numbers)) if numbers else math.nan
        out.append(row)
    return out


# a plotted key that covers varying fields: rows that share it share them
COVERS = {"setting": ("problem", "input"), "data": ("dataset", "size", "grayscale"), "sigma": ("sigmas",)}


def check_no_pooling(rows: Sequence[Mapping], keys: Sequence[str], varying: Sequence[str], what: str) -> None:
    """ValueError when rows sharing every plotted key in ``keys`` differ in a varying field of the part (a
    figure would average them: σ, the dataset, P …), naming the field."""
    covered = set(keys) | {f for k in keys for f in COVERS.get(k, ())}
    free = [f for f in varying if f not in covered]
    groups: dict[tuple, set[tuple]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), set()).add(tuple(row.get(f) for f in free))
    for values in groups.values():
        if len(values) > 1:
            spread = [f for i, f in enumerate(free) if len({v[i] for v in values}) > 1]
            raise ValueError(f"{what} would average rows of different {spread[0]}; name it as hue, style or facet, "
                             "or select one value with where")


def draw(figure: Mapping, tables: Mapping[str, list[dict]], varying: Sequence[str] = ()) -> bytes | None:
    """The PNG of one declared figure (``tables``: {"cells", "classes", "epochs", "density": rows of this
    part}), or None when no selected row holds a value to draw."""
    kind = figure.get("kind")
    common = {"title": figure["title"]}
    source = "density" if kind == "binned" else figure.get("table", "cells")
    rows = select(tables.get(source) or [], figure.get("where"))
    named = [c for c in ("data", figure.get("facet")) if c and (c != "data" or len({r.get("data") for r in rows}) > 1)]
    named = list(dict.fromkeys(named))
    facet = named[0] if len(named) == 1 else PANEL if named else None
    if facet == PANEL:  # several datasets and a named facet: one panel per combination
        rows = [{**r, PANEL: ", ".join(f"{c} = {_fmt(r.get(c))}" for c in named)} for r in rows]
    facets = [facet, *named] if facet == PANEL else [facet] if facet else []
    if kind == "binned":
        if not rows:
            return None
        style = figure.get("style") or ("sigma" if len({r.get("sigma") for r in rows}) > 1 else None)
        keys = ["metric", "network", "bin", "lo", "hi", *([style] if style else []), *facets]
        check_no_pooling(rows, keys, varying, "the figure")
        binned = average(rows, keys, ["mean", "se"])
        return binned_figure(binned, None, style=style, facet=facet, **common)
    if kind == "line":
        hue, style = _columns(figure.get("hue")), _columns(figure.get("style"))
        band, error = figure.get("band"), figure.get("error")
        references = dict(figure.get("references") or {})
        values = [figure["y"], *(band or []), *([error] if error else []), *references]
        rows = [r for r in rows if _number(r.get(figure["y"]))]
        if not rows:
            return None
        keys = [figure["x"], *hue, *style, *facets]
        check_no_pooling(rows, keys, varying, "the figure")
        points = average(rows, keys, values)
        return line_figure(points, figure["x"], figure["y"], None, xlabel=figure["xlabel"], ylabel=figure["ylabel"],
                           hue=hue or None, style=style or None, logx=bool(figure.get("logx")),
                           logy=bool(figure.get("logy")), band=tuple(band) if band else None, error=error,
                           facet=facet, hline=figure.get("hline"), hline_label=_hline_label(figure),
                           references=references or None, **common)
    if kind == "bar":
        hue = _columns(figure.get("hue"))
        error = figure.get("error")
        rows = [r for r in rows if _number(r.get(figure["value"]))]
        if not rows:
            return None
        keys = [figure["category"], *hue, *facets]
        check_no_pooling(rows, keys, varying, "the figure")
        bars = average(rows, keys, [figure["value"], *([error] if error else [])])
        return bar_figure(bars, figure["category"], figure["value"], hue, None, ylabel=figure["ylabel"],
                          xlabel=figure.get("xlabel"), error=error, facet=facet, hline=figure.get("hline"),
                          hline_label=_hline_label(figure), **common)
    raise ValueError(f"figures: kind must be line, bar or binned, got {kind!r}")


def _hline_label(figure: Mapping) -> str | None:
    if figure.get("hline") is None:
        return None
    return ("the paper's level" if figure["hline"] == PAPER_AGREEMENT and "psnr_net_lemmse" in
            (figure.get("y"), figure.get("value")) else "reference") + f" ({figure['hline']:g})"


def _number(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "**yes**" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def table(rows: list[dict], varying: Sequence[str]) -> str:
    """A Markdown table: the varying fields, split, network, receptive field and the metrics present."""
    metrics = [(c, label) for c, label in TABLE_METRICS if any(_fmt(r.get(c)) != "–" for r in rows)]
    head = [*varying, "split", "network", "RF", *(label for _, label in metrics), "below floor (net)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [*(_fmt(r.get(v)) for v in varying), r["split"], r["network"], _fmt(r.get("receptive_field")),
                 *(_fmt(r.get(c)) for c, _ in metrics),
                 _fmt(r.get("below_floor")) if r["split"] == "train" and r["network"] != "none" else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_callouts(rows: list[dict]) -> list[str]:
    """One line per network more than 3 standard errors below the loss floor: a leak or a bug when the network
    is in the LE-MMSE's function class, a measured advantage when its class is larger (the U-Net)."""
    out = []
    for r in rows:
        if r.get("below_floor") is True and r["network"] != "none":
            gap = (r["mse_gap"] / r["mse_gap_se"] if _number(r.get("mse_gap")) and _number(r.get("mse_gap_se"))
                   and r["mse_gap_se"] else math.nan)
            where = (f"- **{r['network']}** in cell {r['cell']} (σ = {r['sigma']:g}, {r['setting']}, P = "
                     f"{r['patch_size']}): its MSE to x on {_fmt(r.get('floor_images'))} floor queries is "
                     f"{gap:.1f} standard errors from the loss floor {_fmt(r.get('loss_floor'))} ± "
                     f"{_fmt(r.get('loss_floor_se'))}; final training loss {_fmt(r.get('train_loss'))}.")
            if r.get("in_lemmse_class") is False:
                out.append(where + " Its function class is larger than the LE-MMSE's (it also sees the pixel's "
                                   "position modulo its pooling factor, docs/theory.md §7), so it may go below the "
                                   "floor: this measures what the position tells, not a bug.")
            else:
                out.append(where + " A network of the LE-MMSE's class cannot go below the floor: this points to a "
                                   "leak, a bug, or a receptive field larger than P.")
    return out


def read_study(out: str, storage_options: dict | None = None
               ) -> tuple[str, str | None, list[Part], dict[str, list[dict]], list[dict]]:
    """(name, size, parts, {table: rows}, history) of a study folder, every check of the module docstring
    passed (``classes``, ``epochs`` and ``density`` rows only where a part has a figure drawn from them)."""
    path = join(out, STUDY)
    record = read_json(path, "out", storage_options=storage_options)
    if record is None:
        raise ValueError(f"out: {out} holds no study.json; is it a study folder?")
    try:
        name, size, parts = parse_record(record, path)
    except SpecError as err:
        raise ValueError(f"out: {err}") from None
    sources = {part.name: [("density" if f["kind"] == "binned" else f.get("table", "cells"), f) for f in part.figures]
               for part in parts}
    needed = {table for uses in sources.values() for table, _ in uses} | {"cells"}
    loaded: dict[str, pa.Table] = {}
    for table in needed:
        table_path = join(out, DENSITY if table == "density" else TABLES[table])
        wanted = [c for uses in sources.values() for t, f in uses if t == table for c in f.get("where", {})]
        if table == "density":
            loaded[table] = read_rows(table_path, DENSITY_COLUMNS, MAX_DENSITY_ROWS,
                                      columns=["problem", "input", "dataset", "size", "grayscale", "sigma", *wanted],
                                      storage_options=storage_options)
        else:
            loaded[table] = read_rows(table_path, CLASS_COLUMNS if table == "classes" else CELL_COLUMNS,
                                      MAX_ROWS[table], storage_options=storage_options)
    for i, part in enumerate(parts):
        for j, (table, figure) in enumerate(sources[part.name]):
            table_path = join(out, DENSITY if table == "density" else TABLES[table])
            check_figure_columns(figure, f"parts[{i}].figures[{j}]", loaded[table], table_path, path)
    tables: dict[str, list[dict]] = {"cells": as_rows(loaded["cells"])}
    for table in needed - {"cells"}:  # the rows of the parts that draw from them only
        users = [part for part, uses in sources.items() if any(t == table for t, _ in uses)]
        tables[table] = as_rows(loaded[table].filter(pc.is_in(loaded[table]["part"], pa.array(users))))
    history = read_history(join(out, HISTORY), storage_options)
    return name, size, parts, tables, history


def render(out: str, storage_options: dict | None = None) -> str:
    """Write ``<out>/report.md`` and ``<out>/figures/*.png`` from the study's files; returns the text.

    Everything is read and checked, and every figure drawn in memory, before the first file is written."""
    name, size, parts, tables, history = read_study(out, storage_options)
    cells = tables["cells"]
    lines = [f"# Study `{name}`" + (f" (size {size})" if size else ""), "",
             (f"{len({r['cell'] for r in cells})} cells; {len(cells)} rows in `cells.parquet` (one per cell × split × "
             "network; network `none` holds the LE-MMSE's own metrics). PSNR in dB (data range 1) **of the pooled "
             "MSE** of the query images (± s.e.: delta method), with the mean and median of the per-image PSNRs "
             f"beside it (per-image PSNRs are capped at {PSNR_CAP:g} dB, never inf); RF = receptive field in pixels "
             "(the LE-MMSE's is P); ESS int. med = median effective number of training patches per pixel of the "
             "interior class (patches without padding; ESS compares only within a class), ESS/rows int. = ESS over "
             "the rows the pixel meets (1: uniform weights); copy = fraction of pixels whose own noiseless patch, "
             "or an exact duplicate, is among the rows of the largest weight (ties cannot decide it); floor = mean "
             "posterior variance on `floor imgs` training images drawn at random with fresh noise, the lowest "
             "training MSE any network of the LE-MMSE's class can reach (docs/theory.md §5); MSE−floor = a "
             "network's MSE to x on those queries minus the floor (paired)."), ""]
    callouts = floor_callouts(cells)
    lines += ["## Loss-floor check", ""]
    lines += (["Networks more than 3 standard errors below the loss floor:", "", *callouts] if callouts else
              ["No network is more than 3 standard errors below the loss floor on train queries."])
    lines.append("")
    pictures: dict[str, bytes] = {}
    for i, part in enumerate(parts):
        rows = sorted((r for r in cells if r["part"] == part.name),
                      key=lambda r: (r["cell"], r["split"] != "train", r["network"] != "none", r["network"]))
        lines += [f"## {part.name}", ""]
        if part.description:
            lines += [part.description, ""]
        for j, figure in enumerate(part.figures):
            file = f"{part.name}_{figure['file']}.png"
            try:
                picture = draw(figure, {t: (rows if t == "cells" else [r for r in v if r["part"] == part.name])
                                        for t, v in tables.items()}, part.varying)
            except ValueError as err:
                raise ValueError(f"out: {join(out, STUDY)}: parts[{i}].figures[{j}] ({figure['file']}): {err}") \
                    from None
            if picture is None:
                lines += [(f"*Figure `{file}` ({figure['title']}) is not drawn: no row of this part selected by its "
                           "`where` holds a value to draw.*"), ""]
                continue
            pictures[file] = picture
            lines += [f"![{figure['title']}](figures/{file})", "", f"*{figure.get('caption', figure['title'])}*", ""]
        for suffix, caption in EXAMPLES:
            file = f"{part.name}_{suffix}.png"
            if file_exists(join(out, "figures", file), storage_options):
                lines += [f"![{part.name} {suffix}](figures/{file})", "", f"*{caption}*", ""]
        lines += [table(rows, part.varying), ""]
    if history:
        lines += ["## Run history", "", "| time | seconds | " + " | ".join(k for k in history[0] if k not in
                                                                               ("time", "seconds")) + " |",
                  "|---|---|" + "---|" * (len(history[0]) - 2)]
        for h in history:
            lines.append(f"| {h['time']} | {h['seconds']} | "
                         + " | ".join(str(v) for k, v in h.items() if k not in ("time", "seconds")) + " |")
        lines.append("")
    text = "\n".join(lines)
    for file, picture in pictures.items():
        write_bytes(join(out, "figures", file), picture, storage_options)
    save_text(text, join(out, "report.md"), storage_options)
    return text
