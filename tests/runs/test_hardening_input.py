"""Bad input is refused once, before any work, with one line naming it (issue: hardening).

Config types are taken strictly from YAML, ranges/choices/duplicates are checked when a Config is built, the
CLI prints one ``lemmse: error:`` line (exit 2) before Ray starts or anything is written, images must be
floats, σ stays in the range where the arithmetic is finite, checkpoints and archives are bounded.
"""
from __future__ import annotations

import gzip
import os
import io
import json
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import lemmse_ray as lm
import lemmse_ray.cli as cli
from lemmse_ray.runs.config import Config, ConfigError
from lemmse_ray.data.formats import MAX_DECOMPRESSED_BYTES
from lemmse_ray.data.loaders import load_dataset
from lemmse_ray.models.networks import build_network, network_config
from lemmse_ray.runs.pipeline import record_timing, write_report
from lemmse_ray.runs.training import load_network

REPO = Path(__file__).resolve().parents[2]


# --- Config: strict types, ranges, choices, duplicates -----------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    ({"overwrite": "false"}, "overwrite"),         # a string is not a boolean (it would be truthy)
    ({"use_gpu": 1}, "use_gpu"),
    ({"sigmas": 0.1}, "sigmas"),                    # a scalar where a list is needed
    ({"stats": "variance"}, "stats"),
    ({"networks": "resnet"}, "networks"),
    ({"sigmas": [0.1, 0.1]}, "sigmas"),             # duplicates would write one output twice
    ({"sigmas": [0.1, -0.1]}, "sigmas"),
    ({"sigmas": [True]}, "sigmas"),
    ({"sigmas": [1e-20]}, "sigmas"),                # 1/σ² overflows float32
    ({"stats": ["variance", "bogus"]}, "stats"),
    ({"dtype": "float16"}, "dtype"),
    ({"patch_size": 4}, "patch_size"),
    ({"patch_size": 5.0}, "patch_size"),            # an integer never from a float
    ({"n_queries": -3}, "n_queries"),
    ({"batch_images": 0}, "batch_images"),
    ({"padding": "bogus"}, "padding"),
    ({"problem": "superres"}, "problem"),
    ({"keep_prob": 0.0}, "keep_prob"),
    ({"keep_prob": 1.5}, "keep_prob"),
    ({"candidates": "interior"}, "candidates"),     # needs circular padding
    ({"input": "tikhonov", "reg": 0.0}, "reg"),
    ({"dataset": "cifar10"}, "root"),               # file datasets need a root
    ({"root": "/data"}, "root"),                    # embedded ones refuse it
    ({"storage_options": ["key"]}, "storage_options"),
])
def test_config_refuses_and_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field} "):
        Config(**changes)


def test_config_accepts_yaml_numbers_and_keeps_types():
    cfg = Config(sigmas=["1e-3", 0.05], lr="2e-4", overwrite=True, n_train=None)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.sigmas == [0.001, 0.05] and cfg.lr == 2e-4 and cfg.overwrite is True
    assert isinstance(Config(keep_prob=1).keep_prob, float)


def test_yaml_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"overwrite": "false"}))
    with pytest.raises(ValueError, match=rf"^overwrite in {path} must be true or false"):
        cli.parse(["run", "--config", str(path)])
    path.write_text("patch_size: 5\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown fields bogus"):
        cli.parse(["run", "--config", str(path)])
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        cli.parse(["run", "--config", str(path)])


