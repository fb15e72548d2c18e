r"""Per-cell metrics of a study, from the arrays of one estimate output (and optional network outputs).

One *cell* is one (training set, problem, input, :math:`P`, σ, split) with :math:`B` query images
:math:`x_b`, their estimator inputs :math:`z_b`, the LE-MMSE :math:`\hat x_b` (``mean``) and its per-pixel
statistics.  At a query pixel :math:`k` the weights over the bank rows :math:`r` met by the query are

.. math:: w_r = e^{s_r - \log Z}, \qquad \log Z = \log\textstyle\sum_r e^{s_r},

with :math:`s_r` the row's log-density (logit).  The stored statistics are ``ess`` :math:`=1/\sum_r w_r^2`,
``max_weight`` :math:`=\max_r w_r`, ``entropy`` :math:`=-\sum_r w_r\log w_r`, ``log_evidence``
:math:`=\log Z-\log N_\text{rows}` (the log-density of the query patch under the empirical patch
distribution, uniform over the :math:`N_\text{rows}` bank rows) and the top-k logits :math:`s_{(1)}\ge\dots\ge
s_{(k)}` with their rows' (training image, position).

Every function has a pure-array core (numpy or torch in, plain numbers out) so that tests can feed
synthetic data; :class:`~lemmse_ray.storage.results.EstimateArrays` gathers the arrays of a stored Zarr group
or of an in-memory :class:`~lemmse_ray.Result`.  Row-returning functions give lists of plain dicts (one Parquet
table each); the columns are listed in each docstring.  PSNR and MSE follow deepinv: per image, data
range 1, mean over channels and pixels.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..core.classes import ClassPlan
from ..core.metrics import mse, psnr_of_mse, psnr_summary
from ..core.statistics import STATISTICS
from ..core.validation import as_float64, as_int64, check_shape
from ..storage.results import EstimateArrays

QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}
#: The stored per-pixel measures of concentration (the table's), in its order.
CONCENTRATION_OUTPUTS = tuple(o.name for s in STATISTICS.values() if s.concentration for o in s.outputs)
#: The per-class measures of :func:`class_rows`: the stored ones, the top-k mass, the ESS fraction and the
#: distance to the class mean (the σ → ∞ limit).
CLASS_STATS = (*CONCENTRATION_OUTPUTS, "topk_mass", "ess_fraction", "class_mean_distance")
FLOOR_SIGMAS = 3.0  # a network this many standard errors below the loss floor is flagged


def _outputs(outputs: Mapping[str, Any] | None, shape: tuple) -> dict[str, np.ndarray]:
    return {name: check_shape(as_float64(out, f"outputs[{name!r}]"), shape, f"outputs[{name!r}]")
            for name, out in (outputs or {}).items()}


# --- PSNR per image, and pooled ------------------------------------------------------------------------------

#: the MSE column of each PSNR column of :func:`image_rows` (the pair that :func:`psnr_columns` pools)
PSNR_METRICS = {"psnr_z_x": "mse_z_x", "psnr_lemmse_x": "mse_lemmse_x", "psnr_net_lemmse": "mse_net_lemmse",
                "psnr_net_x": "mse_net_x"}


def image_rows(est: EstimateArrays, outputs: Mapping[str, Any] | None = None) -> list[dict]:
    r"""One row per query image (× network when ``outputs`` = {network name: (B, C, H, W) output}).

    Columns: ``image``, ``network`` (None without networks), ``psnr_z_x``, ``mse_z_x``, ``psnr_lemmse_x``,
    ``mse_lemmse_x``, ``posterior_variance`` (mean of ``variance`` over channels and pixels, if stored) and,
    per network, ``psnr_net_lemmse``, ``psnr_net_x``, ``mse_net_lemmse``, ``mse_net_x``.  Every PSNR is
    capped at :data:`lemmse_ray.core.metrics.PSNR_CAP` (never inf).
    """
    x, z, mean = (torch.from_numpy(a) for a in (est.x, est.z, est.mean))
    base = {"mse_z_x": mse(z, x), "mse_lemmse_x": mse(mean, x)}
    if est.variance is not None:
        base["posterior_variance"] = torch.from_numpy(est.variance.reshape(len(x), -1).mean(axis=1))
    per_net = {}
    for name, out in _outputs(outputs, est.shape).items():
        out = torch.from_numpy(out)
        per_net[name] = {"mse_net_lemmse": mse(out, mean), "mse_net_x": mse(out, x)}
    rows = []
    for b in range(len(x)):
        common = {"image": b, **{k: float(v[b]) for k, v in base.items()}}
        common.update({p: float(psnr_of_mse(common[m])) for p, m in PSNR_METRICS.items() if m in common})
        if not per_net:
            rows.append({**common, "network": None})
        for name, metrics in per_net.items():
            values = {k: float(v[b]) for k, v in metrics.items()}
            values.update({p: float(psnr_of_mse(values[m])) for p, m in PSNR_METRICS.items() if m in values})
            rows.append({**common, "network": name, **values})
    return rows


def psnr_columns(rows: list[Mapping], metric: str) -> dict[str, float]:
    r"""The PSNR columns of one metric (a key of :data:`PSNR_METRICS`) over ``rows`` (per-image rows holding
    its MSE column), by :func:`lemmse_ray.core.metrics.psnr_summary`:

    * ``<metric>`` -- PSNR of the pooled MSE :math:`10\log_{10}(1/\overline{\mathrm{MSE}})` (the headline);
    * ``<metric>_se`` -- its delta-method standard error; ``<metric>_lo``, ``<metric>_hi`` -- ± one s.e.;
    * ``<metric>_mean``, ``<metric>_median`` -- of the per-image PSNRs (capped);
    * ``<metric>_capped`` -- images whose PSNR is at the cap;

    and ``<mse column>`` -- the mean MSE.  No row with a value: no columns.
    """
    values = [float(r[PSNR_METRICS[metric]]) for r in rows if r.get(PSNR_METRICS[metric]) is not None]
    if not values:
        return {}
    summary = psnr_summary(values)
    out = {metric: summary["psnr"], f"{metric}_se": summary["se"], f"{metric}_lo": summary["psnr"] - summary["se"],
           f"{metric}_hi": summary["psnr"] + summary["se"], f"{metric}_mean": summary["mean"],
           f"{metric}_median": summary["median"], f"{metric}_capped": summary["capped"],
           PSNR_METRICS[metric]: float(np.mean(values))}
    return out


# --- concentration ------------------------------------------------------------------------------------------

def topk_mass(topk_logits, max_weight=None, log_evidence=None, n_rows: int | None = None):
    r"""Posterior mass of the :math:`k` most-weighted rows, per query pixel:

    .. math:: \sum_{i=1}^{k} w_{(i)} = \sum_{i=1}^k e^{s_{(i)} - \log Z}
              = w_{(1)} \sum_{i=1}^k e^{s_{(i)} - s_{(1)}}, \qquad
              \log Z = \texttt{log\_evidence} + \log N_\text{rows}

    (:func:`lemmse_ray.core.statistics.finalize` stores ``max_weight`` :math:`= w_{(1)}` and ``log_evidence``
    :math:`=\log Z-\log N_\text{rows}`).  The ``max_weight`` form is used when given: it only needs logit
    *differences*, while :math:`s - \log Z` from stored float32 values loses ~1e-7 of
    :math:`|\log Z|` (at small σ, :math:`|\log Z|` reaches 1e5 nats).  Otherwise ``log_evidence`` and
    ``n_rows`` are required.  Entries of ``topk_logits`` at −inf (fewer than k rows met) add nothing.
    Shapes (..., k) and (...) → (...).
    """
    logits = as_float64(topk_logits, "topk_logits")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"topk_logits must have a last axis of k ≥ 1 logits, got shape {logits.shape}")
    if max_weight is not None:
        top = check_shape(as_float64(max_weight, "max_weight"), logits.shape[:-1], "max_weight")
        return top * np.exp(logits - logits[..., :1]).sum(axis=-1)
    if log_evidence is None or n_rows is None:
        raise ValueError("max_weight, or log_evidence and n_rows, are required to normalise the top-k weights")
    evidence = check_shape(as_float64(log_evidence, "log_evidence"), logits.shape[:-1], "log_evidence")
    if int(n_rows) != n_rows or n_rows < 1:
        raise ValueError(f"n_rows must be a positive integer, got {n_rows!r}")
    log_z = evidence + math.log(n_rows)
    return np.exp(logits - log_z[..., None]).sum(axis=-1)


def rows_met(plan: ClassPlan, n_images: int, mask=None) -> np.ndarray:
    r"""Number of bank rows each query pixel meets: the support of its weights, the upper bound of its ESS.

    Whitened and mixture plans: :math:`\sum_c \texttt{meets}[c, j]\,R_c N` at position :math:`j` (``R_c``
    candidate positions of class :math:`c` per image, :math:`N` training images) → (H, W).  Random-mask aware
    inputs (``"masked"``): the classes whose padded pixels the query's mask hides entirely (a padded pixel is
    an exact 0 that an observed pixel contradicts) → (B, H, W), from ``mask`` (B, 1, H, W).
    """
    _, height, width = plan.geometry.shape
    rows = plan.rows_per_image() * int(n_images)
    if plan.kind != "masked":
        per_class = (plan.meets.astype(np.int64) * rows[:, None]).sum(axis=0)  # rows met by a query of class j
        return per_class[plan.position_class].reshape(height, width)
    if mask is None:
        raise ValueError("mask is required for random-mask aware inputs (the rows met depend on it)")
    kept = plan.geometry.extract_mask(torch.from_numpy(as_float64(mask, "mask"))).numpy()  # (B, H·W, P²)
    padded = np.stack([c.padded_pixels for c in plan.classes]).astype(np.float64)  # (n_classes, P²)
    compatible = (kept @ padded.T) == 0  # (B, H·W, n_classes)
    return (compatible * rows).sum(axis=-1).reshape(len(kept), height, width)


def _quantiles(values: np.ndarray, name: str) -> dict[str, float]:
    if values.size == 0:
        return {f"{name}_{label}": math.nan for label in QUANTILES}
    return {f"{name}_{label}": float(np.quantile(values, q)) for label, q in QUANTILES.items()}


def interior_class(plan: ClassPlan) -> int | None:
    """The headline class: among the classes whose patches have no padded pixel (every pixel inside the
    image, or circular padding), the one holding the most positions; None when every patch is padded
    (``P`` larger than the image).  Without masks it is the only such class."""
    counts = np.bincount(plan.position_class, minlength=plan.n_classes)
    inside = [c for c, cls in enumerate(plan.classes) if not cls.padded_pixels.any() and counts[c]]
    return max(inside, key=lambda c: counts[c]) if inside else None


def class_mean_values(plan: ClassPlan, train_images) -> np.ndarray:
    r"""(n_classes, C): the mean centre pixel of the rows a query of each class meets, the σ → ∞ limit of the
    LE-MMSE (uniform weights over those rows, ``docs/theory.md`` §6):

    .. math:: m_j = \frac{\sum_{c:\ \text{meets}[c, j]} \sum_i \sum_{k \in K_c} x_i[:, k]}
                         {\sum_{c:\ \text{meets}[c, j]} N\,|K_c|}

    (:math:`K_c` the candidate positions of class :math:`c`, ``train_images`` (N, C, H, W) the clean
    training images).  Whitened and mixture plans only (for aware random masks the limit weights each row by
    its mask prior): ValueError otherwise.
    """
    if plan.kind == "masked":
        raise ValueError("plan: the uniform-weight limit of aware random masks weights rows by their mask prior")
    images = as_float64(train_images, "train_images")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(plan.geometry.shape):
        raise ValueError(f"train_images must have shape (N, {', '.join(map(str, plan.geometry.shape))}), "
                         f"got {images.shape}")
    flat = images.reshape(len(images), images.shape[1], -1)
    sums = np.stack([flat[:, :, plan.positions(c)].sum(axis=(0, 2)) for c in range(plan.n_classes)])
    counts = plan.rows_per_image().astype(np.float64) * len(images)
    meets = plan.meets.astype(np.float64)  # [c, j]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (meets.T @ sums) / (meets.T @ counts)[:, None]


def _class_values(est: EstimateArrays, plan: ClassPlan, train_images=None) -> dict[str, np.ndarray]:
    """Per query pixel (B, H, W): every concentration measure available, and the distance to the class mean."""
    values = {name: getattr(est, name) for name in CONCENTRATION_OUTPUTS if getattr(est, name) is not None}
    if est.topk_logits is not None and (est.max_weight is not None or
                                        (est.log_evidence is not None and est.n_rows is not None)):
        values["topk_mass"] = topk_mass(est.topk_logits, est.max_weight, est.log_evidence, est.n_rows)
    if est.ess is not None and est.n_rows is not None:
        values["ess_fraction"] = est.ess / rows_met(plan, n_bank_images(plan, est.n_rows), est.mask)
    if train_images is not None and plan.kind != "masked":
        limit = class_mean_values(plan, train_images)[plan.position_class]  # (H·W, C)
        batch, channels, height, width = est.shape
        gap = est.mean.reshape(batch, channels, -1) - limit.T[None]
        values["class_mean_distance"] = np.sqrt((gap ** 2).mean(axis=1)).reshape(batch, height, width)
    return values


def class_rows(est: EstimateArrays, plan: ClassPlan, train_images=None) -> list[dict]:
    r"""One row per class holding query pixels: the concentration of the weights *within* that class, where
    ESS, max weight, entropy and top-k mass are comparable (``docs/theory.md`` §4).

    Columns: ``class``, ``padded_pixels`` (padded pixels of its patches, 0 for an interior class),
    ``interior`` (:func:`interior_class`), ``positions`` (per image), ``pixels`` (query pixels),
    ``rows_met_median``; quantiles ``{stat}_q25``, ``{stat}_median``, ``{stat}_q75`` of each available
    ``stat`` of ``ess``, ``max_weight``, ``entropy``, ``topk_mass`` (:func:`topk_mass`), ``ess_fraction``
    (ESS / :func:`rows_met`: 1 for uniform weights over every row met) and ``class_mean_distance``
    (:math:`\sqrt{\frac1C\sum_c(\hat x_c[k] - m_{j,c})^2}` with :math:`m_j` of :func:`class_mean_values`:
    → 0 as σ → ∞; needs ``train_images``); ``frac_ess_lt2``.
    """
    values = _class_values(est, plan, train_images)
    batch, _, height, width = est.shape
    where = np.broadcast_to(plan.position_class.reshape(1, height, width), (batch, height, width))
    inside = interior_class(plan)
    met = None
    if est.n_rows is not None:
        met = np.broadcast_to(rows_met(plan, n_bank_images(plan, est.n_rows), est.mask), (batch, height, width))
    rows = []
    for c in np.unique(plan.position_class):
        sel = where == c
        row: dict[str, Any] = {"class": int(c), "padded_pixels": int(plan.classes[c].padded_pixels.sum()),
                               "interior": bool(c == inside), "positions": int((plan.position_class == c).sum()),
                               "pixels": int(sel.sum()),
                               "rows_met_median": float(np.median(met[sel])) if met is not None else math.nan}
        for name in CLASS_STATS:
            if name in values:
                row.update(_quantiles(values[name][sel], name))
        if est.ess is not None:
            row["frac_ess_lt2"] = float(np.mean(est.ess[sel] < 2))
        rows.append(row)
    return rows


def concentration_row(est: EstimateArrays, plan: ClassPlan, train_images=None) -> dict:
    r"""The concentration columns of a cell: the interior class (:func:`interior_class`) as the headline,
    and the statistics that compare across classes over all pixels.

    Columns: ``pixels`` (all query pixels); ``interior_share`` (the fraction of them in the interior class);
    ``{stat}_interior_{q25,median,q75}`` for each ``stat`` of :func:`class_rows` over the interior class's
    pixels (NaN without one); ``ess_fraction_{q25,median,q75}`` over all pixels (ESS / rows met compares
    across classes); ``frac_ess_lt2`` over all pixels (ESS < 2: essentially one training patch, meaningful
    in any class); ``topk``.  Missing statistics give no columns.
    """
    values = _class_values(est, plan, train_images)
    batch, _, height, width = est.shape
    row: dict[str, Any] = {"pixels": batch * height * width}
    inside = interior_class(plan)
    sel = np.broadcast_to((plan.position_class == inside).reshape(1, height, width), (batch, height, width))
    row["interior_share"] = float(sel.mean())
    if est.topk_logits is not None and "topk_mass" in values:
        row["topk"] = int(est.topk_logits.shape[-1])
    for name in CLASS_STATS:
        if name in values:
            row.update(_quantiles(values[name][sel], f"{name}_interior"))
    if "ess_fraction" in values:
        row.update(_quantiles(values["ess_fraction"], "ess_fraction"))
    if est.ess is not None:
        row["frac_ess_lt2"] = float(np.mean(est.ess < 2))
    return row


def n_bank_images(plan: ClassPlan, n_rows: int) -> int:
    """Training images behind a bank of ``n_rows`` rows (every image adds ``plan.rows_per_image()``)."""
    per_image = int(plan.rows_per_image().sum())
    if n_rows % per_image:
        raise ValueError(f"n_rows: {n_rows} is not a multiple of the {per_image} rows per image of this plan")
    return n_rows // per_image


# --- copying ------------------------------------------------------------------------------------------------

def duplicates_own(top_image, top_position, query_inputs, bank_inputs, plan: ClassPlan,
                   atol: float = 1e-6) -> np.ndarray:
    r"""(B, H, W, k) bool: the row of each top-k entry is the query pixel's own noiseless patch or an exact
    duplicate of it: a row of the query position's class whose noiseless patch
    :math:`\Pi_{j} BAx_{i}` equals :math:`\Pi_k BAx_b` (max abs difference ≤ ``atol``).

    ``top_image``, ``top_position``: (B, H, W, k) (``topk_image``, ``topk_position``); ``query_inputs``
    (B, C, H, W) :math:`= BAx_b` and ``bank_inputs`` (N, C, H, W) :math:`= BAx_i` are
    ``problem.noiseless_input`` of the query and training images (the clean images for random masks).  A
    train query's own row is its own patch; a test query has one only where its clean patch occurs verbatim
    in the training set.
    """
    top_image, top_position = as_int64(top_image, "top_image"), as_int64(top_position, "top_position")
    query = as_float64(query_inputs, "query_inputs")
    bank = as_float64(bank_inputs, "bank_inputs")
    geometry = plan.geometry
    if query.ndim != 4 or tuple(query.shape[1:]) != tuple(geometry.shape):
        raise ValueError(f"query_inputs must have shape (B, {', '.join(map(str, geometry.shape))}), got {query.shape}")
    if bank.ndim != 4 or tuple(bank.shape[1:]) != tuple(geometry.shape):
        raise ValueError(f"bank_inputs must have shape (N, {', '.join(map(str, geometry.shape))}), got {bank.shape}")
    batch, _, height, width = query.shape
    if top_image.ndim != 4 or top_image.shape[:3] != (batch, height, width):
        raise ValueError(f"top_image must have shape {(batch, height, width)} + (k,), got {top_image.shape}")
    check_shape(top_position, top_image.shape, "top_position")
    if top_image.min() < 0 or top_image.max() >= len(bank):
        raise ValueError(f"top_image: row image ids must lie in [0, {len(bank)}) (bank_inputs has {len(bank)} images)")
    k = top_image.shape[-1]
    coords = geometry.coords  # (H·W, d), −1 = padded (exact 0)
    flat_q = np.concatenate([query.reshape(batch, -1), np.zeros((batch, 1))], axis=1)
    flat_b = np.concatenate([bank.reshape(len(bank), -1), np.zeros((len(bank), 1))], axis=1)
    pad = flat_q.shape[1] - 1
    index = np.where(coords >= 0, coords, pad)  # (H·W, d)
    own_patch = flat_q[:, index]  # (B, H·W, d)
    top_pos = top_position.reshape(batch, -1, k)
    top_patch = flat_b[top_image.reshape(batch, -1, k)[..., None], index[top_pos]]  # (B, H·W, k, d)
    same_class = plan.position_class[top_pos] == plan.position_class[None, :, None]
    equal = np.abs(top_patch - own_patch[:, :, None]).max(axis=-1) <= atol
    return (same_class & equal).reshape(batch, height, width, k)


def copied(top_image, top_position, top_logits, query_inputs, bank_inputs, plan: ClassPlan,
           atol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    r"""(copied, undecided), each (B, H, W) bool.

    A pixel is **copied** when the query's own noiseless patch, or an exact duplicate of it
    (:func:`duplicates_own`), is among the rows of the largest logit :math:`s_{(1)}`: the top-k entries
    whose logit equals :math:`s_{(1)}` exactly all count, so the order in which tied rows are listed
    (by row id) cannot decide it.  **Undecided**: no tied entry is such a row, but every one of the ``k``
    entries is tied (the tie may extend past the stored top-k); such pixels count as not copied, and their
    fraction is reported beside the rate.  ``top_logits`` (B, H, W, k) are the ``topk_logits``.
    """
    logits = as_float64(top_logits, "top_logits")
    own = duplicates_own(top_image, top_position, query_inputs, bank_inputs, plan, atol)
    check_shape(logits, own.shape, "top_logits")
    tied = logits == logits[..., :1]
    hit = (own & tied).any(axis=-1)
    return hit, ~hit & tied.all(axis=-1) & (logits.shape[-1] > 1)


def copying_row(est: EstimateArrays, query_inputs, bank_inputs, plan: ClassPlan) -> dict:
    """Columns: ``copy_rate`` (fraction of query pixels copied, :func:`copied`) and ``copy_undecided`` (the
    fraction whose tie reaches past the stored top-k, counted as not copied)."""
    est.require("topk_image", "topk_position", "topk_logits")
    hit, undecided = copied(est.topk_image, est.topk_position, est.topk_logits, query_inputs, bank_inputs, plan)
    return {"copy_rate": float(hit.mean()), "copy_undecided": float(undecided.mean())}


# --- loss floor ---------------------------------------------------------------------------------------------

def _mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for fewer than 2 values)."""
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), se


