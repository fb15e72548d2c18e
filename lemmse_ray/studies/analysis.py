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
from typing import Any, Mapping

import numpy as np
import torch

from ..core.classes import ClassPlan
from ..core.metrics import mse, psnr
from ..core.statistics import STATISTICS
from ..core.validation import as_float64, as_int64, check_shape
from ..storage.results import EstimateArrays

QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}
#: The stored per-pixel measures of concentration (the table's), in its order.
CONCENTRATION_OUTPUTS = tuple(o.name for s in STATISTICS.values() if s.concentration for o in s.outputs)
#: The columns of :func:`concentration_row`: the stored measures, then the top-k mass and the ESS fraction.
CONCENTRATION_STATS = (*CONCENTRATION_OUTPUTS, "topk_mass", "ess_fraction")
FLOOR_SIGMAS = 3.0  # a network this many standard errors below the loss floor is flagged


def _outputs(outputs: Mapping[str, Any] | None, shape: tuple) -> dict[str, np.ndarray]:
    return {name: check_shape(as_float64(out, f"outputs[{name!r}]"), shape, f"outputs[{name!r}]")
            for name, out in (outputs or {}).items()}


# --- PSNR per image -----------------------------------------------------------------------------------------

def image_rows(est: EstimateArrays, outputs: Mapping[str, Any] | None = None) -> list[dict]:
    r"""One row per query image (× network when ``outputs`` = {network name: (B, C, H, W) output}).

    Columns: ``image``, ``network`` (None without networks), ``psnr_z_x``, ``psnr_lemmse_x``,
    ``mse_lemmse_x``, ``posterior_variance`` (mean of ``variance`` over channels and pixels, if stored) and,
    per network, ``psnr_net_lemmse``, ``psnr_net_x``, ``mse_net_lemmse``, ``mse_net_x``.
    """
    x, z, mean = (torch.from_numpy(a) for a in (est.x, est.z, est.mean))
    base = {"psnr_z_x": psnr(z, x), "psnr_lemmse_x": psnr(mean, x), "mse_lemmse_x": mse(mean, x)}
    if est.variance is not None:
        base["posterior_variance"] = torch.from_numpy(est.variance.reshape(len(x), -1).mean(axis=1))
    per_net = {}
    for name, out in _outputs(outputs, est.shape).items():
        out = torch.from_numpy(out)
        per_net[name] = {"psnr_net_lemmse": psnr(out, mean), "psnr_net_x": psnr(out, x),
                         "mse_net_lemmse": mse(out, mean), "mse_net_x": mse(out, x)}
    rows = []
    for b in range(len(x)):
        common = {"image": b, **{k: float(v[b]) for k, v in base.items()}}
        if not per_net:
            rows.append({**common, "network": None})
        for name, metrics in per_net.items():
            rows.append({**common, "network": name, **{k: float(v[b]) for k, v in metrics.items()}})
    return rows


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
    return {f"{name}_{label}": float(np.quantile(values, q)) for label, q in QUANTILES.items()}


