r"""Training the baseline networks on Ray Train (data-parallel), with resumable per-epoch checkpoints.

A network :math:`f_\theta` is trained on the risk that the LE-MMSE estimator minimises exactly
(``docs/theory.md``), by stochastic gradient descent on

.. math:: L(\theta) = \mathbb E_{i,\,e\,(,\,m)}\ \tfrac{1}{CHW}\,\lVert f_\theta(z) - x_i\rVert^2,
          \qquad z = B\big(A_m x_i + \sigma e\big),

with :math:`i` uniform over the training images (drawn with replacement) and **fresh** noise :math:`e` (and
masks :math:`m`) at every step, simulated by ``problem.measure``: the network sees exactly the input the
problem gives (physics-aware or agnostic).  With random-mask inpainting and an aware input the estimator
knows the mask, so the network gets it too, as an extra input channel (``in_channels = C + 1``, the mask
last, see :func:`network_input`); in every other case ``in_channels = C``.

One network per (name, σ), trained by ``ray.train.torch.TorchTrainer``: ``n_workers`` data-parallel
workers (DDP), each drawing ``batch_size / n_workers`` images per step; Adam, learning rate ``lr`` on a
cosine schedule to 0 over ``epochs × steps_per_epoch`` steps.  The random draws of step ``s`` on worker
``r`` come from a generator seeded by ``(seed, r, s)`` (:func:`step_generator`), and the initial weights
from ``torch.manual_seed(seed)``: a resumed run repeats exactly what an uninterrupted one would have done.

Outputs, in ``<out>/networks/<name>_sigma<σ>/`` (a local folder or an fsspec URL, e.g. ``s3://…``):

* ``checkpoint.pt`` -- rewritten at the end of every epoch by worker 0 (atomically for local folders):
  a dict of plain types and tensors, loadable with ``torch.load(path, weights_only=True)``: ``model``,
  ``optimizer``, ``scheduler`` (state dicts), ``network`` (``network_config``), ``problem``
  (``problem.spec()``), ``sigma``, ``mask_channel``, ``epoch``, ``step``, ``config`` (what defines the run
  besides network, problem and σ: training fingerprint and hyper-parameters) and ``metrics`` (one dict per
  epoch so far).
* ``metrics.parquet`` -- the per-epoch rows: epoch, step, train_loss (mean over the epoch's steps of the
  batch MSE), lr (of the epoch's last step), seconds, network, sigma.
* ``epochs/epoch<e>.pt`` -- with ``snapshots`` (studies: a network's agreement with the LE-MMSE as training
  proceeds), the weights after each epoch ``e``: ``{"model", "epoch", "step"}``, loaded by
  :func:`load_snapshot`.

Re-running resumes an unfinished checkpoint of the same run, skips a finished one, and refuses one of
another run; ``overwrite`` starts afresh in both of the last cases.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.problems import Problem
from ..core.validation import check_choice, check_sigma
from ..models.networks import NETWORKS, build_network, network_config
from ..storage.bank_store import fingerprint
from ..storage.files import read_bytes, save_parquet, write_bytes
from ..storage.redact import public
from .config import Config, join

log = logging.getLogger("lemmse_ray")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.parquet"
SNAPSHOTS = "epochs"
_IDENTITY = ("network", "problem", "sigma", "config")  # checkpoint keys that must match to resume


# --- checkpoints -------------------------------------------------------------------------------------------

def read_checkpoint(path: str, storage_options: dict | None = None) -> dict | None:
    """The checkpoint dict at ``path`` (loaded with ``weights_only=True``, on CPU), or None if absent."""
    data = read_bytes(path, storage_options)
    return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# --- the pieces of a training step ------------------------------------------------------------------------

def network_dir(cfg: Config, name: str, sigma: float) -> str:
    """``<out>/networks/<name>_sigma<σ>``: checkpoint and metrics of one network (a local ``out`` is made
    absolute: Ray Train workers run in a directory of their own)."""
    out = cfg.out if "://" in cfg.out else str(Path(cfg.out).resolve())
    return join(out, "networks", f"{name}_sigma{sigma:g}")


def mask_channel(problem: Problem) -> bool:
    """True when the network gets the mask as an extra input channel (random masks, aware input)."""
    return problem.random_mask and problem.aware


def network_input(problem: Problem, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The float32 network input: ``z`` (B, C, H, W), plus the (B, 1, H, W) mask as last channel when
    :func:`mask_channel` holds."""
    if mask_channel(problem):
        if mask is None:
            raise ValueError("mask: random-mask inpainting with an aware input needs the per-image masks")
        z = torch.cat([z, mask.to(z.dtype)], dim=1)
    return z.to(torch.float32)