def loss_floor(variance) -> tuple[float, float, np.ndarray]:
    r"""Mean posterior variance of train queries: (floor, standard error, per-image values).

    For any function :math:`f` of the patch :math:`\Pi_k z` (any network of receptive field :math:`P` with
    the same boundary rule), :math:`\mathbb E[(f(\Pi_k z)-x[k])^2\mid \Pi_k z] = \operatorname{Var}(x[k]\mid
    \Pi_k z) + (f-\hat x[k])^2`, so under the training distribution its per-pixel MSE is at least

    .. math:: \bar v = \frac1B\sum_b v_b,\qquad v_b = \frac1{CHW}\sum_{c,k}\operatorname{Var}(x_c[k]\mid\Pi_k z_b),

    estimated from :math:`B` floor queries with standard error :math:`\operatorname{sd}(v_b)/\sqrt B`
    (unbiased when they are training images drawn i.i.d. with fresh noise, the distribution the networks are
    trained on: :func:`lemmse_ray.studies.engine.floor_queries`).
    """
    var = as_float64(variance, "variance")
    if var.ndim != 4 or len(var) == 0:
        raise ValueError(f"variance must have shape (B, C, H, W) with B ≥ 1, got {var.shape}")
    per_image = var.reshape(len(var), -1).mean(axis=1)
    floor, se = _mean_se(per_image)
    return floor, se, per_image