def concentration_row(est: EstimateArrays, plan: ClassPlan | None = None) -> dict:
    r"""Concentration of the weights over all query pixels of a cell (quantiles over the B·H·W pixels).

    Columns: ``pixels``; ``{stat}_q25``, ``{stat}_median``, ``{stat}_q75`` for each stored ``stat`` of
    ``ess``, ``max_weight``, ``entropy``, ``topk_mass`` (needs ``topk_logits`` and ``max_weight``, or
    ``log_evidence`` and ``n_rows``; see :func:`topk_mass`) and ``ess_fraction`` = ESS / :func:`rows_met`
    (needs ``plan`` and ``n_rows``; 1 means uniform weights over every row the pixel meets, so it compares
    across classes of different sizes);
    ``frac_ess_lt2``, the fraction of pixels with ESS < 2 (essentially one training patch); ``topk``.
    Missing statistics give no columns.
    """
    row: dict[str, Any] = {"pixels": int(np.prod(est.shape)) // est.shape[1]}
    values = {name: getattr(est, name) for name in CONCENTRATION_OUTPUTS}
    if est.topk_logits is not None and (est.max_weight is not None or
                                        (est.log_evidence is not None and est.n_rows is not None)):
        values["topk_mass"] = topk_mass(est.topk_logits, est.max_weight, est.log_evidence, est.n_rows)
        row["topk"] = int(est.topk_logits.shape[-1])
    if plan is not None and est.ess is not None and est.n_rows is not None:
        values["ess_fraction"] = est.ess / rows_met(plan, n_bank_images(plan, est.n_rows), est.mask)
    for name in CONCENTRATION_STATS:
        if values.get(name) is not None:
            row.update(_quantiles(values[name], name))
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

def copied_own(top_image, top_position, query_image_ids) -> np.ndarray:
    r"""(B, H, W) bool: the top-1 row is the query's own training image at the same position,
    :math:`(i_{(1)}, j_{(1)}) = (\text{id}_b,\ r W + c)` at pixel :math:`(r, c)` of query :math:`b`.

    ``top_image``, ``top_position``: (B, H, W) (``topk_image[..., 0]``, ``topk_position[..., 0]``);
    ``query_image_ids``: (B,) index of each query image among the bank's training images (−1: not in it).
    Exact duplicates of the own patch have the same logit and are ordered by row id, so this can miss
    copies; :func:`copied_patch` counts them.
    """
    top_image, top_position = as_int64(top_image, "top_image"), as_int64(top_position, "top_position")
    if top_image.ndim != 3 or top_position.shape != top_image.shape:
        raise ValueError(f"top_image and top_position must be (B, H, W) arrays of one shape, "
                         f"got {top_image.shape} and {top_position.shape}")
    ids = check_shape(as_int64(query_image_ids, "query_image_ids"), top_image.shape[:1], "query_image_ids")
    batch, height, width = top_image.shape
    own = np.arange(height * width).reshape(height, width)
    in_bank = (ids >= 0)[:, None, None]  # −1: a query image outside the bank, and a missing row, never match
    return in_bank & (top_image == ids[:, None, None]) & (top_position == own[None])


def copied_patch(top_image, top_position, query_inputs, bank_inputs, plan: ClassPlan,
                 atol: float = 1e-6) -> np.ndarray:
    r"""(B, H, W) bool: the top-1 row is a copy of the query's own noiseless patch: a row of the query
    position's class whose noiseless patch :math:`\Pi_{j_{(1)}} BAx_{i_{(1)}}` equals
    :math:`\Pi_k BAx_b` (max abs difference ≤ ``atol``).

    Such a row has exactly the logit of the query's own row (train queries) and the same value, so it is
    the own patch up to the row-id tie-break; for test queries it means the query's clean patch occurs
    verbatim in the training set.  ``query_inputs`` (B, C, H, W) :math:`= BAx_b` and ``bank_inputs``
    (N, C, H, W) :math:`= BAx_i` are ``problem.noiseless_input`` of the query and training images (the clean
    images for random masks).
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
    check_shape(top_image, (batch, height, width), "top_image")
    check_shape(top_position, (batch, height, width), "top_position")
    if top_image.min() < 0 or top_image.max() >= len(bank):
        raise ValueError(f"top_image: row image ids must lie in [0, {len(bank)}) (bank_inputs has {len(bank)} images)")
    coords = geometry.coords  # (H·W, d), −1 = padded (exact 0)
    flat_q = np.concatenate([query.reshape(batch, -1), np.zeros((batch, 1))], axis=1)
    flat_b = np.concatenate([bank.reshape(len(bank), -1), np.zeros((len(bank), 1))], axis=1)
    pad = flat_q.shape[1] - 1
    own = np.where(coords >= 0, coords, pad)  # (H·W, d)
    own_patch = flat_q[:, own]  # (B, H·W, d)
    top_pos = top_position.reshape(batch, -1)
    top_patch = flat_b[top_image.reshape(batch, -1)[..., None], np.where(coords >= 0, coords, pad)[top_pos]]
    same_class = plan.position_class[top_pos] == plan.position_class[None, :]
    equal = np.abs(top_patch - own_patch).max(axis=-1) <= atol
    return (same_class & equal).reshape(batch, height, width)


def copying_row(est: EstimateArrays, query_image_ids=None, query_inputs=None, bank_inputs=None,
                plan: ClassPlan | None = None) -> dict:
    """Copying rates of a cell. Columns: ``copy_rate_own`` (fraction of pixels, :func:`copied_own`; needs
    ``query_image_ids``), ``copy_rate`` (:func:`copied_patch`; needs ``query_inputs``, ``bank_inputs`` and
    ``plan``); a rate that cannot be computed is NaN."""
    est.require("topk_image", "topk_position")
    top_image, top_position = est.topk_image[..., 0], est.topk_position[..., 0]
    row = {"copy_rate_own": math.nan, "copy_rate": math.nan}
    if query_image_ids is not None:
        row["copy_rate_own"] = float(copied_own(top_image, top_position, query_image_ids).mean())
    if query_inputs is not None and bank_inputs is not None and plan is not None:
        row["copy_rate"] = float(copied_patch(top_image, top_position, query_inputs, bank_inputs, plan).mean())
    return row


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

    estimated from the :math:`B` train queries with standard error :math:`\operatorname{sd}(v_b)/\sqrt B`
    (unbiased when the train queries are a random sample of the training images with fresh noise: the
    distribution the networks are trained on).
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
    sees the clean image), or a receptive field larger than :math:`P`.

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


# --- one cell -----------------------------------------------------------------------------------------------

def cell_metrics(est: EstimateArrays, plan: ClassPlan, outputs: Mapping[str, Any] | None = None,
                 query_image_ids=None, query_inputs=None, bank_inputs=None,
                 train_losses: Mapping[str, float] | None = None, n_bins: int = 10) -> dict[str, list[dict]]:
    """Every metric of one cell (one estimate output and the networks run on its inputs), as row lists:

    * ``"images"``: :func:`image_rows`;
    * ``"cell"``: one row, :func:`concentration_row` and :func:`copying_row` merged;
    * ``"floor"``: train queries only (``query_image_ids`` given): :func:`floor_check` for ``"LE-MMSE"``
      itself (its gap has expectation 0: a reference) and each network of ``outputs``, with its final training
      loss from ``train_losses`` ({network: loss}, e.g. :func:`final_train_loss`); empty otherwise or
      without ``variance``;
    * ``"density"``: :func:`density_rows` (empty without ``log_evidence``).

    ``query_image_ids`` (B,): each train query's index among the bank's training images (None for test
    queries); ``query_inputs`` (B, C, H, W) and ``bank_inputs`` (N, C, H, W): ``problem.noiseless_input`` of
    the query and bank images, for :func:`copied_patch` (None skips ``copy_rate``).
    """
    outputs = _outputs(outputs, est.shape)
    floor = []
    if query_image_ids is not None and est.variance is not None:
        floor.append(floor_check(est.variance, est.mean, est.x, network="LE-MMSE"))
        floor += [floor_check(est.variance, out, est.x, (train_losses or {}).get(name), network=name)
                  for name, out in outputs.items()]
    copying = (copying_row(est, query_image_ids, query_inputs, bank_inputs, plan)
               if est.topk_image is not None else {})
    return {"images": image_rows(est, outputs), "cell": [{**concentration_row(est, plan), **copying}],
            "floor": floor, "density": density_rows(est, plan, outputs, n_bins) if est.log_evidence is not None else []}
