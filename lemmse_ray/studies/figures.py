r"""Figures of a study, as small PNG files (matplotlib, Agg renderer, no global pyplot state).

* :func:`image_grid_figure` -- labelled rows of images (input, LE-MMSE, networks) with the PSNR against the
  ground truth under each tile, the ground truth as the last row;
* :func:`ess_map_figure` -- inputs beside their per-pixel effective number of patches (log colour scale);
* :func:`line_figure` -- curves of one column against another from Parquet-style rows (σ, P or N sweeps),
  one colour per ``hue`` value, one line style per ``style`` value, optional shaded bands (quartiles);
* :func:`bar_figure` -- grouped bars with their values printed (e.g. PSNR(net, LE-MMSE) per problem ×
  network × split);
* :func:`binned_figure` -- the evidence-binned error curves of :func:`lemmse_ray.studies.analysis.density_rows`.

Every function validates its input before drawing (ValueError naming the parameter) and writes to a local
path (atomically) or an fsspec URL through :func:`lemmse_ray.storage.files.write_bytes`.  The curves and
bars take ``path=None`` too, and then return the PNG's bytes: a report draws every figure first and writes
only once all of them could be drawn.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..core.metrics import PSNR_CAP, psnr_of_mse
from ..runs.report import as_images, draw_image_grid, show_image
from ..storage.files import write_bytes

DPI = 120
SIZE = (6.0, 4.0)  # inches: 720 × 480 pixels at DPI
MAX_WIDTH = 10.0  # inches, image grids
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _save(fig: Figure, path: str | None, storage_options: dict | None) -> bytes | None:
    """Write the figure as PNG to ``path``; with ``path=None`` return the PNG's bytes instead."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    if path is None:
        return buffer.getvalue()
    write_bytes(str(path), buffer.getvalue(), storage_options)
    return None


def _check_path(path: Any, optional: bool = False) -> str | None:
    if optional and path is None:
        return None
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string (local path or fsspec URL), got {path!r}")
    return path


def image_grid_figure(rows: Mapping[str, Any], x: Any, path: str, title: str, max_images: int = 8,
                      storage_options: dict | None = None) -> None:
    """Rows of images labelled by the keys of ``rows`` ({label: (B, C, H, W)}, e.g. "input z", "LE-MMSE",
    each network), the ground truth ``x`` (B, C, H, W) as the last row, and under each tile its PSNR
    against ``x`` (dB, data range 1).  The first ``max_images`` images are shown; values are clipped to
    [0, 1] for display only."""
    _check_path(path)
    _save(draw_image_grid(rows, x, title, max_images), path, storage_options)


