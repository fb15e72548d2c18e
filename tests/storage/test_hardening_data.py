"""Data safety: paths we do not own are never touched, damaged banks are never used, outputs are never flagged
done over unwritten data, no secret is written, and a failing actor stops the driver with a clear error."""
from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import lemmse_ray as lm
from lemmse_ray.data.loaders import load_dataset
from lemmse_ray.cluster.build import build_bank
from lemmse_ray.cluster.driver import estimate_on_ray
from lemmse_ray.cluster.actors import start_actors

pytestmark = pytest.mark.usefixtures("ray_cluster")
SIGMA = 0.15
STATS = ("variance", "ess")
SHARD_ROWS = 64  # digits 8×8, patch 3: 64 rows per image → one shard per training image


@pytest.fixture(scope="module")
def data():
    train = load_dataset("digits", "train", n=6).double()
    x = load_dataset("digits", "test", n=8).double()
    problem = lm.Denoising()
    _, z, _ = problem.measure(x, SIGMA, torch.Generator().manual_seed(0))
    return train, x, z, problem


@pytest.fixture(scope="module")
def pristine(data, tmp_path_factory):
    """A finished bank (6 shards) and its arrays, read back once; tests work on copies of it."""
    train, _, _, problem = data
    url = str(tmp_path_factory.mktemp("pristine") / "bank.zarr")
    build_bank(url, train, problem, patch_size=3, shard_rows=SHARD_ROWS, progress=False)
    group = zarr.open_group(url, mode="r")
    return url, {name: group[name][...] for name in ("images", "digests", "centers")}


def copy_bank(pristine, tmp_path, name="bank.zarr") -> str:
    url = str(tmp_path / name)
    shutil.copytree(pristine[0], url)
    return url


def open_copy(url, data):
    from lemmse_ray.core.classes import plan_classes
    from lemmse_ray.core.patches import PatchGeometry
    from lemmse_ray.storage.bank_store import open_bank
    _, _, _, problem = data
    return open_bank(url, problem, plan_classes(problem, PatchGeometry((1, 8, 8), 3)))


# --- 1. ownership of paths ---------------------------------------------------------------------------------

def test_user_files_survive_bank_and_estimate(tmp_path, data, pristine):
    train, _, z, problem = data
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my thesis")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"mine.*notes\.txt"):
            build_bank(str(folder), train, problem, patch_size=3, shard_rows=SHARD_ROWS, overwrite=overwrite,
                       progress=False)
        assert (folder / "notes.txt").read_text() == "my thesis"

    # a Zarr group that another program wrote is not ours either
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", attributes={"owner": "someone"})
    foreign.create_array("data", shape=(3,), dtype="int32")[...] = [1, 2, 3]
    bank = open_copy(copy_bank(pristine, tmp_path), data)
    for target in (folder, tmp_path / "foreign.zarr"):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=re.escape(target.name)):
                estimate_on_ray(bank, z[:2], SIGMA, str(target), batch_images=2, stats=STATS, overwrite=overwrite,
                                progress=False)
    assert (folder / "notes.txt").read_text() == "my thesis"
    assert zarr.open_group(str(tmp_path / "foreign.zarr"), mode="r")["data"][...].tolist() == [1, 2, 3]

    # a plain file in place of the group
    (tmp_path / "file.zarr").write_text("not a group")
    with pytest.raises(ValueError, match=r"file\.zarr"):
        build_bank(str(tmp_path / "file.zarr"), train, problem, patch_size=3, shard_rows=SHARD_ROWS, overwrite=True,
                   progress=False)
    assert (tmp_path / "file.zarr").read_text() == "not a group"

    # a bank is not an output and an output is not a bank, even with overwrite
    out = str(tmp_path / "out.zarr")
    estimate_on_ray(bank, z[:2], SIGMA, out, batch_images=2, n_actors=1, stats=STATS, progress=False)
    with pytest.raises(ValueError, match=r"out\.zarr.*estimate"):
        build_bank(out, train, problem, patch_size=3, shard_rows=SHARD_ROWS, overwrite=True, progress=False)
    other = copy_bank(pristine, tmp_path, "other_bank.zarr")
    with pytest.raises(ValueError, match=r"other_bank\.zarr.*bank"):
        estimate_on_ray(bank, z[:2], SIGMA, other, batch_images=2, stats=STATS, overwrite=True, progress=False)
    assert zarr.open_group(other, mode="r")["images"].shape == pristine[1]["images"].shape

    # an empty folder may be used; our own group may be replaced with overwrite
    (tmp_path / "empty").mkdir()
    build_bank(str(tmp_path / "empty"), train[:2], problem, patch_size=3, shard_rows=SHARD_ROWS, progress=False)
    rebuilt = build_bank(str(tmp_path / "empty"), train[:3], problem, patch_size=3, shard_rows=SHARD_ROWS,
                         overwrite=True, progress=False)
    assert rebuilt.n_rows == 3 * 64
    # an interrupted creation (the marker is written first, the attributes last) is recognisably ours
    zarr.open_group(str(tmp_path / "interrupted"), mode="w", attributes={"lemmse_ray": "bank"})
    (tmp_path / "interrupted" / "images").mkdir()
    assert build_bank(str(tmp_path / "interrupted"), train[:2], problem, patch_size=3, shard_rows=SHARD_ROWS,
                      progress=False).n_rows == 2 * 64


