"""Bank repair and seeds (issue 16, item 13).

``verify-bank --repair`` rebuilds the bad shards of the bank that is there, from the images it was built
from: other images or settings are refused on one line before anything changes, ``--overwrite`` included.
Seeds are bounded so that every generator seed derived from them fits (one line naming ``--seed``).

The refusals need no Ray: the bank is built in this process (create the group, build each shard), and a
Ray start inside the refused path fails the test.  One test repairs for real, through Ray.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import lemmse_ray.cli as cli
from lemmse_ray.cluster.build import bank_request, build_shard
from lemmse_ray.cluster.driver import DTYPES
from lemmse_ray.runs.config import MAX_SEED, Config, ConfigError
from lemmse_ray.runs.pipeline import SPLITS, load_data, make_problem, query_seed, simulate, verify_step
from lemmse_ray.storage.bank_store import create_bank_group, verify_bank

ARGV = ["--dataset", "digits", "--n-train", "6", "--n-queries", "2", "--patch-size", "3", "--shard-rows", "64"]


def config(tmp_path, **changes) -> Config:
    base = Config(dataset="digits", n_train=6, n_queries=2, patch_size=3, shard_rows=64, out=str(tmp_path / "run"))
    return dataclasses.replace(base, **changes)


def build_here(cfg: Config) -> None:
    """The bank of ``cfg``, built in this process as ``build_bank`` would (no Ray)."""
    train, _ = load_data(cfg)
    problem = make_problem(cfg, tuple(train.shape[1:]))
    _, centers, layout, attrs = bank_request(train, problem, cfg.patch_size, cfg.padding, cfg.candidates,
                                                cfg.shard_rows, DTYPES[cfg.dtype])
    create_bank_group(cfg.bank_url, attrs, centers, tuple(train.shape[1:]))
    for shard in range(layout.n_shards):
        build_shard(cfg.bank_url, None, shard, train.numpy(), layout, attrs)


def damage_shard_2(url: str) -> None:
    """Flip a byte of shard 2 of ``images`` (one file: a shard is one chunk of whole images)."""
    path = Path(url, "images", "c", "2", "0", "0", "0")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x5A
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and inode (a rewritten file gets a new inode: atomic writes)."""
    return {p: (p.read_bytes(), p.stat().st_ino) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def damaged(tmp_path, monkeypatch):
    """A 6-shard digits bank (8×8 images, patch 3: 64 rows per image, shards of 64 rows: one image) with shard 2
    damaged; Ray may not
    start (a refusal must come before it)."""
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the repair went on")

    monkeypatch.setattr("lemmse_ray.cluster.build.ensure_ray", no_ray)
    cfg = config(tmp_path)
    build_here(cfg)
    damage_shard_2(cfg.bank_url)
    assert [r["status"] == "ok" for r in verify_bank(cfg.bank_url)] == [True, True, False, True, True, True]
    return cfg


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("other, message", [
    ({"n_train": 7}, r"^train: the bank at {url} was built from other training images \(fingerprint [0-9a-f]{{12}}…, "
                     r"these images [0-9a-f]{{12}}…; it differs in class_offsets, fingerprint, n_images, n_rows, "
                     r"n_shards\): repair it with the images it was built from \(the same dataset, n_train, subset "
                     r"and seed\); nothing was changed$"),
    ({"seed": 1}, r"^train: the bank at {url} was built from other training images .*; it differs in fingerprint\)"),
    ({"dtype": "float64"}, r"^bank: the bank at {url} was built with other settings \(it differs in dtype\): repair "
                           r"it with the settings it was built with; nothing was changed$"),
], ids=["n_train", "seed", "dtype"])
def test_repair_with_other_images_or_settings_changes_nothing(damaged, capsys, other, message, overwrite):
    cfg = dataclasses.replace(damaged, overwrite=overwrite, **other)
    train, _ = load_data(cfg)
    problem = make_problem(cfg, tuple(train.shape[1:]))
    before = snapshot(Path(cfg.bank_url))
    with pytest.raises(ValueError, match=message.format(url=cfg.bank_url)):
        verify_step(cfg, train, problem, repair=True)
    assert snapshot(Path(cfg.bank_url)) == before  # no done flag cleared, no shard rewritten
    assert zarr.open_group(cfg.bank_url, mode="r")["done"][...].tolist() == [1] * 6


def test_cli_repair_with_other_images_is_one_line(damaged, monkeypatch, capsys):
    monkeypatch.setattr("lemmse_ray.cluster.session.ensure_ray", lambda **kwargs: None)  # nothing the refusal runs needs Ray
    before = snapshot(Path(damaged.bank_url))
    argv = [*ARGV, "--out", damaged.out]
    argv[argv.index("--n-train") + 1] = "7"
    capsys.readouterr()
    assert cli.main(["verify-bank", "--repair", "--overwrite", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"lemmse: error: train: the bank at {damaged.bank_url} was built from other "
                                   "training images") and captured.err.count("\n") == 1, captured.err
    assert "repaired" not in captured.out and "'images', shard 2" in captured.out  # the table, then the refusal
    assert snapshot(Path(damaged.bank_url)) == before


def test_repair_with_overwrite_rebuilds_only_the_bad_shard(tmp_path, capsys, ray_cluster):
    """The images the bank was built from, with ``--overwrite``: shard 2 is rebuilt to its first bytes, and
    no other shard is rewritten (``--overwrite`` does not turn a repair into a rebuild of the bank)."""
    cfg = config(tmp_path)
    build_here(cfg)
    pristine = snapshot(Path(cfg.bank_url))
    damage_shard_2(cfg.bank_url)
    capsys.readouterr()
    assert cli.main(["verify-bank", "--repair", "--overwrite", *ARGV, "--out", cfg.out]) == 0
    assert "repaired 1 of 1 shards" in capsys.readouterr().out
    after = snapshot(Path(cfg.bank_url))
    rebuilt = {p for p in after if "/c/2" in str(p.relative_to(cfg.bank_url)) or p.name == "zarr.json"}
    assert {p: after[p] for p in after if p not in rebuilt} == {p: pristine[p] for p in pristine if p not in rebuilt}
    assert {p: after[p][0] for p in rebuilt if "/c/2" in str(p)} == \
        {p: pristine[p][0] for p in pristine if "/c/2" in str(p)}
    assert [r["status"] for r in verify_bank(cfg.bank_url)] == ["ok"] * 6


# --- seeds ---------------------------------------------------------------------------------------------------

def test_seed_is_bounded_with_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(ConfigError, match=rf"^seed must be <= {MAX_SEED}, got {MAX_SEED + 1}$"):
        Config(seed=MAX_SEED + 1)
    huge = "99999999999999999999999"
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump({"seed": int(huge)}))
    for argv, named in ((["build-bank", "--seed", huge], "--seed"),
                        (["build-bank", "--config", str(spec)], f"seed in {spec}"),
                        (["study", "agreement", "--set", f"seed={huge}", "--dry-run"], "seed")):
        out = tmp_path / "out"
        assert cli.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lemmse: error: {named} must be <= {MAX_SEED}, got {huge}") and err.count("\n") == 1, err
        assert not out.exists()


def test_the_largest_seed_seeds_every_generator(tmp_path):
    """With the largest seed and many σ, every draw of a run seeds torch's generators (seeds in [0, 2**64))."""
    cfg = config(tmp_path, seed=MAX_SEED, sigmas=[0.01 * k for k in range(1, 51)])
    train, queries = load_data(cfg)  # a seeded random subset and seeded test queries
    problem = make_problem(cfg, tuple(train.shape[1:]))
    for split in SPLITS:
        for index in (0, len(cfg.sigmas) - 1):
            assert 0 <= query_seed(cfg, split, index) < 2**64
            _, z, _ = simulate(cfg, problem, queries[split], split, index)
            assert torch.isfinite(z).all()
    torch.Generator().manual_seed(MAX_SEED)
    assert np.array([MAX_SEED], dtype=np.int64)[0] == MAX_SEED  # the study tables store it as int64
