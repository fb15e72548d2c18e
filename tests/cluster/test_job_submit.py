"""The jobs as a user submits them: ``ray job submit --working-dir <repo> -- python jobs/….py`` to a head node.

A separate Ray head (its own ports, temp dir and process group, loopback only) is started with ``ray start
--head --block`` as a child process; nothing here calls ``ray.init``, so the session cluster of the other
tests is untouched.  The CLI uploads the repository as the working directory, runs the bank job and then the
estimation job, and the estimates written to the output Zarr groups must equal the in-memory API's on the
same inputs.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import lemmse_ray as lm
from lemmse_ray.data.loaders import load_dataset

REPO = Path(__file__).resolve().parents[2]
RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
N_TRAIN, N_QUERIES, PATCH, SIGMA = 20, 2, 3, 0.1
ARGS = ["--dataset", "digits", "--n-train", str(N_TRAIN), "--n-queries", str(N_QUERIES), "--patch-size",
        str(PATCH), "--shard-rows", "512", "--sigmas", str(SIGMA), "--batch-images", "1", "--stats", "variance",
        "ess"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while choosing, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    return env


def pids_using(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (this head's private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def head():
    """A Ray head with a dashboard on free loopback ports; yields the job-server address."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths live below it
    gcs, dash, client, agent_http, agent_grpc, env_agent, metrics, om, nm = free_ports(9)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
           "--num-gpus=0", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--object-manager-port={om}", f"--node-manager-port={nm}",
           "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray_start.log", "w+")
    proc = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/jobs/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"the dashboard did not come up at {address}:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        # SIGTERM to `ray start` alone: it stops its processes in order (a few seconds); signalling the whole
        # group at once leaves the autoscaler monitor waiting for the dead GCS.  Then SIGKILL what is left.
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        # Ray processes that left the group (none expected) are found by the private temp dir in their arguments
        deadline = time.time() + 10
        while (left := [p for p in pids_using(temp_dir) if p != os.getpid()]) and time.time() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, script: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python",
           f"jobs/{script}", *ARGS, "--out", str(out)]
    return subprocess.run(cmd, env=ray_env(), cwd=tempfile.gettempdir(), capture_output=True, text=True,
                          timeout=240)


def test_working_dir_package_is_small(tmp_path):
    """What ``--working-dir`` uploads (Ray honours .gitignore/.rayignore): no results, caches or egg-info."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")  # private: skip if it moves
    create_package = packaging.create_package

    package = tmp_path / "pkg.zip"
    create_package(str(REPO), package, include_gitignore=True)
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/estimate.py" in names and "lemmse_ray/cluster/driver.py" in names
    bad = [n for n in names if n.split("/")[0] in ("results", "out", "build", ".pytest_cache", ".hypothesis")
           or ".egg-info/" in n or "__pycache__/" in n]
    assert not bad, bad[:10]
    assert package.stat().st_size < 8 << 20, f"working dir package is {package.stat().st_size / 2**20:.1f} MiB"


def test_jobs_submitted_with_cli(head, tmp_path):
    out = tmp_path / "run"  # absolute: the job runs in Ray's copy of the working dir
    first = submit(head, "build_bank.py", out)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "succeeded" in first.stdout + first.stderr
    bank = zarr.open_group(str(out / "bank.zarr"), mode="r")
    assert bank["done"][...].all() and bank.attrs["n_rows"] == N_TRAIN * 64 and bank.attrs["n_shards"] == 3
    assert not (out / "estimates").exists(), "the bank job must not estimate"
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "bank.zarr" / "images" / "c").iterdir()}
    assert sorted(shards) == ["0", "1", "2"]

    second = submit(head, "estimate.py", out)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "succeeded" in second.stdout + second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "bank.zarr" / "images" / "c").iterdir()} == shards, \
        "the estimation job rewrote the finished bank"

    train = load_dataset("digits", "train", n=N_TRAIN, subset="random", seed=0).double()  # the jobs' subset
    for split in ("train", "test"):
        group = zarr.open_group(str(out / "estimates" / f"{split}_sigma{SIGMA:g}.zarr"), mode="r")
        assert group["done"][...].all() and group["mean"].shape == (N_QUERIES, 1, 8, 8)
        assert group.attrs["history"][-1]["n_actors"] == 2
        z = torch.from_numpy(group["z"][...]).double()
        ref = lm.estimate(train, z, lm.Denoising(), SIGMA, patch_size=PATCH, stats=("variance", "ess"),
                          dtype=torch.float32)
        np.testing.assert_allclose(group["mean"][...], ref.mean.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(group["variance"][...], ref.variance.numpy(), rtol=0, atol=1e-5)
        # the estimate is not the input: the comparison can fail
        assert np.abs(group["mean"][...] - group["z"][...]).max() > 1e-2
    assert (out / "psnr.parquet").exists()