def make_network(cfg: Config, name: str, channels: int, problem: Problem) -> nn.Module:
    """The network ``name`` for images with ``channels`` channels, with receptive field ``patch_size`` (the
    LE-MMSE's) and boundary rule ``padding``: PatchMLP (``hidden``), ResNet or U-Net (``width``)."""
    kwargs = {"hidden": cfg.hidden} if name == "patchmlp" else {"width": cfg.width}
    return build_network(name, in_channels=channels + mask_channel(problem), out_channels=channels,
                         patch_size=cfg.patch_size, padding=cfg.padding, **kwargs)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of worker ``rank`` at optimizer step ``step``: independent streams for every
    (seed, rank, step), so the draws of a step do not depend on what ran before it."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def training_batch(images: torch.Tensor, problem: Problem, sigma: float, n: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(network input, clean images)`` of ``n`` training images drawn with replacement, with fresh noise
    (and masks) from ``generator``; both float32."""
    x = images[torch.randint(len(images), (n,), generator=generator)].to(torch.float64)
    _, z, mask = problem.measure(x, sigma, generator)
    return network_input(problem, z, mask), x.to(torch.float32)


def check_training(cfg: Config, names: list[str]) -> None:
    """Raise ValueError naming the first invalid training parameter (``cfg`` is validated again, in case it
    was changed after it was built)."""
    dataclasses.replace(cfg)
    for name in names:
        check_choice(name, NETWORKS, "networks")


# --- the training loop, shared by the Ray Train workers and the plain-task path ---------------------------

def _fit(config: dict[str, Any], rank: int, world: int, device: torch.device,
         wrap: Any = None, report: Any = None) -> None:
    """The training loop of one worker ``rank`` of ``world``: ``wrap(net)`` prepares the model (DDP under
    Ray Train; identity otherwise), ``report(row)`` is called once per epoch on every worker (a barrier
    under Ray Train)."""
    import ray  # Ray only where networks train; checkpoints load without it

    identity, images, problem = config["identity"], ray.get(config["images"]), config["problem"]
    sigma, run = identity["sigma"], identity["config"]
    steps, total_steps = run["steps_per_epoch"], run["epochs"] * run["steps_per_epoch"]
    folder, options, progress = config["folder"], config["storage_options"], config["progress"]
    every = max(1, steps // 20)  # progress messages per epoch: about 20

    torch.manual_seed(run["seed"])
    net = build_network(**identity["network"])
    checkpoint = read_checkpoint(join(folder, CHECKPOINT), options) if config["resume"] else None
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
    model = wrap(net) if wrap is not None else net.to(device)  # net stays the module
    optimizer = torch.optim.Adam(net.parameters(), lr=run["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.0)
    first_epoch, history = 1, []
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        first_epoch, history = checkpoint["epoch"] + 1, checkpoint["metrics"]

    model.train()
    for epoch in range(first_epoch, run["epochs"] + 1):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for step in range((epoch - 1) * steps, epoch * steps):
            inputs, x = training_batch(images, problem, sigma, run["batch_size"] // world,
                                       step_generator(run["seed"], rank, step))
            loss = F.mse_loss(model(inputs.to(device)), x.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            loss_sum += loss.item()
            if rank == 0 and progress is not None and (step + 1) % every == 0:
                progress.put_nowait((step + 1, loss_sum / (step + 1 - (epoch - 1) * steps)))
        loss_mean = torch.tensor(loss_sum / steps, device=device)
        if world > 1:  # equal per-worker batches: the global batch loss is the mean over workers
            torch.distributed.all_reduce(loss_mean)
            loss_mean /= world
        row = {"epoch": epoch, "step": epoch * steps, "train_loss": loss_mean.item(), "lr": lr,
               "seconds": time.perf_counter() - t0, "network": identity["network"]["name"], "sigma": sigma}
        history.append(row)
        if rank == 0:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "step": epoch * steps,
                     "metrics": history, "mask_channel": mask_channel(problem), **identity}
            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_bytes(join(folder, CHECKPOINT), buffer.getvalue(), options)
            if config.get("snapshots"):
                buffer = io.BytesIO()
                torch.save({"model": net.state_dict(), "epoch": epoch, "step": epoch * steps}, buffer)
                write_bytes(snapshot_path(folder, epoch), buffer.getvalue(), options)
            save_parquet(history, join(folder, METRICS), options)
            # not print(): Ray Train routes print() through its loggers, which show each line twice
            sys.stdout.write(f"{row['network']} sigma={sigma:g} epoch {epoch}/{run['epochs']} step {row['step']}: "
                             f"train_loss {row['train_loss']:.4e} lr {lr:.2e} ({row['seconds']:.1f} s)\n")
            sys.stdout.flush()
        if report is not None:
            report(row)


def _train_loop(config: dict[str, Any]) -> None:
    """The loop of one Ray Train worker (rank, world size and device from its context)."""
    import ray.train  # Ray only where networks train; checkpoints load without it
    import ray.train.torch  # Ray only where networks train; checkpoints load without it

    context = ray.train.get_context()
    _fit(config, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
         wrap=ray.train.torch.prepare_model, report=ray.train.report)


def _plain_task(config: dict[str, Any], use_gpu: bool) -> None:
    """The same loop as one plain Ray task (one worker, no Ray Train): no per-run setup cost."""
    _fit(config, 0, 1, torch.device("cuda" if use_gpu else "cpu"))


# --- driver -----------------------------------------------------------------------------------------------

def train_network(cfg: Config, name: str, sigma: float, train_images: torch.Tensor, problem: Problem,
                  progress: bool = True, plain: bool = False, snapshots: bool = False) -> str:
    """Train (or resume, or skip if finished) the network ``name`` at noise level ``sigma`` on Ray Train.

    ``train_images``: (N, C, H, W) floats in [0, 1].  Returns the checkpoint path (or URL) once the run
    has all ``cfg.epochs`` epochs.  Raises ValueError for invalid parameters, and for an existing
    checkpoint of another run unless ``cfg.overwrite``.  ``plain`` (``n_workers`` must be 1) runs the same
    loop as one plain Ray task instead of a Ray Train run: the same checkpoints and numbers, without Ray
    Train's fixed cost per run (tens of seconds), for studies that train many small networks.
    ``snapshots`` also keeps the weights after every epoch (``epochs/epoch<e>.pt``; epochs trained before a
    resume without it have none).
    """
    import ray  # Ray only where networks train; checkpoints load without it
    from ray.train import RunConfig, ScalingConfig  # Ray only where networks train; checkpoints load without it
    from ray.train.torch import TorchTrainer  # Ray only where networks train; checkpoints load without it
    from ray.util.queue import Empty as QueueEmpty  # Ray only where networks train; checkpoints load without it
    from ray.util.queue import Queue  # Ray only where networks train; checkpoints load without it

    check_training(cfg, [name])
    if plain and cfg.n_workers != 1:
        raise ValueError(f"n_workers must be 1 for plain (single-task) training, got {cfg.n_workers}")
    sigma = check_sigma(sigma)
    net = make_network(cfg, name, train_images.shape[1], problem)
    folder = network_dir(cfg, name, sigma)
    path = join(folder, CHECKPOINT)
    run = {"images": fingerprint(train_images), "epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch,
           "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "n_workers": cfg.n_workers}
    # the checkpoint's metadata, as every record, without secrets (it holds none today: a guard)
    identity = public({"network": network_config(net), "problem": problem.spec(), "sigma": sigma, "config": run})

    existing = read_checkpoint(path, cfg.storage_options)
    resume = existing is not None and not cfg.overwrite
    if resume and {key: existing[key] for key in _IDENTITY} != identity:
        diff = sorted(key for key in _IDENTITY if existing[key] != identity[key])
        raise ValueError(f"out: {path} holds a network of another run (differs in {', '.join(diff)}); "
                         "choose another output or pass overwrite")
    if resume and existing["epoch"] >= cfg.epochs:
        log.info("%s: finished (%d epochs), skipping training", path, existing["epoch"])
        return path
    if resume:
        log.info("%s: resuming after epoch %d of %d", path, existing["epoch"], cfg.epochs)

    queue = Queue(actor_options={"num_cpus": 0}) if progress and not plain else None
    loop_config = {"identity": identity, "images": ray.put(train_images.to(torch.float32)), "problem": problem,
                   "folder": folder, "storage_options": cfg.storage_options, "resume": resume, "progress": queue,
                   "snapshots": snapshots}
    if plain:
        task = ray.remote(_plain_task).options(num_cpus=worker_cpus(cfg), num_gpus=1 if cfg.use_gpu else 0)
        ray.get(task.remote(loop_config, cfg.use_gpu))
        return path
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.n_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": worker_cpus(cfg)}),
        run_config=RunConfig(name=f"{name}_sigma{sigma:g}-{time.strftime('%Y%m%d-%H%M%S')}"),
    )
    if queue is None:
        trainer.fit()
        return path
    total = cfg.epochs * cfg.steps_per_epoch
    done = existing["step"] if resume else 0
    with tqdm(total=total, initial=done, desc=f"train {name} σ={sigma:g}", unit="step") as bar:
        stop = threading.Event()

        def follow() -> None:  # the rank-0 worker sends (step, mean loss of the epoch so far)
            while not stop.is_set():
                try:
                    step, loss = queue.get(timeout=0.5)
                except (QueueEmpty, ray.exceptions.RayError):
                    continue
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{loss:.3e}")

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            trainer.fit()
        finally:
            stop.set()
            thread.join()
            queue.shutdown()
        bar.update(total - bar.n)
    return path


def unfinished_networks(cfg: Config) -> list[tuple[str, float]]:
    """The (name, σ) of ``cfg``'s networks whose checkpoint is missing or has fewer than ``cfg.epochs`` epochs."""
    return [key for key, path in trained_networks(cfg).items()
            if (checkpoint := read_checkpoint(path, cfg.storage_options)) is None
            or checkpoint["epoch"] < cfg.epochs]