def test_estimate_into_the_bank_is_refused(tmp_path, data, pristine):
    _, _, z, _ = data
    bank = open_copy(copy_bank(pristine, tmp_path), data)
    for out in (bank.url, bank.url + "/", bank.url + "/estimates/out.zarr", str(Path(bank.url).parent)):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match="bank"):
                estimate_on_ray(bank, z[:2], SIGMA, out, batch_images=2, stats=STATS, overwrite=overwrite,
                                progress=False)
    reopened = open_copy(bank.url, data)
    np.testing.assert_array_equal(reopened.group["images"][...], pristine[1]["images"])


# --- 2. verified banks ---------------------------------------------------------------------------------------

def shard_file(url: str, array: str, shard: int) -> Path:
    """The object holding one shard of ``array`` (one chunk: ``c/<shard>/0/0/0`` for the images,
    ``c/<shard>/0`` for the digests)."""
    path = Path(url) / array / "c" / str(shard)
    while path.is_dir():
        path = path / "0"
    return path


def replace_with_valid_bytes(path: Path):
    """Another shard's chunk in place of this one: valid bytes, a valid checksum, other images."""
    path.write_bytes((path.parents[3] / "0" / "0" / "0" / "0").read_bytes())


def delete(path: Path):
    path.unlink()


def truncate(path: Path):
    path.write_bytes(b"")


def cut_tail(path: Path):
    path.write_bytes(path.read_bytes()[:-7])


def flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array,damage", [("images", delete), ("images", truncate), ("images", flip),
                                          ("images", cut_tail), ("images", replace_with_valid_bytes),
                                          ("digests", flip), ("digests", delete)],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_damaged_done_shard_is_an_error_and_repaired(tmp_path, data, pristine, array, damage):
    from lemmse_ray.storage.bank_store import clear_done, verify_bank
    train, _, _, problem = data
    url = copy_bank(pristine, tmp_path)
    assert [row["status"] for row in verify_bank(url)] == ["ok"] * 6
    damage(shard_file(url, array, 2))
    pattern = rf"{re.escape(url)}.*{array}.*shard 2|{re.escape(url)}.*shard 2.*{array}"
    bank = open_copy(url, data)
    with pytest.raises(ValueError, match=pattern):
        bank.read_images(2)
    rows = verify_bank(url)
    assert [(r["shard"], r["first_image"], r["last_image"], r["done"]) for r in rows] == \
        [(s, s, s + 1, True) for s in range(6)]
    assert [r["status"] == "ok" for r in rows] == [True, True, False, True, True, True]
    assert array in rows[2]["status"]

    clear_done(url, [2])
    assert verify_bank(url)[2]["status"] == "not built" and verify_bank(url)[2]["done"] is False
    repaired = build_bank(url, train, problem, patch_size=3, shard_rows=SHARD_ROWS, progress=False)
    assert repaired.build_stats["shards_written"] == 1
    assert [row["status"] for row in verify_bank(url)] == ["ok"] * 6
    group = zarr.open_group(url, mode="r")
    for name, reference in pristine[1].items():
        np.testing.assert_array_equal(group[name][...], reference)
    # and the pristine bank holds the training images (independent check of what "repaired" means)
    np.testing.assert_array_equal(group["images"][...].astype(np.float64), train.numpy())


