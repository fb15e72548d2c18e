"""``report.md`` and ``figures/*.png`` of a study, from its Parquet tables alone (no Ray, no arrays).

:func:`render` reads ``study.json`` (the spec: parts, their varying fields and declared figures),
``cells.parquet``, ``density.parquet`` and ``history.json``, and writes, per part, a table (varying
fields, split, network, receptive field and the main metrics), the part's figures with their one-sentence
captions, and a call-out of every network more than 3 standard errors below the loss floor.

A figure is declared in a spec as a mapping:

* ``kind: line`` -- ``x``, ``y`` columns of ``cells.parquet``, optional ``hue``, ``style`` (column or list),
  ``band: [lo, hi]``, ``logx``, ``logy``;
* ``kind: bar`` -- ``category``, ``value``, ``hue``;
* ``kind: binned`` -- the evidence-binned curves of ``density.parquet``;

each with ``file`` (PNG name), ``title``, ``xlabel``, ``ylabel``, ``caption`` and ``where`` ({column:
value or list of values}, e.g. ``network: none`` for the LE-MMSE-only rows).  Rows that share the plotted
keys (x, hue, style or category) are averaged.  The column ``setting`` is ``problem (input)``.  A figure
whose rows hold no value to draw is named in the report, not left out silently.

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
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..models.networks import NETWORKS
from ..runs.config import join
from ..storage.files import file_exists, save_text, write_bytes
from ..storage.inputs import read_json, read_table
from .figures import bar_figure, binned_figure, line_figure
from .spec import MAX_CELLS, NUMERIC_KEYS, Part, SpecError, figure_columns, parse_record

STUDY, CELLS, DENSITY, HISTORY = "study.json", "cells.parquet", "density.parquet", "history.json"
MAX_TABLE_BYTES = 256 << 20
DENSITY_BINS = 10  # the bins of analysis.cell_metrics (its default n_bins), per cell × split × network
# one cells row per cell × split × (the LE-MMSE and each network): the most a study can write
MAX_CELL_ROWS = 2 * MAX_CELLS * (1 + len(NETWORKS))
MAX_DENSITY_ROWS = DENSITY_BINS * MAX_CELL_ROWS
# the columns the report itself reads, by kind of value (figures add theirs)
CELL_COLUMNS = {"part": "text", "cell": "integer", "split": "text", "network": "text", "problem": "text",
                "input": "text", "sigma": "number", "patch_size": "integer"}
DENSITY_COLUMNS = {"part": "text", "metric": "text", "network": "text", "bin": "integer", "lo": "number",
                   "hi": "number", "mean": "number", "se": "number"}
NULLABLE = ("mean", "se")  # an empty bin's statistics
KINDS = {"text": (pa.types.is_string, pa.types.is_large_string),
         "integer": (pa.types.is_integer,),
         "number": (pa.types.is_integer, pa.types.is_floating)}
NAMES = {"text": "text", "integer": "integers", "number": "numbers"}

TABLE_METRICS = (("psnr_z_x", "PSNR(z,x)"), ("psnr_lemmse_x", "PSNR(LE,x)"), ("psnr_net_lemmse", "PSNR(net,LE)"),
                 ("psnr_net_x", "PSNR(net,x)"), ("ess_median", "ESS med"), ("frac_ess_lt2", "ESS<2"),
                 ("copy_rate", "copy"), ("loss_floor", "floor"), ("mse_net_x", "MSE(net,x)"),
                 ("train_loss", "train loss"))


EXAMPLES = (("examples", "Test queries of one cell of this part: input, LE-MMSE, each network and the ground truth, "
                         "with the PSNR against the ground truth under each tile (drawn by the run)."),
            ("ess", "Per-pixel effective number of training patches of the same queries, log scale (drawn by the "
                    "run)."))


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
    """The rows of a table as dicts, with ``setting`` = ``problem (input)`` where both are known."""
    rows = table.to_pylist()
    for row in rows:
        if "problem" in row and "input" in row:
            row["setting"] = f"{row['problem']} ({row['input']})"
    return rows


def check_figure_columns(figure: Mapping, where: str, table: pa.Table, path: str, study: str) -> None:
    """Every column ``figure`` (``where`` in the record ``study``) names must be in ``table`` (read from
    ``path``; or be ``setting``), numeric where it is drawn as a number."""
    names = set(table.column_names)
    derived = {"setting"} if {"problem", "input"} <= names else set()
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


def draw(figure: Mapping, cells: list[dict], density: list[dict]) -> bytes | None:
    """The PNG of one declared figure, or None when no selected row holds a value to draw."""
    kind = figure.get("kind")
    common = {"title": figure["title"]}
    if kind == "binned":
        rows = select(density, figure.get("where"))
        if not rows:
            return None
        binned = average(rows, ["metric", "network", "bin", "lo", "hi"], ["mean", "se"])
        return binned_figure(binned, None, **common)
    rows = [r for r in select(cells, figure.get("where"))]
    if kind == "line":
        hue, style = _columns(figure.get("hue")), _columns(figure.get("style"))
        band = figure.get("band")
        values = [figure["y"], *(band or [])]
        rows = [r for r in rows if _number(r.get(figure["y"]))]
        if not rows:
            return None
        points = average(rows, [figure["x"], *hue, *style], values)
        return line_figure(points, figure["x"], figure["y"], None, xlabel=figure["xlabel"], ylabel=figure["ylabel"],
                           hue=hue or None, style=style or None, logx=bool(figure.get("logx")),
                           logy=bool(figure.get("logy")), band=tuple(band) if band else None, **common)
    if kind == "bar":
        hue = _columns(figure.get("hue"))
        rows = [r for r in rows if _number(r.get(figure["value"]))]
        if not rows:
            return None
        bars = average(rows, [figure["category"], *hue], [figure["value"]])
        return bar_figure(bars, figure["category"], figure["value"], hue, None, ylabel=figure["ylabel"],
                          xlabel=figure.get("xlabel"), **common)
    raise ValueError(f"figures: kind must be line, bar or binned, got {kind!r}")


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
    out = []
    for r in rows:
        if r.get("below_floor") is True and r["network"] != "none":
            gap = (r["mse_gap"] / r["mse_gap_se"] if _number(r.get("mse_gap")) and _number(r.get("mse_gap_se"))
                   and r["mse_gap_se"] else math.nan)
            out.append(f"- **{r['network']}** in cell {r['cell']} (σ = {r['sigma']:g}, {r['setting']}, P = "
                       f"{r['patch_size']}): MSE to x {_fmt(r.get('mse_net_x'))} on train queries, "
                       f"{gap:.1f} standard errors from the loss floor {_fmt(r.get('loss_floor'))}; final "
                       f"training loss {_fmt(r.get('train_loss'))}. A network cannot go below the floor with "
                       "receptive field P: this points to a leak, a bug, or a receptive field larger than P.")
    return out


def read_study(out: str, storage_options: dict | None = None
               ) -> tuple[str, str | None, list[Part], list[dict], list[dict], list[dict]]:
    """(name, size, parts, cells rows, density rows, history) of a study folder, every check of the module
    docstring passed (density rows only where a part has a binned figure)."""
    path = join(out, STUDY)
    record = read_json(path, "out", storage_options=storage_options)
    if record is None:
        raise ValueError(f"out: {out} holds no study.json; is it a study folder?")
    try:
        name, size, parts = parse_record(record, path)
    except SpecError as err:
        raise ValueError(f"out: {err}") from None
    cells_path, density_path = join(out, CELLS), join(out, DENSITY)
    cells_table = read_rows(cells_path, CELL_COLUMNS, MAX_CELL_ROWS, storage_options=storage_options)
    binned = [(part, figure) for part in parts for figure in part.figures if figure["kind"] == "binned"]
    density_table = None
    if binned:
        where = [c for _, figure in binned for c in figure.get("where", {})]
        density_table = read_rows(density_path, DENSITY_COLUMNS, MAX_DENSITY_ROWS,
                                  columns=["problem", "input", *where], storage_options=storage_options)
    for i, part in enumerate(parts):
        for j, figure in enumerate(part.figures):
            binned_part = figure["kind"] == "binned"
            check_figure_columns(figure, f"parts[{i}].figures[{j}]", density_table if binned_part else cells_table,
                                 density_path if binned_part else cells_path, path)
    density: list[dict] = []
    for part_name in dict.fromkeys(part.name for part, _ in binned):  # the rows of those parts only
        density += as_rows(density_table.filter(pc.equal(density_table["part"], part_name)))
    history = read_history(join(out, HISTORY), storage_options)
    return name, size, parts, as_rows(cells_table), density, history


def render(out: str, storage_options: dict | None = None) -> str:
    """Write ``<out>/report.md`` and ``<out>/figures/*.png`` from the study's files; returns the text.

    Everything is read and checked, and every figure drawn in memory, before the first file is written."""
    name, size, parts, cells, density, history = read_study(out, storage_options)
    lines = [f"# Study `{name}`" + (f" (size {size})" if size else ""), "",
             f"{len({r['cell'] for r in cells})} cells; {len(cells)} rows in `cells.parquet` (one per cell × split × "
             "network; network `none` holds the LE-MMSE's own metrics). PSNR in dB (data range 1, mean over query "
             "images); RF = receptive field in pixels (the LE-MMSE's is P); ESS med = median effective number "
             "of training patches per pixel; copy = fraction of pixels whose most-weighted bank patch is the "
             "query's own noiseless patch; floor = mean posterior variance on train queries, the lowest MSE any "
             "network of receptive field P can reach (docs/theory.md).", ""]
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
                picture = draw(figure, rows, [d for d in density if d["part"] == part.name])
            except ValueError as err:
                raise ValueError(f"out: {join(out, STUDY)}: parts[{i}].figures[{j}] ({figure['file']}): {err}") \
                    from None
            if picture is None:
                lines += [f"*Figure `{file}` ({figure['title']}) is not drawn: no row of this part selected by its "
                          "`where` holds a value to draw.*", ""]
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