def floor_check(variance, output, x, train_loss: float | None = None, network: str | None = None) -> dict:
    r"""A network's train-query MSE and final training loss against the loss floor (:func:`loss_floor`).

    With :math:`e_b = \operatorname{MSE}(f(z_b), x_b)` on the same train queries, the paired gap
    :math:`\bar g = \frac1B\sum_b (e_b - v_b)` has expectation ≥ 0; the network is flagged
    (``below_floor_mse``) when :math:`\bar g < -3\,\operatorname{se}(\bar g)`.  The final training loss
    (a mean over fresh draws) is flagged (``below_floor_train_loss``) when it is below
    :math:`\bar v - 3\operatorname{se}(\bar v)`.  Either flag means a bug or a leak (e.g. a network that
    sees the clean image), or a receptive field larger than :math:`P` -- for a network of the LE-MMSE's class;
    one whose class is larger (the U-Net, ``docs/theory.md`` §7) may legitimately lie below.

    Columns: ``network``, ``loss_floor``, ``loss_floor_se``, ``mse_net_x``, ``mse_gap``, ``mse_gap_se``,
    ``train_loss`` (NaN if not given), ``below_floor_mse``, ``below_floor_train_loss``, ``below_floor``.
    """
    floor, floor_se, per_image = loss_floor(variance)
    shape = (len(per_image), *as_float64(variance, "variance").shape[1:])
    errors = mse(torch.from_numpy(check_shape(as_float64(output, "output"), shape, "output")),
                 torch.from_numpy(check_shape(as_float64(x, "x"), shape, "x"))).numpy()
    gap, gap_se = _mean_se(errors - per_image)
    below_mse = bool(gap < -FLOOR_SIGMAS * gap_se) if len(errors) > 1 else False
    loss = math.nan if train_loss is None else float(train_loss)
    below_train = bool(loss < floor - FLOOR_SIGMAS * floor_se) if train_loss is not None and len(errors) > 1 else False
    return {"network": network, "loss_floor": floor, "loss_floor_se": floor_se, "mse_net_x": float(errors.mean()),
            "mse_gap": gap, "mse_gap_se": gap_se, "train_loss": loss, "below_floor_mse": below_mse,
            "below_floor_train_loss": below_train, "below_floor": below_mse or below_train}