def ess_map_figure(z: Any, ess: Any, path: str, title: str, max_images: int = 4,
                   storage_options: dict | None = None) -> None:
    """Each input ``z`` (B, C, H, W) beside its per-pixel effective number of patches ``ess`` (B, H, W),
    on a log colour scale from 1 (one training patch) with a colourbar; first ``max_images`` images."""
    _check_path(path)
    inputs = as_images(z, "z")
    if isinstance(ess, torch.Tensor):
        ess = ess.detach().cpu().numpy()
    ess = np.asarray(ess, dtype=np.float64)
    if ess.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ValueError(f"ess must have shape {(inputs.shape[0], *inputs.shape[2:])}, got {ess.shape}")
    if not np.isfinite(ess).all() or (ess < 1 - 1e-6).any():
        raise ValueError("ess values must be finite and ≥ 1")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
    n = min(max_images, len(inputs))
    norm = LogNorm(vmin=1.0, vmax=max(float(ess[:n].max()), 2.0))
    fig = Figure(figsize=(2.2 * n + 1.0, 4.6))
    axes = fig.subplots(2, n, squeeze=False)
    for b in range(n):
        show_image(axes[0, b], inputs[b])
        axes[0, b].set_title(f"image {b}", fontsize=8)
        shown = axes[1, b].imshow(np.clip(ess[b], 1.0, None), norm=norm, cmap="viridis", interpolation="nearest")
        axes[1, b].set_xticks([])
        axes[1, b].set_yticks([])
    axes[0, 0].set_ylabel("input z", fontsize=8)
    axes[1, 0].set_ylabel("ESS per pixel", fontsize=8)
    bar = fig.colorbar(shown, ax=axes[1, :].tolist(), shrink=0.9, pad=0.02)
    bar.set_label("ESS (training patches, log scale)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path, storage_options)


def _column(rows: Sequence[Mapping], name: str, param: str, numeric: bool = True) -> list:
    missing = [i for i, row in enumerate(rows) if name not in row]
    if missing:
        raise ValueError(f"{param}: column {name!r} is missing from row {missing[0]}")
    values = [row[name] for row in rows]
    if numeric:
        for v in values:
            if v is None or isinstance(v, (bool, str)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"{param}: column {name!r} must hold numbers, got {v!r}")
    return values


def _label(row: Mapping, columns: Sequence[str]) -> str:
    return ", ".join(str(row[c]) for c in columns)


def _as_columns(value: str | Sequence[str] | None, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    columns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"{name} must be a column name or a sequence of column names, got {value!r}")
    return columns


def _check_labels(**texts: Any) -> None:
    for name, text in texts.items():
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string")


def _facets(rows: Sequence[Mapping], facet: str | None) -> list[tuple[str, list[int]]]:
    """(label, row indices) per value of the ``facet`` column, in order of appearance ([("", all)] without)."""
    if facet is None:
        return [("", list(range(len(rows))))]
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(_column(rows, facet, "facet", numeric=False)):
        groups.setdefault(str(value), []).append(i)
    return list(groups.items())


def _panels(title: str, xlabel: str, ylabel: str, facets: list[tuple[str, list[int]]], facet: str | None,
            size: tuple[float, float] = SIZE) -> tuple[Figure, list]:
    """A figure with one panel per facet (side by side, shared y), each titled by its facet value."""
    _check_labels(title=title, xlabel=xlabel, ylabel=ylabel)
    fig = Figure(figsize=(size[0] * (1 + 0.75 * (len(facets) - 1)), size[1]))
    axes = fig.subplots(1, len(facets), squeeze=False, sharey=True)[0].tolist()
    for ax, (label, _) in zip(axes, facets):
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        if facet is not None:
            ax.set_title(label if facet == "panel" else f"{facet} = {label}", fontsize=9)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _hline(axes: list, hline: float | None, label: str | None) -> None:
    if hline is None:
        return
    if isinstance(hline, bool) or not isinstance(hline, (int, float)) or not math.isfinite(hline):
        raise ValueError(f"hline must be a finite number, got {hline!r}")
    for ax in axes:
        ax.axhline(hline, color="0.3", linestyle=(0, (1, 1)), linewidth=1.2, label=label or f"{hline:g}")


def draw_lines(rows: Sequence[Mapping], x: str, y: str, title: str, xlabel: str, ylabel: str,
               hue: str | Sequence[str] | None = None, style: str | Sequence[str] | None = None,
               logx: bool = False, logy: bool = False, band: tuple[str, str] | None = None,
               error: str | None = None, facet: str | None = None, hline: float | None = None,
               hline_label: str | None = None, references: Mapping[str, str] | None = None,
               legend_title: str | None = None) -> Figure:
    """The :class:`Figure` of :func:`line_figure` (tests inspect its artists)."""
    if not isinstance(rows, Sequence) or not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("rows must be a non-empty sequence of dicts")
    hues, styles = _as_columns(hue, "hue"), _as_columns(style, "style")
    xs, ys = _column(rows, x, "x"), _column(rows, y, "y")
    los = his = errs = []
    if band is not None:
        if not (isinstance(band, (tuple, list)) and len(band) == 2):
            raise ValueError(f"band must be a (lo, hi) pair of column names, got {band!r}")
        los, his = _column(rows, band[0], "band"), _column(rows, band[1], "band")
    if error is not None:
        errs = _column(rows, error, "error")
    refs = {label: _column(rows, column, "references") for column, label in (references or {}).items()}
    for c in hues + styles:
        _column(rows, c, "hue" if c in hues else "style", numeric=False)
    if logx and any(not v > 0 for v in xs):
        raise ValueError(f"logx: column {x!r} has values ≤ 0")
    if logy and any(not v > 0 for v in ys + los + his if math.isfinite(v)):
        raise ValueError(f"logy: column {y!r} (or the band) has values ≤ 0")
    facets = _facets(rows, facet)
    fig, axes = _panels(title, xlabel, ylabel, facets, facet)
    hue_values = list(dict.fromkeys(_label(r, hues) for r in rows))
    style_values = list(dict.fromkeys(_label(r, styles) for r in rows))
    colours = [f"C{i % 10}" for i in range(len(hue_values))]
    for ax, (_, members) in zip(axes, facets):
        groups: dict[tuple[str, str], list[int]] = {}
        for i in members:
            groups.setdefault((_label(rows[i], hues), _label(rows[i], styles)), []).append(i)
        for (h, s), index in groups.items():
            index = sorted(index, key=lambda i: xs[i])
            hi_, si = hue_values.index(h), style_values.index(s)
            label = ", ".join(part for part in (h, s) if part) or y
            px, py = [xs[i] for i in index], [ys[i] for i in index]
            ax.plot(px, py, color=colours[hi_], linestyle=LINESTYLES[si % len(LINESTYLES)],
                    marker=MARKERS[hi_ % len(MARKERS)], markersize=4, label=label)
            if band is not None:
                ax.fill_between(px, [los[i] for i in index], [his[i] for i in index], color=colours[hi_], alpha=0.15,
                                linewidth=0)
            if error is not None:
                spread = [errs[i] if math.isfinite(errs[i]) else 0.0 for i in index]
                ax.errorbar(px, py, yerr=spread, fmt="none", ecolor=colours[hi_], elinewidth=0.8, capsize=2)
        by_style: dict[str, list[int]] = {}
        for i in members:
            by_style.setdefault(_label(rows[i], styles), []).append(i)
        for r, (label, values) in enumerate(refs.items()):  # constant in x: one level per style (e.g. split)
            for s, index in by_style.items():
                level = [values[i] for i in index if math.isfinite(values[i])]
                if level:
                    ax.axhline(float(np.mean(level)), color=f"{0.15 + 0.3 * r:.2f}",
                               linestyle=LINESTYLES[style_values.index(s) % len(LINESTYLES)], linewidth=1.4,
                               label=", ".join(part for part in (label, s) if part))
        _hline([ax], hline, hline_label)
        if logx:
            ax.set_xscale("log")
            ticks = sorted({xs[i] for i in members})
            if len(ticks) <= 12:  # label the sampled values themselves (σ, N), not crowded minor ticks
                ax.set_xticks(ticks, [f"{v:g}" for v in ticks], fontsize=8)
                ax.xaxis.set_minor_formatter(NullFormatter())
        if logy:
            ax.set_yscale("log")
    if len(hue_values) * len(style_values) > 1 or hues or styles or refs or hline is not None:
        if legend_title is None:
            legend_title = " / ".join(part for part in (", ".join(hues), ", ".join(styles)) if part) or None
        handles = _legend_entries(axes)
        # outside the panels, as on the bar figures: a legend inside would hide the curves it names
        axes[-1].legend(handles.values(), handles.keys(), fontsize=7, title=legend_title, title_fontsize=7,
                        loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _legend_entries(axes: list) -> dict:
    """{label: handle} of every panel, in order, each label once (a curve may be drawn in some panels only)."""
    entries: dict = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels):
            entries.setdefault(label, handle)
    return entries


def line_figure(rows: Sequence[Mapping], x: str, y: str, path: str | None, title: str, xlabel: str, ylabel: str,
                hue: str | Sequence[str] | None = None, style: str | Sequence[str] | None = None,
                logx: bool = False, logy: bool = False, band: tuple[str, str] | None = None,
                error: str | None = None, facet: str | None = None, hline: float | None = None,
                hline_label: str | None = None, references: Mapping[str, str] | None = None,
                legend_title: str | None = None, storage_options: dict | None = None) -> bytes | None:
    """Curves of column ``y`` against column ``x`` of ``rows`` (dicts, e.g. Parquet rows).

    One colour (and marker) per value of the ``hue`` column(s), one line style per value of the ``style``
    column(s) (e.g. ``"split"``: train solid, test dashed, so train and test of one network share a colour);
    one panel per value of the ``facet`` column (e.g. the dataset), side by side with a shared y axis; points
    sorted by ``x``.  ``band`` = (lo, hi) columns shades the range between them (quartiles); ``error``
    names a column of symmetric error bars (a standard error); ``hline`` draws a reference level (e.g. the
    paper's 25 dB) labelled ``hline_label``; ``references`` ({column: label}) draws each column, constant in
    ``x`` (an estimator that does not depend on it), as a grey horizontal line per style value.
    ``logx``/``logy`` use log axes (every plotted value must then be > 0).  The legend title defaults to the
    hue and style column names.  ``path=None``: the PNG's bytes are returned."""
    _check_path(path, optional=True)
    fig = draw_lines(rows, x, y, title, xlabel, ylabel, hue, style, logx, logy, band, error, facet, hline,
                     hline_label, references, legend_title)
    return _save(fig, path, storage_options)


def draw_bars(rows: Sequence[Mapping], category: str, value: str, hue: str | Sequence[str], title: str,
              ylabel: str, xlabel: str | None = None, decimals: int = 1, error: str | None = None,
              facet: str | None = None, hline: float | None = None, hline_label: str | None = None) -> Figure:
    """The :class:`Figure` of :func:`bar_figure` (tests inspect its artists)."""
    if not isinstance(rows, Sequence) or not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("rows must be a non-empty sequence of dicts")
    hues = _as_columns(hue, "hue")
    if not hues:
        raise ValueError("hue must name at least one column")
    cats = [str(c) for c in _column(rows, category, "category", numeric=False)]
    values = _column(rows, value, "value")
    errs = _column(rows, error, "error") if error is not None else [math.nan] * len(rows)
    for c in hues:
        _column(rows, c, "hue", numeric=False)
    labels = [_label(r, hues) for r in rows]
    facets = _facets(rows, facet)
    cat_values, hue_values = list(dict.fromkeys(cats)), list(dict.fromkeys(labels))
    table: dict[tuple[str, str, str], tuple[float, float]] = {}
    for f, members in facets:
        for i in members:
            if (f, cats[i], labels[i]) in table:
                raise ValueError(f"rows: two rows for {category}={cats[i]!r}, {labels[i]}; aggregate them first")
            table[(f, cats[i], labels[i])] = (float(values[i]), float(errs[i]))
    width = 0.8 / len(hue_values)
    # with the split among the hue columns, train and test of one network share a colour (test hatched)
    split = hues.index("split") if "split" in hues and len(hues) > 1 else None
    colour_keys = list(dict.fromkeys(_label({**r, "split": ""}, [c for c in hues if c != "split"]) if split is not None
                                     else labels[i] for i, r in enumerate(rows)))
    fig, axes = _panels(title, xlabel or category, ylabel, facets, facet,
                        (max(SIZE[0], 1.0 + 0.35 * len(cat_values)), SIZE[1]))
    for ax, (f, _) in zip(axes, facets):
        # a panel shows the categories it has rows for: a setting run at one σ leaves no empty slot in another
        shown = [c for c in cat_values if any((f, c, h) in table for h in hue_values)]
        for j, h in enumerate(hue_values):
            row = rows[labels.index(h)]
            key = _label(row, [c for c in hues if c != "split"]) if split is not None else h
            colour, hatch = f"C{colour_keys.index(key) % 10}", ("//" if split is not None and row["split"] != "train"
                                                                   else None)
            present = [(i, c) for i, c in enumerate(shown) if (f, c, h) in table]
            if not present:
                continue
            pos = [i + (j - (len(hue_values) - 1) / 2) * width for i, _ in present]
            heights = [table[(f, c, h)][0] for _, c in present]
            spread = [table[(f, c, h)][1] for _, c in present]
            bars = ax.bar(pos, heights, width=width * 0.95, label=h, color=colour, hatch=hatch, edgecolor="white",
                          yerr=[e if math.isfinite(e) else 0.0 for e in spread] if error is not None else None,
                          error_kw={"elinewidth": 0.8, "capsize": 2})
            ax.bar_label(bars, labels=[f"{v:.{decimals}f}" for v in heights], fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(shown)), shown, rotation=20 if len(shown) > 2 else 0, fontsize=8,
                      ha="right" if len(shown) > 2 else "center")
        ax.margins(y=0.15)
        _hline([ax], hline, hline_label)
    unique = _legend_entries(axes)
    axes[-1].legend(unique.values(), unique.keys(), fontsize=7, title=", ".join(hues), title_fontsize=7,
                    loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def bar_figure(rows: Sequence[Mapping], category: str, value: str, hue: str | Sequence[str], path: str | None,
               title: str, ylabel: str, xlabel: str | None = None, decimals: int = 1, error: str | None = None,
               facet: str | None = None, hline: float | None = None, hline_label: str | None = None,
               storage_options: dict | None = None) -> bytes | None:
    """Grouped bars: one group per value of ``category`` (e.g. problem), one bar per value of the ``hue``
    column(s) (e.g. network and split), height ``value`` printed on the bar, ± the ``error`` column as error
    bars; one panel per value of ``facet`` (e.g. σ, the dataset), showing the categories it has rows for;
    ``hline`` a labelled reference level.  A missing (category, hue) pair leaves a gap; two rows for one (facet, category, hue) are an error
    (aggregate first).  ``path=None``: the PNG's bytes are returned."""
    _check_path(path, optional=True)
    fig = draw_bars(rows, category, value, hue, title, ylabel, xlabel, decimals, error, facet, hline, hline_label)
    return _save(fig, path, storage_options)


METRIC_LABELS = {"mse_lemmse_x": "|LE-MMSE − x|²", "mse_net_lemmse": "|{network} − LE-MMSE|²"}


def binned_figure(rows: Sequence[Mapping], path: str | None, title: str,
                  xlabel: str = "log-evidence percentile within its class", ylabel: str = "MSE per pixel",
                  logy: bool | None = None, style: str | None = None, facet: str | None = None,
                  storage_options: dict | None = None) -> bytes | None:
    """The curves of :func:`lemmse_ray.studies.analysis.density_rows` (columns ``metric``, ``network``, ``lo``,
    ``hi``, ``mean``, ``se``): mean error per bin at the bin centre, ± one standard error shaded; empty
    bins are skipped.  One colour per error (metric and network), one line style per value of the ``style``
    column (e.g. σ: curves of different noise levels are never averaged), one panel per value of ``facet``.
    ``logy=None`` uses a log axis when every mean is > 0 and they span more than a factor 10.  ``path=None``:
    the PNG's bytes are returned."""
    if not isinstance(rows, Sequence) or not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("rows must be a non-empty sequence of dicts")
    for name in ("metric", "network", "lo", "hi", "mean", "se"):
        _column(rows, name, "rows", numeric=name in ("lo", "hi"))
    extra = [c for c in (style, facet) if c is not None]
    for column in extra:
        _column(rows, column, "style" if column == style else "facet", numeric=False)
    means = [r["mean"] for r in rows if r["mean"] is not None and math.isfinite(r["mean"])]
    if logy is None:
        logy = bool(means) and min(means) > 0 and max(means) > 10 * min(means)
    points = []
    for row in rows:
        if row["metric"] not in METRIC_LABELS:
            raise ValueError(f"rows: unknown metric {row['metric']!r}; expected one of {tuple(METRIC_LABELS)}")
        mean = row["mean"]
        if mean is None or not math.isfinite(mean):
            continue
        se = row["se"] if row["se"] is not None and math.isfinite(row["se"]) else 0.0
        lo = mean - se
        points.append({"center": (row["lo"] + row["hi"]) / 2, "mean": mean, "lo": lo if not logy or lo > 0 else mean,
                       "hi": mean + se, "curve": METRIC_LABELS[row["metric"]].format(network=row["network"]),
                       **{c: (f"{c} = {row[c]:g}" if isinstance(row[c], float) else f"{c} = {row[c]}") for c in extra}})
    if not points:
        raise ValueError("rows: every bin is empty")
    return line_figure(points, "center", "mean", path, title, xlabel, ylabel, hue="curve", style=style, logy=logy,
                       band=("lo", "hi"), facet=facet, legend_title="error (mean ± s.e.)",
                       storage_options=storage_options)


def draw_problem_grid(rows: Sequence[tuple[str, Mapping[str, Any], Any]], title: str) -> Figure:
    """The :class:`Figure` of :func:`problem_grid_figure` (tests inspect its artists)."""
    if not isinstance(rows, Sequence) or not rows:
        raise ValueError("rows must be a non-empty sequence of (label, {column: (C, H, W) image}, x)")
    _check_labels(title=title)
    columns: list[str] = []
    checked = []
    for r, row in enumerate(rows):
        if not (isinstance(row, (tuple, list)) and len(row) == 3 and isinstance(row[0], str) and row[0]
                and isinstance(row[1], Mapping) and row[1]):
            raise ValueError(f"rows[{r}] must be (label, {{column: (C, H, W) image}}, x)")
        truth = as_images(np.asarray(row[2])[None], f"rows[{r}] x")
        tiles = {}
        for label, image in row[1].items():
            if not isinstance(label, str) or not label:
                raise ValueError(f"rows[{r}]: column labels must be non-empty strings, got {label!r}")
            tiles[label] = as_images(np.asarray(image)[None], f"rows[{r}][{label!r}]")
            if tiles[label].shape != truth.shape:
                raise ValueError(f"rows[{r}][{label!r}] has shape {tiles[label].shape[1:]}, but x has {truth.shape[1:]}")
            if label not in columns:
                columns.append(label)
        checked.append((row[0], tiles, truth))
    columns.append("ground truth x")
    tile = min(1.3, MAX_WIDTH / len(columns))
    fig = Figure(figsize=(tile * len(columns) + 2.6, (tile + 0.45) * len(rows) + 0.8))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (label, tiles, truth) in enumerate(checked):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            if column == "ground truth x":
                show_image(ax, truth[0])
            elif column in tiles:
                show_image(ax, tiles[column][0])
                value = float(psnr_of_mse(((tiles[column] - truth) ** 2).mean()))
                ax.set_xlabel(f"{value:.1f} dB", fontsize=7, labelpad=2)
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(column, fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center", wrap=True)
    fig.suptitle(f"{title}\n(PSNR against x under each tile, capped at {PSNR_CAP:g} dB)", fontsize=9)
    fig.subplots_adjust(wspace=0.08, hspace=0.45, left=0.3)
    return fig


def problem_grid_figure(rows: Sequence[tuple[str, Mapping[str, Any], Any]], path: str, title: str,
                        storage_options: dict | None = None) -> None:
    """The paper's Figure 1: one row per setting (``rows``: (label, {column: (C, H, W) image}, x), e.g.
    problem × σ), one column per estimator (input z, LE-MMSE, each network; a row without a column leaves it
    blank), the ground truth last, and under each tile its PSNR against x (capped, never inf)."""
    _check_path(path)
    _save(draw_problem_grid(rows, title), path, storage_options)
