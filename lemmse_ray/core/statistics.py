r"""The statistics of an estimate: one table, :data:`STATISTICS`, declares each, and everything else reads it.

For a query with logits :math:`s_r` over the bank rows :math:`r` it meets and values :math:`v_r`, the weights
are :math:`w_r = e^{s_r-\log Z}` with :math:`\log Z = m + \log l`, in the notation of a merged partial
(:mod:`lemmse_ray.core.partials`: :math:`m=\max_r s_r`, :math:`l=\sum_r e^{s_r-m}`, :math:`o=\sum_r e^{s_r-m}v_r`,
and the optional sums :math:`o_2, l_2, l_s`, top-k).  :func:`finalize` computes

* ``mean`` :math:`=o/l=\sum_r w_r v_r`, the posterior mean (always);
* ``variance`` :math:`=o_2/l-\text{mean}^2=\sum_r w_r v_r^2-(\sum_r w_r v_r)^2` per channel (clamped at 0);
* ``ess`` :math:`=l^2/l_2=1/\sum_r w_r^2`, the effective number of patches;
* ``max_weight`` :math:`=1/l=\max_r w_r` (the largest term of :math:`l` is :math:`e^{m-m}=1`);
* ``entropy`` :math:`=m+\log l-l_s/l=-\sum_r w_r\log w_r`;
* ``log_evidence`` :math:`=m+\log l-\log N_\text{rows}`, the log-density of the query under the patch
  distribution, uniform over the :math:`N_\text{rows}` bank rows;
* ``topk``: the :math:`k` largest logits and their rows, laid out as the rows' (training image, position).

Each :class:`Statistic` names the optional partial sums it needs (so that the kernels accumulate only those,
:func:`sums_of`), how :func:`finalize` computes its per-query values, and its output arrays
(:class:`Output`: name, grid, dtype).  :class:`Result`, :func:`to_result`, the Zarr result groups
(:mod:`lemmse_ray.storage.results`), the study analysis and the configuration's choices are derived from the
table, and the backends that produce a statistic from the sums each accumulates (:data:`BACKEND_SUMS`).  A
statistic computable from existing sums is one more entry of the table (or one :func:`register` call).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, make_dataclass
from typing import Callable, Iterable

import torch

from .partials import RESCALED, SUMS, TOPK, Partials, check_sums

#: Output grids, per query image: per channel (C, H, W), per pixel (H, W), per top-k entry (H, W, k).
CHANNELS, PIXELS, PER_TOPK = "channels", "pixels", "topk"
#: Output dtypes: the run's float dtype, or int64.
FLOAT, INT64 = "float", "int64"
#: The optional partial sums each kernel backend accumulates (top-k rows: the torch kernel only).
BACKEND_SUMS = {"torch": SUMS, "triton": tuple(RESCALED), "sliding": tuple(RESCALED)}


@dataclass(frozen=True)
class Output:
    """One output array of a statistic: (B, *grid) for B query images.

    ``name``: the :class:`Result` field and the array of a result group; ``grid``: :data:`CHANNELS`,
    :data:`PIXELS` or :data:`PER_TOPK`; ``dtype``: :data:`FLOAT` or :data:`INT64`.  ``value``: the key of the
    per-query value of :func:`finalize` it lays out (default ``name``); ``source_column``: for a value of global
    row ids, the column of the bank's (training image, position) table to report (rows −1, none, stay −1).
    """

    name: str
    grid: str
    dtype: str = FLOAT
    value: str | None = None
    source_column: int | None = None

    def shape(self, channels: int, height: int, width: int, topk: int) -> tuple[int, ...]:
        """Shape of one query image's array."""
        grids = {CHANNELS: (channels, height, width), PIXELS: (height, width), PER_TOPK: (height, width, topk)}
        return grids[self.grid]


@dataclass(frozen=True)
class Statistic:
    """One requestable statistic (``stats=(name, ...)``; the formulas are in the module docstring).

    ``sums``: the optional :class:`~lemmse_ray.core.partials.Partials` sums it needs (names of
    :data:`~lemmse_ray.core.partials.SUMS`); ``compute(part, mean, n_rows)``: its per-query values from a merged
    partial, the posterior mean and the bank's row count, by key; ``outputs``: its arrays; ``concentration``:
    a per-pixel measure of how concentrated the weights are (studies report its quantiles).
    """

    name: str
    sums: tuple[str, ...]
    compute: Callable[[Partials, torch.Tensor, int], dict[str, torch.Tensor]]
    outputs: tuple[Output, ...]
    concentration: bool = False

    @property
    def backends(self) -> tuple[str, ...]:
        """The kernel backends that produce it: those that accumulate every sum it needs."""
        return tuple(b for b, sums in BACKEND_SUMS.items() if set(self.sums) <= set(sums))