def final_train_loss(checkpoint: Mapping) -> float:
    """``train_loss`` of the last epoch recorded in a training checkpoint (:mod:`lemmse_ray.runs.training`)."""
    metrics = checkpoint.get("metrics") or []
    if not metrics:
        raise ValueError("checkpoint: no epoch metrics recorded")
    return float(metrics[-1]["train_loss"])


# --- density: evidence compared within a class --------------------------------------------------------------

def class_keys(plan: ClassPlan, batch: int, mask=None) -> np.ndarray:
    r"""(B, H, W) int64 key of the set of pixels whose log-evidence values are comparable.

    ``log_evidence`` is a log-density on the support of the query's class, and :math:`\log N` carries
    :math:`-\tfrac r2\log(2\pi\sigma^2)-\tfrac12\log\operatorname{pdet}S` for a support of dimension
    :math:`r`, over the subset of bank rows the class meets: values of different classes differ by these
    constants, not by how typical the patch is.

    * Whitened plans (denoising, deblurring, fixed masks): the key is the position class
      ``plan.position_class`` (deterministic pattern and noise covariance), which fixes :math:`r`,
      :math:`S` and the rows met.
    * Random-mask aware inputs (``"masked"``): the density is over the *kept* coordinates, dimension
      :math:`C\,n_\text{kept}` with :math:`n_\text{kept}` the kept non-padded pixels of the patch (each adds
      :math:`-\tfrac C2\log 2\pi\sigma^2 + \log q`), so the key is (position class, :math:`n_\text{kept}`),
      encoded ``class·(P²+1) + n_kept``, from ``mask`` (B, 1, H, W).  Pixels of one key can still have
      different kept pixels (same dimension, other coordinates); the full mask pattern would split the
      queries into groups too small to rank.
    * Random-mask agnostic inputs (``"mixture"``): the mixture density is over all non-padded coordinates
      whatever the mask, so the key is the position class.
    """
    _, height, width = plan.geometry.shape
    position = np.broadcast_to(plan.position_class.reshape(1, height, width), (batch, height, width))
    if plan.kind != "masked":
        return position.astype(np.int64).copy()
    if mask is None:
        raise ValueError("mask is required for random-mask aware inputs (the class key counts kept pixels)")
    mask = check_shape(as_float64(mask, "mask"), (batch, 1, height, width), "mask")
    kept = plan.geometry.extract_mask(torch.from_numpy(mask)).numpy().sum(axis=-1).round().astype(np.int64)
    return position * (plan.geometry.patch_size ** 2 + 1) + kept.reshape(batch, height, width)