def test_actors_refuse_a_damaged_shard(tmp_path, data, pristine):
    _, _, z, _ = data
    url = copy_bank(pristine, tmp_path)
    bank = open_copy(url, data)
    flip(shard_file(url, "images", 4))
    with pytest.raises(Exception) as info:
        estimate_on_ray(bank, z[:2], SIGMA, str(tmp_path / "out.zarr"), batch_images=2, n_actors=2, stats=STATS,
                        progress=False)
    last = str(info.value).strip().splitlines()[-1]
    assert "shards [3, 6)" in last and url in last and "'images'" in last and "shard 4" in last, last
    assert not zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["done"][...].any()


def test_old_format_bank_is_refused_with_a_hint(tmp_path, data, pristine):
    url = copy_bank(pristine, tmp_path)
    group = zarr.open_group(url, mode="r+")
    group.attrs["format_version"] = 1
    with pytest.raises(ValueError, match=r"format.*rebuild"):
        open_copy(url, data)


# --- 3. outputs never flagged done over unwritten data --------------------------------------------------------

def test_resume_with_another_batch_size_never_leaves_zeros(tmp_path, data, pristine, caplog):
    train, _, z, problem = data
    bank = open_copy(copy_bank(pristine, tmp_path), data)
    out = str(tmp_path / "out.zarr")
    group = estimate_on_ray(bank, z, SIGMA, out, batch_images=4, n_actors=1, stats=STATS, progress=False)
    # the first run was killed after batch 0 (images 0–3): batch 1 unflagged, its images never written
    group["done"][1] = 0
    group["mean"][4:8] = group["mean"].fill_value
    group["variance"][4:8] = group["variance"].fill_value
    with caplog.at_level(logging.INFO, logger="lemmse_ray"):
        group = estimate_on_ray(bank, z, SIGMA, out, batch_images=2, n_actors=1, stats=STATS, progress=False)
    assert "batch_images" in caplog.text
    assert group["done"][...].all()
    ref = lm.estimate(train, z, problem, SIGMA, patch_size=3, stats=STATS, dtype=torch.float32)
    np.testing.assert_allclose(group["mean"][...], ref.mean.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(group["variance"][...], ref.variance.numpy(), rtol=0, atol=1e-5)


# --- 4. no secrets at rest ----------------------------------------------------------------------------------

SECRETS = {"key": "AKIAEXAMPLEKEY4242", "secret": "wJalrSECRETexample9876", "token": "tok-SESSION-5555",
           "password": "hunter2-PASSWORD", "url_password": "urlPW-31337"}


def test_no_secret_is_written(tmp_path, data, pristine, caplog):
    from lemmse_ray.runs.config import Config
    from lemmse_ray.runs.pipeline import estimate_step
    _, x, _, problem = data
    bank = open_copy(copy_bank(pristine, tmp_path), data)
    cfg = Config(out=str(tmp_path / "run"), sigmas=[SIGMA], patch_size=3, stats=list(STATS), n_actors=1,
                 batch_images=2, storage_options={"key": SECRETS["key"], "secret": SECRETS["secret"],
                                                  "client_kwargs": {"aws_session_token": SECRETS["token"]}})
    with caplog.at_level(logging.DEBUG, logger="lemmse_ray"):
        estimate_step(cfg, bank, problem, {"test": x[:2]})
        estimate_on_ray(bank, x[:2], SIGMA, str(tmp_path / "run" / "direct.zarr"), batch_images=2, n_actors=1,
                        stats=STATS, progress=False,
                        metadata={"db": {"Password": SECRETS["password"], "user": "me"},
                                  "source": f"s3://me:{SECRETS['url_password']}@bucket/data",
                                  "storage_options": {"anon": False}})
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        content = path.read_bytes()
        for value in SECRETS.values():
            assert value.encode() not in content, f"{value} written to {path}"
    for value in SECRETS.values():
        assert value not in caplog.text
    metadata = zarr.open_group(str(tmp_path / "run" / "direct.zarr"), mode="r").attrs["metadata"]
    assert metadata["db"]["user"] == "me" and "storage_options" not in metadata  # only secrets are dropped


def test_redaction_at_any_depth():
    from lemmse_ray.storage.redact import public
    value = {"storage_options": {"key": "k"}, "a": [{"api_key": "x", "n": 1}], "b": {"c": {"secret_access": "s"}},
             "credentials": {"x": 1}, "keep": "s3://bucket/path", "url": "https://u:p@host/x", "sigma": 0.1}
    clean = public(value)
    assert "storage_options" not in clean
    assert clean["a"][0]["n"] == 1 and clean["a"][0]["api_key"] != "x"
    assert clean["b"]["c"]["secret_access"] != "s" and clean["credentials"] != {"x": 1}
    assert clean["keep"] == "s3://bucket/path" and clean["sigma"] == 0.1 and "u:p@" not in clean["url"]
    assert value["storage_options"] == {"key": "k"}, "the input is not modified"


# --- 5. bounded retries ---------------------------------------------------------------------------------------

def run_bounded(fn, seconds=240):
    """fn() in a thread; returns its exception (it must end, with one)."""
    result = {}

    def target():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            result["error"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the driver did not stop"
    assert "error" in result, "the driver did not fail"
    return result["error"]


def test_actor_init_error_fails_the_driver_with_its_shards(tmp_path, data, pristine):
    _, _, z, _ = data
    url = copy_bank(pristine, tmp_path)
    bank = open_copy(url, data)
    shutil.rmtree(Path(url) / "images")  # every actor fails while loading its shards
    error = run_bounded(lambda: estimate_on_ray(bank, z[:2], SIGMA, str(tmp_path / "out.zarr"), batch_images=2,
                                                n_actors=2, stats=STATS, progress=False))
    last = str(error).strip().splitlines()[-1]
    assert re.search(r"actor for shards \[(0, 3|3, 6)\) of " + re.escape(url) + r" failed: .*images", last), last


def test_actor_restarts_are_bounded(tmp_path, data, pristine):
    import ray
    _, _, z, _ = data
    bank = open_copy(copy_bank(pristine, tmp_path), data)
    actors = start_actors(bank, 1, max_restarts=1, max_task_retries=1)
    first = ray.get(actors[0].describe.remote(), timeout=120)["pid"]
    ray.kill(actors[0], no_restart=False)  # recovered by the one restart allowed
    pid = first
    while pid == first:  # (a call may still reach the dying process)
        pid = ray.get(actors[0].describe.remote(), timeout=120)["pid"]
    ray.kill(actors[0], no_restart=False)  # exhausts max_restarts=1
    error = run_bounded(lambda: estimate_on_ray(bank, z[:2], SIGMA, str(tmp_path / "out.zarr"), actors=actors,
                                                batch_images=2, stats=STATS, progress=False))
    last = str(error).strip().splitlines()[-1]
    assert f"actor for shards [0, 6) of {bank.url} failed" in last, last
