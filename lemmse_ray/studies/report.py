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
keys (x, hue, style or category) are averaged.  The column ``setting`` is ``problem (input)``.
"""
from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from ..runs.config import join
from ..storage.files import read_bytes, save_text
from .figures import bar_figure, binned_figure, line_figure

TABLE_METRICS = (("psnr_z_x", "PSNR(z,x)"), ("psnr_lemmse_x", "PSNR(LE,x)"), ("psnr_net_lemmse", "PSNR(net,LE)"),
                 ("psnr_net_x", "PSNR(net,x)"), ("ess_median", "ESS med"), ("frac_ess_lt2", "ESS<2"),
                 ("copy_rate", "copy"), ("loss_floor", "floor"), ("mse_net_x", "MSE(net,x)"),
                 ("train_loss", "train loss"))


EXAMPLES = (("examples", "Test queries of one cell of this part: input, LE-MMSE, each network and the ground truth, "
                         "with the PSNR against the ground truth under each tile (drawn by the run)."),
            ("ess", "Per-pixel effective number of training patches of the same queries, log scale (drawn by the "
                    "run)."))


def read_rows(path: str, storage_options: dict | None = None) -> list[dict]:
    raw = read_bytes(path, storage_options)
    if raw is None:
        raise ValueError(f"out: {path} is missing; run the study first")
    rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    for row in rows:
        if "problem" in row and "input" in row:
            row["setting"] = f"{row['problem']} ({row['input']})"
    return rows


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


def draw(figure: Mapping, cells: list[dict], density: list[dict], path: str,
         storage_options: dict | None = None) -> bool:
    """Draw one declared figure to ``path``; False when no row is selected (nothing drawn)."""
    kind = figure.get("kind")
    common = {"title": figure["title"], "storage_options": storage_options}
    if kind == "binned":
        rows = select(density, figure.get("where"))
        if not rows:
            return False
        binned = average(rows, ["metric", "network", "bin", "lo", "hi"], ["mean", "se"])
        binned_figure(binned, path, **common)
        return True
    rows = [r for r in select(cells, figure.get("where"))]
    if kind == "line":
        hue, style = _columns(figure.get("hue")), _columns(figure.get("style"))
        band = figure.get("band")
        values = [figure["y"], *(band or [])]
        rows = [r for r in rows if r.get(figure["y"]) is not None and not math.isnan(r[figure["y"]])]
        if not rows:
            return False
        points = average(rows, [figure["x"], *hue, *style], values)
        line_figure(points, figure["x"], figure["y"], path, xlabel=figure["xlabel"], ylabel=figure["ylabel"],
                    hue=hue or None, style=style or None, logx=bool(figure.get("logx")),
                    logy=bool(figure.get("logy")), band=tuple(band) if band else None, **common)
        return True
    if kind == "bar":
        hue = _columns(figure.get("hue"))
        rows = [r for r in rows if r.get(figure["value"]) is not None and not math.isnan(r[figure["value"]])]
        if not rows:
            return False
        bars = average(rows, [figure["category"], *hue], [figure["value"]])
        bar_figure(bars, figure["category"], figure["value"], hue, path, ylabel=figure["ylabel"],
                   xlabel=figure.get("xlabel"), **common)
        return True
    raise ValueError(f"figures: kind must be line, bar or binned, got {kind!r}")


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
        if r.get("below_floor") and r["network"] != "none":
            gap = r["mse_gap"] / r["mse_gap_se"] if r.get("mse_gap_se") else math.nan
            out.append(f"- **{r['network']}** in cell {r['cell']} (σ = {r['sigma']:g}, {r['setting']}, P = "
                       f"{r['patch_size']}): MSE to x {r['mse_net_x']:.3e} on train queries, "
                       f"{gap:.1f} standard errors from the loss floor {r['loss_floor']:.3e}; final training loss "
                       f"{_fmt(r.get('train_loss'))}. A network cannot go below the floor with receptive field P: "
                       "this points to a leak, a bug, or a receptive field larger than P.")
    return out


def render(out: str, storage_options: dict | None = None) -> str:
    """Write ``<out>/report.md`` and ``<out>/figures/*.png`` from the study's files; returns the text."""
    raw = read_bytes(join(out, "study.json"), storage_options)
    if raw is None:
        raise ValueError(f"out: {out} holds no study.json; is it a study folder?")
    study = json.loads(raw)
    cells = read_rows(join(out, "cells.parquet"), storage_options)
    density = read_rows(join(out, "density.parquet"), storage_options)
    history_raw = read_bytes(join(out, "history.json"), storage_options)
    history = json.loads(history_raw) if history_raw else []
    lines = [f"# Study `{study['name']}`" + (f" (size {study['size']})" if study.get("size") else ""), "",
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
    for part in study["parts"]:
        rows = sorted((r for r in cells if r["part"] == part["name"]),
                      key=lambda r: (r["cell"], r["split"] != "train", r["network"] != "none", r["network"]))
        lines += [f"## {part['name']}", ""]
        if part.get("description"):
            lines += [part["description"], ""]
        for figure in part.get("figures", []):
            name = f"{part['name']}_{figure['file']}.png"
            if draw(figure, rows, [d for d in density if d["part"] == part["name"]],
                    join(out, "figures", name), storage_options):
                lines += [f"![{figure['title']}](figures/{name})", "", f"*{figure.get('caption', figure['title'])}*", ""]
        for suffix, caption in EXAMPLES:
            name = f"{part['name']}_{suffix}.png"
            if read_bytes(join(out, "figures", name), storage_options) is not None:
                lines += [f"![{part['name']} {suffix}](figures/{name})", "", f"*{caption}*", ""]
        lines += [table(rows, part.get("varying", [])), ""]
    if history:
        lines += ["## Run history", "", "| time | seconds | " + " | ".join(k for k in history[0] if k not in
                                                                               ("time", "seconds")) + " |",
                  "|---|---|" + "---|" * (len(history[0]) - 2)]
        for h in history:
            lines.append(f"| {h['time']} | {h['seconds']} | "
                         + " | ".join(str(v) for k, v in h.items() if k not in ("time", "seconds")) + " |")
        lines.append("")
    text = "\n".join(lines)
    save_text(text, join(out, "report.md"), storage_options)
    return text
