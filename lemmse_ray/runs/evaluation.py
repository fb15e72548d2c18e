r"""Evaluating trained networks against the LE-MMSE estimates, on the same inputs.

For each split ("train", "test") and noise level σ the estimation job stored, in the Zarr group at
``estimate_url(cfg, split, σ)``, one fixed seeded draw of the estimator inputs ``z`` (and masks), the clean
images ``x`` and the LE-MMSE estimate ``mean``.  Every network trained at that σ is run on that very ``z``
(with the mask as extra channel when it was trained so, see :func:`lemmse_ray.runs.training.network_input`), in
eval mode without gradients, so that the comparison isolates the estimator: with ``PSNR(a, b) =
10 log10(1 / mean((a − b)²))`` per image (data range 1),

* ``psnr_net_lemmse`` -- how close the network is to the best local-equivariant estimator,
* ``psnr_net_x``, ``psnr_lemmse_x`` -- both against the ground truth (the gap is what training misses),

and the matching ``mse_*``.  Outputs (local ``out`` or fsspec URL): ``evaluation.parquet`` (one row per
split × σ × network × image), ``summary.parquet`` (means per split × σ × network) and, per (split, σ),
``figures/networks_<split>_sigma<σ>.png`` (labelled rows: input z, LE-MMSE, each network with its receptive
field, ground truth; the PSNR against the ground truth under each tile).
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.metrics import mse, psnr
from ..data.loaders import SPLITS
from ..storage.bank_store import open_group
from ..storage.files import save_parquet, write_bytes
from ..storage.results import EstimateArrays
from .config import Config, join
from .pipeline import estimate_url
from .report import draw_image_grid, group_means, png_bytes
from .training import load_network

COLUMNS = ("psnr_net_lemmse", "psnr_net_x", "psnr_lemmse_x")
BATCH = 256  # images per forward pass


def run_network(net: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``net(inputs)`` in batches, eval mode, no gradients."""
    net.eval()
    with torch.no_grad():
        return torch.cat([net(inputs[i: i + BATCH]) for i in range(0, len(inputs), BATCH)])


def evaluate_all(cfg: Config, networks: dict[tuple[str, float], str], n_show: int = 8) -> list[dict]:
    """Evaluate every network of ``networks`` ({(name, σ): checkpoint}) on the stored estimates of both
    splits at its σ; writes the Parquet tables and figures under ``cfg.out`` and returns the per-image rows.

    Raises ValueError when a network was trained for another problem than the estimates', or needs masks
    that the estimates lack.
    """
    loaded = {key: load_network(path, cfg.storage_options) for key, path in networks.items()}
    rows = []
    for split in SPLITS:
        for sigma in sorted({sigma for _, sigma in loaded}):
            url = estimate_url(cfg, split, sigma)
            group = open_group(url, "r", cfg.storage_options)
            est = EstimateArrays.from_group(group, stats=())
            z, x, mean = (torch.from_numpy(a.astype(np.float32)) for a in (est.z, est.x, est.mean))
            mask = None if est.mask is None else torch.from_numpy(est.mask.astype(np.float32))
            problem = group.attrs["config"]["problem"]
            figure = {"input z": z, "LE-MMSE": mean}
            for (name, net_sigma), (net, checkpoint) in loaded.items():
                if net_sigma != sigma:
                    continue
                if checkpoint["problem"] != problem:
                    raise ValueError(f"networks: {networks[(name, net_sigma)]} was trained for problem "
                                     f"{checkpoint['problem']}, but {url} holds estimates for {problem}")
                if checkpoint["mask_channel"] and mask is None:
                    raise ValueError(f"networks: {name} takes the mask as input, but {url} holds no masks")
                inputs = torch.cat([z, mask], dim=1) if checkpoint["mask_channel"] else z
                output = run_network(net, inputs)
                figure[f"{name} (RF {net.receptive_field})"] = output
                metrics = {"psnr_net_lemmse": psnr(output, mean), "psnr_net_x": psnr(output, x),
                           "psnr_lemmse_x": psnr(mean, x), "mse_net_lemmse": mse(output, mean),
                           "mse_net_x": mse(output, x), "mse_lemmse_x": mse(mean, x)}
                for i in range(len(x)):
                    rows.append({"split": split, "image": i, "network": name, "problem": problem["problem"],
                                 "input": problem["input"], "sigma": sigma, "patch_size": cfg.patch_size,
                                 "receptive_field": net.receptive_field, "epochs": checkpoint["epoch"],
                                 **{key: float(value[i]) for key, value in metrics.items()}})
            title = (f"{split} queries: {problem['problem']} ({problem['input']}), σ = {sigma:g}, "
                     f"P = {cfg.patch_size}, {cfg.dataset}")
            write_bytes(join(cfg.out, "figures", f"networks_{split}_sigma{sigma:g}.png"),
                        png_bytes(draw_image_grid(figure, x, title, n_show)), cfg.storage_options)
    save_parquet(rows, join(cfg.out, "evaluation.parquet"), cfg.storage_options)
    save_parquet(summary_rows(rows), join(cfg.out, "summary.parquet"), cfg.storage_options)
    return rows


def summary_rows(rows: list[dict]) -> list[dict]:
    """Mean of each PSNR column per (split, σ, network), in that order."""
    return group_means(rows, ("split", "sigma", "network"), COLUMNS)


def summary_table(rows: list[dict]) -> str:
    """A plain-text table of the mean PSNRs (dB) per split, σ and network."""
    header = f"{'split':<6} {'sigma':>6} {'network':<10} {'PSNR(net, LE-MMSE)':>19} {'PSNR(net, x)':>13} " \
             f"{'PSNR(LE-MMSE, x)':>17}"
    lines = [header] + [f"{r['split']:<6} {r['sigma']:>6g} {r['network']:<10} {r['psnr_net_lemmse']:>19.2f} "
                        f"{r['psnr_net_x']:>13.2f} {r['psnr_lemmse_x']:>17.2f}" for r in summary_rows(rows)]
    return "\n".join(lines)