def _check_keys(values, keys) -> tuple[np.ndarray, np.ndarray]:
    values = as_float64(values, "values")
    keys = check_shape(as_int64(keys, "keys"), values.shape, "keys")
    return values.ravel(), keys.ravel()


def within_class_percentile(values, keys) -> np.ndarray:
    r"""Percentile of each value among the values of its key: :math:`(\operatorname{rank} - \tfrac12)/n`
    in (0, 1), with :math:`n` the number of values of the key and ties given their average rank
    (1-based).  Same shape as ``values``."""
    shape = np.shape(values)
    flat, key = _check_keys(values, keys)
    out = np.empty_like(flat)
    for k in np.unique(key):
        where = np.flatnonzero(key == k)
        _, inverse, counts = np.unique(flat[where], return_inverse=True, return_counts=True)
        average_rank = np.cumsum(counts) - (counts - 1) / 2.0
        out[where] = (average_rank[inverse] - 0.5) / len(where)
    return out.reshape(shape)


def within_class_centred(values, keys) -> np.ndarray:
    """Each value minus the mean of the values of its key. Same shape as ``values``."""
    shape = np.shape(values)
    flat, key = _check_keys(values, keys)
    _, inverse = np.unique(key, return_inverse=True)
    means = np.bincount(inverse, weights=flat) / np.bincount(inverse)
    return (flat - means[inverse]).reshape(shape)