# --- the CLI: one line, before Ray, nothing written -----------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--patch-size", "4"], "lemmse: error: --patch-size must be odd, got 4"),
    (["--sigmas", "0.1", "-0.1"], "lemmse: error: --sigmas must be > 0.0, got -0.1"),
    (["--sigmas", "0.1", "0.1"], "lemmse: error: --sigmas must not repeat values"),
    (["--n-queries", "-3"], "lemmse: error: --n-queries must be >= 1, got -3"),
    (["--stats", "bogus"], "lemmse: error: --stats must be one of"),
    (["--dtype", "float16"], "lemmse: error: --dtype must be one of float32, float64"),
    (["--padding", "bogus"], "lemmse: error: --padding must be one of zeros, circular"),
    (["--patch-size", "65"], "lemmse: error: patch_size=65 exceeds"),  # needs the image size: after loading
    (["--dataset", "digits", "--n-queries", "999"], "lemmse: error: n_queries=999 exceeds"),
])
def test_cli_user_errors_are_one_line_before_ray(tmp_path, monkeypatch, capsys, argv, message):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the input was validated")

    monkeypatch.setattr("lemmse_ray.cluster.session.ensure_ray", no_ray)
    out = tmp_path / "out"
    assert cli.main(["run", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_usage_errors_are_one_line_and_debug_shows_traceback(tmp_path):
    def lemmse(*argv):
        return subprocess.run([sys.executable, "-m", "lemmse_ray.cli", *argv], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)

    bad = lemmse("run", "--patch-size", "x")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("lemmse: error: argument --patch-size: must be an integer, got 'x'")
    debug = lemmse("run", "--patch-size", "4", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "--patch-size must be odd" in debug.stderr
    assert not any(tmp_path.iterdir())


def test_help_lists_choices_once_and_reads_as_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--problem {denoising,inpainting,deblurring}" in text
    assert "--padding {zeros,circular}" in text
    assert "(default: None)" not in text and "(default all)" not in text
    assert text.count("(default: photos)") == 1
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert "``" not in top and "verify-bank" in top and "run" in top


# --- report wall times --------------------------------------------------------------------------------------

def test_report_keeps_the_wall_time_of_the_run_that_computed(tmp_path):
    cfg = Config(out=str(tmp_path))
    record_timing(cfg, "bank", 40.0, computed=True)
    record_timing(cfg, "estimate", 70.0, computed=True)
    record_timing(cfg, "bank", 0.3, computed=False)       # a later invocation that reused the bank
    record_timing(cfg, "estimate", 20.0, computed=True)   # a resumed estimate: its time adds up
    text = write_report(cfg, {})
    assert "bank 40 s" in text and "estimate 90 s over 2 invocations" in text
    assert json.loads((tmp_path / "timings.json").read_text())["bank"]["invocations"] == 1


# --- images, σ and problem parameters ------------------------------------------------------------------------

def test_integer_images_are_refused_with_a_hint():
    train = np.random.default_rng(0).integers(0, 256, (4, 1, 5, 5), dtype=np.uint8)
    z = np.random.default_rng(1).random((1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"^train must hold floating-point images.*/ 255"):
        lm.estimate(train, z, lm.Denoising(), sigma=0.1, patch_size=3)
    with pytest.raises(ValueError, match=r"^z must hold floating-point"):
        lm.estimate(train / 255.0, (z * 255).astype(np.int64), lm.Denoising(), sigma=0.1, patch_size=3)


def test_images_far_outside_unit_range_warn_but_noisy_inputs_do_not():
    rng = np.random.default_rng(0)
    train, z = rng.random((4, 1, 5, 5)), rng.random((1, 1, 5, 5))
    with pytest.warns(UserWarning, match="far outside"):
        lm.estimate(train * 255.0, z, lm.Denoising(), sigma=0.1, patch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.estimate(train, z + 3.0, lm.Denoising(), sigma=2.0, patch_size=3)  # z is noisy: no range check


@pytest.mark.parametrize("sigma, dtype", [(True, torch.float64), (1e-20, torch.float32), (1e-300, torch.float64),
                                          (1e300, torch.float64), (None, torch.float32)])
def test_sigma_outside_the_finite_range_is_refused(sigma, dtype):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"^sigma"):
        lm.estimate(rng.random((4, 1, 5, 5)), rng.random((1, 1, 5, 5)), lm.Denoising(), sigma=sigma,
                    patch_size=3, dtype=dtype)


@pytest.mark.parametrize("problem", [
    lm.Denoising(),
    lm.Deblurring(lm.gaussian_kernel(3, 0.8), input="tikhonov", reg=1e-4),  # large whitening gains
    lm.Inpainting(keep_prob=0.7, input="adjoint"),
    lm.Inpainting(keep_prob=0.7, input="direct"),
])
@pytest.mark.parametrize("sigma", [1e-12, 1e150])
def test_float32_stays_finite_at_the_ends_of_the_allowed_range(problem, sigma):
    train = load_dataset("digits", "train", n=20).double()
    x = load_dataset("digits", "test", n=2).double()
    _, z, mask = problem.measure(x, 0.1, torch.Generator().manual_seed(0))
    res = lm.estimate(train, z, problem, sigma=sigma, patch_size=3, mask=mask if problem.random_mask else None,
                      stats=("variance", "ess", "entropy", "max_weight", "log_evidence"), dtype=torch.float32)
    for name in ("mean", "variance", "ess", "max_weight", "log_evidence"):
        assert torch.isfinite(getattr(res, name)).all(), name
    assert float(res.mean.min()) >= -1e-6 and float(res.mean.max()) <= 1 + 1e-6  # a convex combination


@pytest.mark.parametrize("make, name", [
    (lambda: lm.Denoising(reg="abc"), "reg"),
    (lambda: lm.Denoising(reg=True), "reg"),
    (lambda: lm.Deblurring(lm.gaussian_kernel(3, 1.0), threshold="x"), "threshold"),
])
def test_problem_parameters_are_named(make, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        make()


# --- checkpoints: bounded before any allocation ----------------------------------------------------------------

def _checkpoint(tmp_path, network: dict, model: dict) -> str:
    path = tmp_path / "checkpoint.pt"
    torch.save({"network": network, "model": model, "epoch": 1}, path)
    return str(path)


def test_checkpoint_declaring_a_huge_network_is_refused_without_allocating(tmp_path):
    net = build_network("patchmlp", in_channels=1, out_channels=1, patch_size=3, hidden=8)
    huge = dict(network_config(net), hidden=200_000)
    with pytest.raises(ValueError, match=r"^path: .*declares a network of [\d,]+ parameters"):
        load_network(_checkpoint(tmp_path, huge, net.state_dict()))
    wrong = dict(network_config(net), hidden=9)
    with pytest.raises(ValueError, match="do not match the declared network"):
        load_network(_checkpoint(tmp_path, wrong, net.state_dict()))
    with pytest.raises(ValueError, match="invalid network"):
        load_network(_checkpoint(tmp_path, {"name": "patchmlp", "bogus": 1}, net.state_dict()))
    loaded, _ = load_network(_checkpoint(tmp_path, network_config(net), net.state_dict()))
    probe = torch.rand(1, 1, 6, 6)
    torch.testing.assert_close(loaded(probe), net.eval()(probe))


# --- archives: decompressed sizes are capped -------------------------------------------------------------------

def _gzip_bomb(path: Path, header: bytes, zeros: int) -> None:
    """A gzip file of ``header`` followed by ``zeros`` zero bytes, written in chunks (never held in memory)."""
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        chunk = bytes(1 << 22)
        for _ in range(zeros // len(chunk)):
            f.write(chunk)


def test_idx_bomb_is_refused_after_its_header(tmp_path):
    """A < 1 MiB file that decompresses to 1 GiB: read up to what its header declares, + 1 byte."""
    _gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", b"\x00\x00\x08\x03" + np.array([10, 28, 28], ">i4").tobytes(),
               1 << 30)
    assert (tmp_path / "train-images-idx3-ubyte.gz").stat().st_size < 1 << 23
    code = ("import resource, sys\n"
            "from lemmse_ray.data.loaders import load_dataset\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n"
            f"    load_dataset('fashion-mnist', 'train', root={str(tmp_path)!r})\n"
            "except ValueError as err:\n"
            "    print(err)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    message, grown_mib = run.stdout.strip().splitlines()
    assert "does not match its header" in message
    assert int(grown_mib) < 64, f"reading the bomb grew the process by {grown_mib} MiB"


def test_idx_header_declaring_too_much_is_refused(tmp_path):
    declared = np.array([100_000, 2048, 2048], ">i4").tobytes()  # 419 GB of uint8
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + declared)
    with pytest.raises(ValueError, match="header declares"):
        load_dataset("fashion-mnist", "test", root=tmp_path)


def test_archive_members_beyond_the_cap_are_refused(tmp_path):
    """CIFAR-10 tar members and .npz arrays declare their sizes: beyond the cap they are not decompressed."""
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)]:
            size = MAX_DECOMPRESSED_BYTES + 3073 if name == "data_batch_3.bin" else 3073
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = size
            tar.addfile(info, _Zeros(size))
    with pytest.raises(ValueError, match=r"data_batch_3.bin declares [\d,]+ bytes"):
        load_dataset("cifar10", "train", root=archive)

    npz = tmp_path / "ffhq.npz"
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("train.npy", "w", force_zip64=True) as f:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (MAX_DECOMPRESSED_BYTES // 3072 + 1, 32, 32, 3)})
            f.write(header.getvalue())
            remaining = (MAX_DECOMPRESSED_BYTES // 3072 + 1) * 3072
            while remaining:
                f.write(bytes(min(remaining, 1 << 22)))
                remaining -= min(remaining, 1 << 22)
        z.writestr("test.npy", b"")
    with pytest.raises(ValueError, match="arrays declare"):
        load_dataset("ffhq32", "train", root=npz)


class _Zeros(io.RawIOBase):
    """A readable stream of ``n`` zero bytes."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_capped_reader_stops_at_the_cap():
    from lemmse_ray.data.formats import read_capped
    assert read_capped(io.BytesIO(b"abc"), 3, "x") == b"abc"
    with pytest.raises(ValueError, match="^bomb: decompresses to more than 1,000 bytes"):
        read_capped(_Zeros(10 ** 12), 1000, "bomb")


@pytest.mark.parametrize("where", ["out", "bank", "estimate-in-bank"])
def test_cli_refuses_folders_it_does_not_own_before_ray(tmp_path, monkeypatch, capsys, where):
    """A user's folder as --out or --bank, or a bank inside an output, is refused before Ray starts; the
    user's file is intact and nothing is written."""
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the paths were checked")

    monkeypatch.setattr("lemmse_ray.cluster.session.ensure_ray", no_ray)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("precious")
    out = tmp_path / "out"
    argv = {"out": ["--out", str(user)],
            "bank": ["--out", str(out), "--bank", str(user)],
            "estimate-in-bank": ["--out", str(out), "--bank", str(out / "estimates" / "test_sigma0.1.zarr")]}[where]
    assert cli.main(["estimate", "--dataset", "digits", "--n-train", "20", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lemmse: error:") and err.count("\n") == 1, err
    assert ("mine" in err and "thesis.txt" in err) or "is the bank" in err, err
    assert sorted(p.name for p in user.iterdir()) == ["thesis.txt"] and (user / "thesis.txt").read_text() == "precious"
    assert not out.exists()


def test_verify_bank_command_reports_and_repairs(tmp_path, capsys, ray_cluster):
    """`lemmse verify-bank` prints the damaged shard and exits 1; `--repair` rebuilds it to the same numbers."""
    argv = ["--dataset", "digits", "--n-train", "30", "--patch-size", "3", "--shard-rows", "512",
            "--out", str(tmp_path / "run")]
    assert cli.main(["build-bank", *argv]) == 0
    images = tmp_path / "run" / "bank.zarr" / "images"
    reference = np.asarray(zarr.open_array(str(images))[...])
    chunk = next(p for p in sorted(images.rglob("*")) if p.is_file() and p.name != "zarr.json" and "c/1" in str(p))
    chunk.write_bytes(chunk.read_bytes()[:-7])            # a truncated chunk in shard 1
    capsys.readouterr()
    assert cli.main(["verify-bank", *argv]) == 1
    text = capsys.readouterr().out
    assert "'images', shard 1" in text and "--repair" in text
    assert cli.main(["verify-bank", "--repair", *argv]) == 0
    assert "repaired 1 of 1 shards" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(images))[...]), reference)


def test_estimate_on_a_damaged_bank_ends_in_one_line(tmp_path, ray_cluster):
    """`lemmse estimate` over a bank with a damaged shard: the actors' error, in one line naming the shard (no
    Ray tracebacks or reports of abandoned calls after it), exit 1, and no batch flagged done."""
    argv = ["--dataset", "digits", "--n-train", "30", "--n-queries", "2", "--patch-size", "3", "--shard-rows",
            "512", "--out", str(tmp_path / "run")]
    assert cli.main(["build-bank", *argv]) == 0
    images = tmp_path / "run" / "bank.zarr" / "images"
    chunk = next(p for p in sorted(images.rglob("*")) if p.is_file() and p.name != "zarr.json" and "c/1" in str(p))
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    run = subprocess.run([sys.executable, "-m", "lemmse_ray.cli", "estimate", *argv], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("lemmse: error: actor for shards"), lines[:8]
    assert "'images', shard 1" in lines[0] and "damaged" in lines[0], lines[0]
    assert "Traceback" not in run.stdout, run.stdout[-2000:]
    for group in (tmp_path / "run" / "estimates").glob("*.zarr"):
        assert not zarr.open_group(str(group), mode="r")["done"][...].any()
    assert bytes(damaged) == chunk.read_bytes()  # the user's bank is left as it was


def test_run_output_is_quiet_with_progress_and_names_the_report(tmp_path, ray_cluster):
    """`lemmse run` against a cluster prints its own lines only: no Ray log lines (unless --verbose), a
    progress bar per training run, and a last line naming report.md and the figures folder."""
    out = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--n-train", "20", "--n-queries", "2", "--patch-size", "3",
            "--networks", "patchmlp", "--hidden", "8", "--epochs", "1", "--steps-per-epoch", "4",
            "--batch-size", "4", "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    run = subprocess.run([sys.executable, "-m", "lemmse_ray.cli", *argv], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = (run.stdout + run.stderr).splitlines()
    ray_noise = ("(pid=", "INFO ", "WARNING", "Traceback", "PlacementGroup", "PreemptionWatcher",
                 "Reporting training result", "ray.", "Ray ")
    noisy = [line for line in lines if any(token in line for token in ray_noise)]
    assert not noisy, noisy[:5]
    assert "train patchmlp σ=0.1" in run.stderr  # the training run's progress bar
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith(f"report: {out / 'report.md'}; figures: {out / 'figures'}"), last
    assert (out / "report.md").is_file() and any((out / "figures").glob("*.png"))