MEAN = Output("mean", CHANNELS)

STATISTICS: dict[str, Statistic] = {s.name: s for s in (
    Statistic("variance", ("o2",), lambda part, mean, n_rows: {
        "variance": torch.clamp(part.o2 / part.l[:, None] - mean ** 2, min=0)}, (Output("variance", CHANNELS),)),
    Statistic("ess", ("l2",), lambda part, mean, n_rows: {"ess": part.l * part.l / part.l2},
              (Output("ess", PIXELS),), concentration=True),
    Statistic("max_weight", (), lambda part, mean, n_rows: {"max_weight": 1.0 / part.l},
              (Output("max_weight", PIXELS),), concentration=True),
    Statistic("entropy", ("ls",), lambda part, mean, n_rows: {
        "entropy": part.m + torch.log(part.l) - part.ls / part.l}, (Output("entropy", PIXELS),), concentration=True),
    Statistic("log_evidence", (), lambda part, mean, n_rows: {
        "log_evidence": part.m + torch.log(part.l) - math.log(n_rows)}, (Output("log_evidence", PIXELS),)),
    Statistic("topk", TOPK, lambda part, mean, n_rows: {"topk_logits": part.top_s, "topk_rows": part.top_r},
              (Output("topk_image", PER_TOPK, INT64, "topk_rows", 0),
               Output("topk_position", PER_TOPK, INT64, "topk_rows", 1), Output("topk_logits", PER_TOPK))),
)}


def outputs(stats: Iterable[str] | None = None) -> tuple[Output, ...]:
    """The mean and the outputs of ``stats`` (default: every statistic of the table), in the table's order."""
    chosen = set(STATISTICS) if stats is None else set(stats)
    return (MEAN, *(o for s in STATISTICS.values() if s.name in chosen for o in s.outputs))


#: The requestable statistics (``stats=``), in the table's order.
STATS = tuple(STATISTICS)
#: Every output array, the mean first, in the table's order.
OUTPUTS = outputs()


def register(statistic: Statistic) -> None:
    """Add ``statistic`` to :data:`STATISTICS` (last), after checking that its name, its outputs' names and its
    sums are valid.

    What reads the table per call sees it at once (:func:`check_stats`, :func:`sums_of`, :func:`finalize`,
    :func:`to_result`, the kernels, :func:`lemmse_ray.storage.results.open_results`); names derived at import
    (:data:`STATS`, :data:`OUTPUTS`, the fields of :class:`Result` and of
    :class:`~lemmse_ray.storage.results.EstimateArrays`, the configuration's choices) keep the table they were
    derived from, and :func:`to_result` returns a subclass of :class:`Result` with the new outputs as fields.
    """
    taken = {o.name for o in outputs()}
    names = [o.name for o in statistic.outputs]
    if statistic.name in STATISTICS or statistic.name == MEAN.name:
        raise ValueError(f"statistic: {statistic.name!r} is already a statistic")
    if not names or len(set(names)) < len(names) or taken & set(names):
        raise ValueError(f"statistic: {statistic.name!r} needs outputs with new, distinct names, got {names}")
    for o in statistic.outputs:
        if o.grid not in (CHANNELS, PIXELS, PER_TOPK) or o.dtype not in (FLOAT, INT64):
            raise ValueError(f"statistic: output {o.name!r} has grid {o.grid!r}, dtype {o.dtype!r}")
    check_sums(statistic.sums)
    STATISTICS[statistic.name] = statistic


def statistic_named(name: str) -> Statistic:
    """The entry of :data:`STATISTICS` called ``name``."""
    if name not in STATISTICS:
        raise ValueError(f"stats: unknown statistic {name!r}; choose from {tuple(STATISTICS)}")
    return STATISTICS[name]


def check_stats(stats, topk: int) -> tuple[str, ...]:
    """``stats`` as a tuple of names of :data:`STATISTICS`, and ``topk`` a positive integer when one of them
    has a per-top-k output."""
    stats = tuple(stats or ())
    for name in stats:
        statistic_named(name)
    if any(o.grid == PER_TOPK for o in outputs(stats)) and (isinstance(topk, bool) or not isinstance(topk, int)
                                                            or topk < 1):
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    return stats


