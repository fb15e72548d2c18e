"""The object-store path: banks and outputs at ``s3://`` URLs, through the real client stack.

A moto S3 server runs in this process on 127.0.0.1 (a thread serving HTTP); the driver, the Ray bank-builder
tasks and the shard actors all reach it through s3fs → aiobotocore → HTTP, with the credentials and endpoint
given in ``storage_options`` (the Ray workers were started before this module and do not see its
environment).  Results must equal the in-memory API's.
"""
from __future__ import annotations

import logging
import os
import socket

import numpy as np
import pytest
import torch

import lemmse_ray as lm
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.data.loaders import load_dataset
from lemmse_ray.cluster.build import build_bank
from lemmse_ray.cluster.driver import estimate_on_ray
from lemmse_ray.core.patches import PatchGeometry
from lemmse_ray.storage.bank_store import open_bank, open_group

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.usefixtures("ray_cluster")
BUCKET = "lemmse-test"
SIGMA = 0.15
STATS = ("variance", "ess")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port with one empty bucket; yields the fsspec storage options."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per HTTP request otherwise
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{port}"}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        assert BUCKET in [p.rstrip("/") for p in fs.ls("")]
        yield options
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_bank_and_estimate_on_s3(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a local path would show up here as an "s3:" folder
    train = load_dataset("digits", "train", n=6).double()
    x = load_dataset("digits", "test", n=3).double()
    problem = lm.Denoising()
    _, z, _ = problem.measure(x, SIGMA, torch.Generator().manual_seed(0))
    bank_url, out_url = f"s3://{BUCKET}/bank.zarr", f"s3://{BUCKET}/out.zarr"

    bank = build_bank(bank_url, train, problem, patch_size=3, shard_rows=128, storage_options=s3, progress=False)
    assert bank.n_rows == 6 * 64 and bank.n_shards == 3  # shards of 128 rows: 2 images of 64 rows
    assert bank.build_stats["shards_written"] == 3 and bank.build_stats["rows_written"] == bank.n_rows

    # the objects are in the bucket (one chunk of images per shard), nothing was written locally
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    assert fs.exists(f"{BUCKET}/bank.zarr/zarr.json")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/bank.zarr/images/c")) == ["0", "1", "2"]
    assert not any(tmp_path.iterdir())

    group = estimate_on_ray(bank, z, SIGMA, out_url, batch_images=2, n_actors=2, stats=STATS, storage_options=s3,
                            progress=False)
    ref = lm.estimate(train, z, problem, SIGMA, patch_size=3, stats=STATS, dtype=torch.float32)
    out = open_group(out_url, "r", s3)  # read back through a fresh handle
    assert out["done"][...].all()
    np.testing.assert_allclose(out["mean"][...], ref.mean.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["variance"][...], ref.variance.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["ess"][...], ref.ess.numpy(), rtol=1e-4)
    np.testing.assert_array_equal(out["z"][...], z.numpy().astype(np.float32))
    assert group.attrs["history"][-1]["computed_batches"] == [0, 1]
    assert fs.exists(f"{BUCKET}/out.zarr/mean/zarr.json")
    assert not any(tmp_path.iterdir())

    # re-opening validates against the request
    plan = plan_classes(problem, PatchGeometry((1, 8, 8), 3))
    assert open_bank(bank_url, problem, plan, s3).n_rows == bank.n_rows
    with pytest.raises(ValueError, match="problem"):
        open_bank(bank_url, lm.Denoising(input="tikhonov"), plan, s3)
    with pytest.raises(ValueError, match="patch_size"):
        open_bank(bank_url, problem, plan_classes(problem, PatchGeometry((1, 8, 8), 5)), s3)
    with pytest.raises(ValueError, match="no bank"):
        open_bank(f"s3://{BUCKET}/missing.zarr", problem, plan, s3)
    with pytest.raises(ValueError, match="already holds a different bank"):
        build_bank(bank_url, train, problem, patch_size=5, shard_rows=128, storage_options=s3, progress=False)
    with pytest.raises(ValueError, match="another run"):
        estimate_on_ray(bank, z, 2 * SIGMA, out_url, batch_images=2, stats=STATS, storage_options=s3,
                        progress=False)

    # re-runs: the finished bank is left alone, the finished output is not recomputed
    again = build_bank(bank_url, train, problem, patch_size=3, shard_rows=128, storage_options=s3, progress=False)
    assert again.build_stats["shards_written"] == 0 and again.build_stats["rows_written"] == 0
    group = estimate_on_ray(again, z, SIGMA, out_url, batch_images=2, n_actors=2, stats=STATS, storage_options=s3,
                            progress=False)
    assert group.attrs["history"][-1]["computed_batches"] == []
    np.testing.assert_allclose(group["mean"][...], ref.mean.numpy(), rtol=0, atol=1e-5)


def test_unflagged_shard_is_rebuilt_on_s3(s3):
    """A shard whose ``done`` flag is missing in the bucket (a crashed writer) is rewritten, the others not."""
    train = load_dataset("digits", "train", n=4).double()
    problem = lm.Denoising()
    url = f"s3://{BUCKET}/resume.zarr"
    build_bank(url, train, problem, patch_size=3, shard_rows=64, storage_options=s3, progress=False)
    group = open_group(url, "r+", s3)
    reference = group["images"][...]
    group["done"][1] = 0
    group["images"][1:2] = 0.5
    bank = build_bank(url, train, problem, patch_size=3, shard_rows=64, storage_options=s3, progress=False)
    assert bank.build_stats["shards_written"] == 1
    np.testing.assert_array_equal(open_group(url, "r", s3)["images"][...], reference)


def test_user_objects_survive_and_no_secret_is_written_on_s3(s3):
    """A user's object under the target prefix survives (``overwrite`` included); no credential reaches the bucket."""
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    fs.pipe(f"{BUCKET}/mine/notes.txt", b"my thesis")
    train = load_dataset("digits", "train", n=2).double()
    problem = lm.Denoising()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"mine.*notes\.txt"):
            build_bank(f"s3://{BUCKET}/mine", train, problem, patch_size=3, shard_rows=64, storage_options=s3,
                       overwrite=overwrite, progress=False)
    assert fs.cat(f"{BUCKET}/mine/notes.txt") == b"my thesis"

    options = {**s3, "key": "AKIAUNIQUEKEY8842", "secret": "uniqueSECRETvalue-0042"}  # moto accepts any
    bank = build_bank(f"s3://{BUCKET}/secret/bank.zarr", train, problem, patch_size=3, shard_rows=64,
                      storage_options=options, progress=False)
    _, z, _ = problem.measure(train, SIGMA, torch.Generator().manual_seed(0))
    estimate_on_ray(bank, z, SIGMA, f"s3://{BUCKET}/secret/out.zarr", batch_images=2, n_actors=1, stats=STATS,
                    storage_options=options, metadata={"config": {"storage_options": options}}, progress=False)
    objects = fs.find(f"{BUCKET}/secret")
    assert len(objects) > 10
    for path in objects:
        content = fs.cat(path)
        assert options["key"].encode() not in content and options["secret"].encode() not in content, path