def binned_rows(percentile, error, n_bins: int = 10, extra: Mapping[str, Any] | None = None) -> list[dict]:
    r"""Mean of ``error`` in ``n_bins`` equal-width bins of ``percentile`` ∈ [0, 1] (bin
    :math:`\lfloor p\cdot n\rfloor`, the last bin closed).

    Columns: ``bin``, ``lo``, ``hi``, ``pixels``, ``mean``, ``se`` (standard error of the mean; NaN below
    2 pixels), ``median``, ``mean_extra_<name>`` for each array of ``extra`` (same shape, averaged in the
    bin); an empty bin has NaN statistics.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    pct = as_float64(percentile, "percentile").ravel()
    err = check_shape(as_float64(error, "error"), np.shape(percentile), "error").ravel()
    if pct.size and (pct.min() < 0 or pct.max() > 1):
        raise ValueError("percentile values must lie in [0, 1]")
    others = {name: check_shape(as_float64(v, f"extra[{name!r}]"), np.shape(percentile), f"extra[{name!r}]").ravel()
              for name, v in (extra or {}).items()}
    which = np.minimum((pct * n_bins).astype(np.int64), n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        values = err[sel]
        row = {"bin": b, "lo": b / n_bins, "hi": (b + 1) / n_bins, "pixels": n,
               "mean": float(values.mean()) if n else math.nan,
               "se": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
               "median": float(np.median(values)) if n else math.nan}
        row.update({f"mean_extra_{name}": float(v[sel].mean()) if n else math.nan for name, v in others.items()})
        rows.append(row)
    return rows


def pixel_error(a, b) -> np.ndarray:
    r"""(B, H, W) squared error per pixel, mean over channels: :math:`\frac1C\sum_c (a_c[k]-b_c[k])^2`."""
    a, b = as_float64(a, "a"), as_float64(b, "b")
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"a and b must be (B, C, H, W) arrays of one shape, got {a.shape} and {b.shape}")
    return ((a - b) ** 2).mean(axis=1)


def density_rows(est: EstimateArrays, plan: ClassPlan, outputs: Mapping[str, Any] | None = None,
                 n_bins: int = 10) -> list[dict]:
    r"""Errors against the within-class evidence percentile (:func:`class_keys`,
    :func:`within_class_percentile` of ``log_evidence`` over all query pixels of the cell).

    Rows of :func:`binned_rows` for ``metric`` = ``"mse_lemmse_x"`` (:math:`\lvert\hat x-x\rvert^2`,
    ``network`` None) and, per network of ``outputs``, ``"mse_net_lemmse"`` (:math:`\lvert f(z)-\hat x\rvert^2`);
    ``mean_extra_evidence_centred`` is the mean log-evidence minus its class mean in the bin (nats).
    """
    est.require("log_evidence")
    keys = class_keys(plan, est.shape[0], est.mask)
    pct = within_class_percentile(est.log_evidence, keys)
    extra = {"evidence_centred": within_class_centred(est.log_evidence, keys)}
    rows = [{"metric": "mse_lemmse_x", "network": None, **r}
            for r in binned_rows(pct, pixel_error(est.mean, est.x), n_bins, extra)]
    for name, out in _outputs(outputs, est.shape).items():
        rows += [{"metric": "mse_net_lemmse", "network": name, **r}
                 for r in binned_rows(pct, pixel_error(out, est.mean), n_bins, extra)]
    return rows


# --- the paper's other estimators: memorisation references ---------------------------------------------------

def _gaussian_inputs(train_images, z, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    train = torch.from_numpy(as_float64(train_images, "train_images"))
    queries = torch.from_numpy(as_float64(z, "z"))
    if train.ndim != 4 or queries.ndim != 4 or train.shape[1:] != queries.shape[1:] or len(train) == 0:
        raise ValueError(f"train_images (N, C, H, W) and z (B, C, H, W) must share C, H, W, got "
                         f"{tuple(train.shape)} and {tuple(queries.shape)}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return train, queries


def global_mmse(train_images, z, sigma: float) -> np.ndarray:
    r"""The global empirical MMSE of denoising (``z = x + σe``, the prior uniform over the :math:`N` training
    images), in float64:

    .. math:: \hat x(z) = \sum_i w_i\,x_i, \qquad w_i = \operatorname{softmax}_i\Big(-\frac{\lVert z -
              x_i\rVert^2}{2\sigma^2}\Big).

    It is the LE-MMSE with a patch covering the whole image from every pixel (``P = 2H − 1``, zero padding:
    each position is its own class and meets the same pixel of every training image), which reproduces the
    training set as σ → 0.  ``train_images`` (N, C, H, W), ``z`` (B, C, H, W) → (B, C, H, W).
    """
    train, queries = _gaussian_inputs(train_images, z, sigma)
    keys = train.flatten(1)
    out = torch.empty_like(queries)
    for b in range(len(queries)):
        distance = ((queries[b].flatten() - keys) ** 2).sum(dim=1)  # (N,), formed from differences
        weights = torch.softmax(-distance / (2 * sigma ** 2), dim=0)
        out[b] = (weights @ keys).reshape(queries.shape[1:])
    return out.numpy()


def translation_equivariant_mmse(train_images, z, sigma: float) -> np.ndarray:
    r"""The translation-equivariant empirical MMSE of denoising, in float64: the global MMSE
    (:func:`global_mmse`) whose prior is uniform over every circular shift :math:`T_s x_i` of every training
    image (:math:`(T_s x)[k] = x[k - s]`, indices mod :math:`(H, W)`),

    .. math:: \hat x(z)[k] = \sum_{i, s} w_{is}\,x_i[k - s], \qquad
              w_{is} = \operatorname{softmax}_{i,s}\Big(-\frac{\lVert z - T_s x_i\rVert^2}{2\sigma^2}\Big).

    For odd square images it is the LE-MMSE with ``P = H`` and circular padding (the patch at :math:`k`
    is :math:`T_{-k}z` and the row :math:`(i, j)` is :math:`T_{-j}x_i`, so row :math:`(i, j)` is the shift
    :math:`s = k - j`; ``tests/studies/test_analysis.py`` checks both forms against explicit loops).  Here
    :math:`\lVert z - T_s x_i\rVert^2 = \lVert z\rVert^2 + \lVert x_i\rVert^2 - 2\,(z \star x_i)[s]` and
    the estimate :math:`\sum_i (w_{i\cdot} \circledast x_i)[k]` are circular correlations and
    convolutions, evaluated by FFT: :math:`O(N\,HW\log HW)` per query instead of :math:`O(N\,(HW)^2)`.
    ``train_images`` (N, C, H, W), ``z`` (B, C, H, W) → (B, C, H, W).
    """
    train, queries = _gaussian_inputs(train_images, z, sigma)
    height, width = train.shape[2:]
    spectrum = torch.fft.rfft2(train)  # (N, C, H, W//2+1)
    energy = (train ** 2).sum(dim=(1, 2, 3))  # (N,)
    out = torch.empty_like(queries)
    for b in range(len(queries)):
        query = queries[b]
        correlation = torch.fft.irfft2(torch.fft.rfft2(query)[None] * spectrum.conj(), s=(height, width)).sum(dim=1)
        distance = (query ** 2).sum() + energy[:, None, None] - 2 * correlation  # (N, H, W): ‖z − T_s x_i‖²
        weights = torch.softmax((-distance / (2 * sigma ** 2)).flatten(), dim=0).reshape(distance.shape)
        mixed = (torch.fft.rfft2(weights)[:, None] * spectrum).sum(dim=0)  # Σ_i FFT(w_i) FFT(x_i)
        out[b] = torch.fft.irfft2(mixed, s=(height, width))
    return out.numpy()


# --- one cell -----------------------------------------------------------------------------------------------

def cell_metrics(est: EstimateArrays, plan: ClassPlan, outputs: Mapping[str, Any] | None = None,
                 query_inputs=None, bank_inputs=None, train_images=None, n_bins: int = 10) -> dict[str, list[dict]]:
    """Every metric of one cell (one estimate output and the networks run on its inputs), as row lists:

    * ``"images"``: :func:`image_rows`;
    * ``"cell"``: one row, :func:`concentration_row` and, with ``topk`` stored and ``query_inputs`` and
      ``bank_inputs`` given, :func:`copying_row`;
    * ``"classes"``: :func:`class_rows`;
    * ``"density"``: :func:`density_rows` (empty without ``log_evidence``).

    ``query_inputs`` (B, C, H, W) and ``bank_inputs`` (N, C, H, W): ``problem.noiseless_input`` of the query
    and bank images; ``train_images`` (N, C, H, W): the clean training images (the class means).  The loss
    floor is not a metric of the query set: :func:`floor_rows` computes it on its own training queries.
    """
    outputs = _outputs(outputs, est.shape)
    copying = (copying_row(est, query_inputs, bank_inputs, plan)
               if est.topk_image is not None and query_inputs is not None and bank_inputs is not None else {})
    return {"images": image_rows(est, outputs), "cell": [{**concentration_row(est, plan, train_images), **copying}],
            "classes": class_rows(est, plan, train_images),
            "density": density_rows(est, plan, outputs, n_bins) if est.log_evidence is not None else []}


def floor_rows(est: EstimateArrays, outputs: Mapping[str, Any] | None = None,
               train_losses: Mapping[str, float] | None = None) -> list[dict]:
    """:func:`floor_check` on the floor queries ``est`` (training images drawn at random, fresh noise, with
    ``variance``) for ``"LE-MMSE"`` itself (its gap has expectation 0: a reference) and each network of
    ``outputs`` (its output on the same inputs), with its final training loss from ``train_losses``."""
    est.require("variance")
    outputs = _outputs(outputs, est.shape)
    rows = [floor_check(est.variance, est.mean, est.x, network="LE-MMSE")]
    return rows + [floor_check(est.variance, out, est.x, (train_losses or {}).get(name), network=name)
                   for name, out in outputs.items()]