def sums_of(stats: Iterable[str]) -> tuple[str, ...]:
    """The optional partial sums that the statistics ``stats`` need, in the order of
    :data:`~lemmse_ray.core.partials.SUMS` (what the kernels accumulate)."""
    needed = {s for name in stats for s in statistic_named(name).sums}
    return tuple(s for s in SUMS if s in needed)


def unsupported(stats: Iterable[str], backend: str) -> tuple[str, ...]:
    """The statistics of ``stats`` that the kernel ``backend`` does not produce."""
    return tuple(name for name in stats if backend not in statistic_named(name).backends)


def finalize(part: Partials, n_rows_total: int) -> dict[str, torch.Tensor]:
    r"""Posterior mean and statistics from a merged partial (formulas in the module docstring).

    Returns the per-query ``mean`` and the values of every statistic of :data:`STATISTICS` whose sums ``part``
    holds (``max_weight`` and ``log_evidence`` need none: always), with ``n_rows_total`` the bank's row count.
    """
    if bool((part.l <= 0).any()):
        raise ValueError("some queries met no bank rows (their class is absent from the bank)")
    out = {"mean": part.o / part.l[:, None]}
    if not bool(torch.isfinite(out["mean"]).all()):
        raise ValueError("sigma: the estimate is not finite: the logits overflowed the arithmetic's range "
                         "(use dtype float64, or a larger sigma)")
    for statistic in STATISTICS.values():
        if all(getattr(part, name) is not None for name in statistic.sums):
            out.update(statistic.compute(part, out["mean"], n_rows_total))
    return out


def output_fields(annotation: str) -> Callable[[type], type]:
    """Class decorator, under ``@dataclass``: one field ``name: annotation = None`` per output of :data:`OUTPUTS`
    but the mean, inserted after the class's ``mean`` field in the table's order."""
    def add(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        at = list(own).index("mean") + 1
        names = [o.name for o in OUTPUTS[1:]]
        cls.__annotations__ = {**dict(list(own.items())[:at]), **dict.fromkeys(names, annotation),
                               **dict(list(own.items())[at:])}
        for name in names:
            setattr(cls, name, None)
        return cls
    return add


@dataclass
@output_fields("torch.Tensor | None")
class Result:
    """Estimate and statistics, each on the query images' pixel grid (B query images).

    ``mean``: (B, C, H, W); then one field per output of :data:`STATISTICS` (``variance``: (B, C, H, W);
    ``ess``, ``max_weight``, ``entropy``, ``log_evidence``: (B, H, W); ``topk_image``, ``topk_position``
    (row·W + col), ``topk_logits``: (B, H, W, k)), ``None`` when not requested; ``info``: what the estimate ran
    with.
    """

    mean: torch.Tensor
    info: dict = field(default_factory=dict)


@functools.cache
def result_type(extra: tuple[Output, ...]) -> type:
    """:class:`Result`, or with ``extra`` outputs (registered after import) a subclass with them as fields."""
    if not extra:
        return Result
    return make_dataclass("Result", [(o.name, "torch.Tensor | None", field(default=None)) for o in extra],
                          bases=(Result,), namespace={"__doc__": Result.__doc__, "__module__": __name__})


def to_result(stats_out: dict[str, torch.Tensor], source: torch.Tensor, shape: tuple[int, ...],
              stats: tuple[str, ...]) -> Result:
    """Lay the outputs of ``stats`` out on image grids: per-query values of :func:`finalize` (query order
    image, row, column) → (B, *grid); row ids → their (training image, position) through ``source`` (indexed by
    a tensor of row ids; looked up once per value)."""
    batch, channels, height, width = shape
    grid = lambda t: t.reshape(batch, height, width, *t.shape[1:])  # noqa: E731
    looked_up: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    values = {}
    for o in outputs(stats):
        key = o.value or o.name
        value = stats_out[key]
        if o.source_column is not None:
            if key not in looked_up:
                looked_up[key] = (value >= 0, source[value.clamp(min=0)])
            found, rows = looked_up[key]
            value = torch.where(found, rows[..., o.source_column], -1)
        value = grid(value)
        values[o.name] = value.permute(0, 3, 1, 2).contiguous() if o.grid == CHANNELS else value
    known = {o.name for o in OUTPUTS}
    return result_type(tuple(o for o in outputs() if o.name not in known))(**values)
