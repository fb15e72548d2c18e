"""Large images never cost the whole split, and a query batch that cannot fit in memory is refused before
anything is allocated (issue: ``lemmse plan --size 4096 --n-train 4`` resized all 1,797 digits first)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lemmse_ray.data import loaders
from lemmse_ray.data.loaders import load_dataset, query_indices, subset_indices
from lemmse_ray.runs import pipeline
from lemmse_ray.runs.config import Config
from lemmse_ray.runs.pipeline import check_batch_memory, load_data


def test_only_the_kept_images_are_resized(monkeypatch):
    resized = []
    original = loaders.resize_center_crop

    def counting(images, size):
        resized.append(len(images))
        return original(images, size)

    monkeypatch.setattr(loaders, "resize_center_crop", counting)
    cfg = Config(dataset="digits", size=16, n_train=4, n_queries=2, subset="random", seed=3)
    train, queries = load_data(cfg)
    assert resized == [4, 2]  # before: the 1,437 training and 360 test digits
    monkeypatch.undo()
    # the same images as resizing the whole split, then choosing (what the loader did before)
    full_train, full_test = (load_dataset("digits", split, size=16) for split in ("train", "test"))
    assert torch.equal(train, full_train[subset_indices(len(full_train), 4, "random", 3)])
    assert torch.equal(queries["train"], train[:2])
    assert torch.equal(queries["test"], full_test[query_indices(len(full_test), 2, split="test", seed=3)])


def test_counts_are_checked_before_loading_the_rest():
    with pytest.raises(ValueError, match="^n_train=5000 exceeds the 1437 training images of digits$"):
        load_data(Config(dataset="digits", n_train=5000))
    with pytest.raises(ValueError, match="^n_queries=8 exceeds the 4 train images$"):
        load_data(Config(dataset="digits", n_train=4, n_queries=8))


def test_a_query_batch_too_large_for_memory_is_refused(monkeypatch):
    """4 images of 64×64, P = 5 (d = 25): 4·4096·(8·25 + 12·(2·25 + 2)) = 13.5 MB of query features."""
    monkeypatch.setattr(pipeline, "available_memory", lambda: 10_000_000)
    cfg = Config(dataset="digits", size=64, n_train=4, n_queries=2, batch_images=4)
    with pytest.raises(ValueError, match=r"^batch_images=4: the query features of 4 images of 64x64 pixels need up "
                                         r"to 0\.0135 GB, more than half of the 0\.01 GB free here; lower "
                                         r"--batch-images, --size or --patch-size$"):
        check_batch_memory(cfg, (1, 64, 64))
    check_batch_memory(Config(dataset="digits", size=64, n_train=4, n_queries=2, batch_images=1), (1, 64, 64))


def test_plan_of_huge_images_is_one_line_before_ray(tmp_path):
    """The issue's command: one line, exit 2, nothing written, no Ray started (it would print its own lines)."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "lemmse_ray.cli", "plan", "--dataset", "digits", "--size", "4096",
                          "--n-train", "4", "--n-queries", "2", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("lemmse: error: batch_images=4: the query features of 4 images of 4096x4096 "
                                 "pixels need up to ") and run.stderr.count("\n") == 1, run.stderr[-2000:]
    assert not out.exists()