def worker_cpus(cfg: Config) -> int:
    """CPUs per training worker: ``cfg.cpus_per_worker``, or by default (CPU training) the CPUs free now
    divided among the workers, at most one node's CPUs (torch in a worker uses as many threads); 1 with GPUs."""
    import ray  # Ray only where networks train; checkpoints load without it

    if cfg.cpus_per_worker is not None:
        return cfg.cpus_per_worker
    if cfg.use_gpu:
        return 1
    free = int(ray.available_resources().get("CPU", 1)) // cfg.n_workers
    largest = max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]), default=1)
    return max(1, min(free, largest))


def train_all(cfg: Config, train: torch.Tensor, problem: Problem) -> dict[tuple[str, float], str]:
    """Train every network of ``cfg.networks`` at every ``cfg.sigmas``; returns {(name, σ): checkpoint}."""
    check_training(cfg, list(cfg.networks))
    return {(name, sigma): train_network(cfg, name, sigma, train, problem)
            for name in cfg.networks for sigma in cfg.sigmas}


def trained_networks(cfg: Config) -> dict[tuple[str, float], str]:
    """{(name, σ): checkpoint path} of every network of ``cfg`` (as :func:`train_all` writes them)."""
    return {(name, sigma): join(network_dir(cfg, name, sigma), CHECKPOINT)
            for name in cfg.networks for sigma in cfg.sigmas}


def load_network(path: str, storage_options: dict | None = None) -> tuple[nn.Module, dict]:
    """``(network in eval mode on CPU, checkpoint dict)`` from a checkpoint (``weights_only=True``)."""
    checkpoint = read_checkpoint(path, storage_options)
    if checkpoint is None:
        raise ValueError(f"path: no network checkpoint at {path} (train it first)")
    return checked_network(checkpoint, path).eval(), checkpoint


def snapshot_path(folder: str, epoch: int) -> str:
    """The weights after ``epoch`` of the network whose folder is ``folder`` (written with ``snapshots``)."""
    return join(folder, SNAPSHOTS, f"epoch{epoch:04d}.pt")


def load_snapshot(folder: str, epoch: int, checkpoint: dict,
                  storage_options: dict | None = None) -> nn.Module | None:
    """The network of ``checkpoint`` (its folder ``folder``) with the weights it had after ``epoch``, in
    eval mode on CPU, checked as :func:`checked_network` checks a checkpoint; None when that epoch has no
    snapshot."""
    data = read_bytes(snapshot_path(folder, epoch), storage_options)
    if data is None:
        return None
    snapshot = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return checked_network({"network": checkpoint.get("network"), "model": snapshot.get("model")},
                           snapshot_path(folder, epoch)).eval()


MAX_PARAMETERS = 1 << 28  # 256 M parameters (1 GiB of float32): far above any network of this project


def checked_network(checkpoint: dict, path: str) -> nn.Module:
    """The network a checkpoint declares, with its weights, built only once the declaration is checked.

    The architecture is first built on the ``meta`` device (no memory): a declared size beyond
    :data:`MAX_PARAMETERS`, or parameter shapes that differ from the stored weights, are refused before
    any real allocation (a crafted config declaring a huge width cannot make this allocate it).
    """
    declared, weights = checkpoint.get("network"), checkpoint.get("model")
    if not isinstance(declared, dict) or not isinstance(weights, dict):
        raise ValueError(f"path: {path} is not a network checkpoint of this project (no network/model)")
    try:
        with torch.device("meta"):
            skeleton = build_network(**declared)
    except (TypeError, ValueError) as err:
        raise ValueError(f"path: {path} declares an invalid network: {err}") from None
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    size = sum(math.prod(shape) for shape in shapes.values())
    if size > MAX_PARAMETERS:
        raise ValueError(f"path: {path} declares a network of {size:,} parameters (more than {MAX_PARAMETERS:,})")
    stored = {name: tuple(t.shape) for name, t in weights.items() if isinstance(t, torch.Tensor)}
    if stored != shapes:
        raise ValueError(f"path: {path}: the stored weights do not match the declared network "
                         f"{declared.get('name')!r}")
    net = build_network(**declared)
    net.load_state_dict(weights)
    return net
