"""Studies (lemmse_ray.studies.engine, lemmse study / lemmse report): a tiny 2 × 2 study end to end on ``digits``.

Aggregates are recomputed here from the per-image Parquet (plain numpy means) and the per-image PSNRs from
the stored Zarr arrays (float64, written out); the loss-floor flag is checked on a planted network that
returns the clean image.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
import zarr

from lemmse_ray.cli import main
from lemmse_ray.core.metrics import PSNR_CAP

SPEC = {"name": "tiny", "floor_images": 12,
        "base": {"dataset": "digits", "n_train": 120, "n_queries": 3, "patch_size": 3, "networks": ["patchmlp"],
                 "hidden": 32, "epochs": 1, "steps_per_epoch": 60, "batch_size": 16, "lr": 3e-3,
                 "batch_images": 3},
        "grid": {"sigmas": [0.002, 0.2], "problem": ["denoising", "inpainting"]},
        "figures": [{"kind": "line", "file": "psnr", "x": "sigma", "y": "psnr_lemmse_x", "hue": "setting",
                     "style": "split", "where": {"network": "none"}, "logx": True, "title": "PSNR vs σ",
                     "xlabel": "σ", "ylabel": "PSNR [dB]", "caption": "LE-MMSE quality.", "error": "psnr_lemmse_x_se"},
                    {"kind": "line", "table": "epochs", "file": "epochs", "x": "step", "y": "psnr_net_lemmse",
                     "hue": ["network", "sigma"], "style": "split", "facet": "setting", "hline": 25,
                     "title": "Agreement per epoch", "xlabel": "steps", "ylabel": "PSNR [dB]"}]}
CELLS, SPLITS = 4, ("train", "test")


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_cluster):
    """The tiny study run twice: through the library with a planted clean-image "network", then again
    through ``lemmse study`` (nothing left to compute)."""
    from lemmse_ray.studies.engine import run_study
    from lemmse_ray.studies.cli import load_study

    folder = tmp_path_factory.mktemp("study")
    spec, out = folder / "tiny.yaml", folder / "out"
    spec.write_text(yaml.safe_dump(SPEC))
    name, parts, cells = load_study(str(spec))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        first = run_study(name, parts, cells, str(out), planted={"oracle": lambda est, split: est.x})
    first_report = (out / "report.md").read_text()
    assert main(["study", str(spec), "--out", str(out)]) == 0
    return {"out": out, "first": first, "first_report": first_report, "spec": spec, "printed": printed.getvalue(),
            "history": json.loads((out / "history.json").read_text())}


def test_a_row_for_every_cell_split_and_network(study):
    got = {(r["cell"], r["split"], r["network"]) for r in study["first"]["cells"]}
    assert got == {(c, s, n) for c in range(CELLS) for s in SPLITS for n in ("none", "patchmlp", "oracle")}
    final = rows(study["out"] / "cells.parquet")  # the CLI rerun has no planted network
    assert len(final) == CELLS * len(SPLITS) * 2
    assert {(r["problem"], r["sigma"]) for r in final} == {(p, s) for p in ("denoising", "inpainting")
                                                            for s in (0.002, 0.2)}
    for r in final:  # every table row shows the receptive field: the LE-MMSE's P, and the network's (= P)
        assert r["receptive_field"] == r["patch_size"] == 3


def test_progress_lines_name_each_bank_group_and_network_with_the_minutes_so_far(study):
    lines = [line for line in study["printed"].splitlines() if line.startswith("[")]
    assert all(re.match(r"^\[ *\d+\.\d min\] ", line) for line in lines)
    said = [line.split("] ", 1)[1] for line in lines]
    assert [s.split(":")[0] for s in said if s.startswith("bank")] == ["bank 1/2", "bank 2/2"]
    groups = [s for s in said if s.startswith("estimate group")]
    assert [g.split(":")[0] for g in groups] == [f"estimate group {i}/12" for i in range(1, 13)]
    assert sum("floor queries (12 images)" in g for g in groups) == 4
    assert sum("train queries (3 images)" in g for g in groups) == sum("test queries (3 images)" in g for g in groups) == 4
    assert sum(s.startswith("training patchmlp for cell ") for s in said) == 4
    minutes = [float(line[1:].split(" min]")[0]) for line in lines]
    assert minutes == sorted(minutes)


def test_rerun_computes_nothing_and_two_sigmas_share_one_bank(study):
    first, second = study["history"]
    # per cell: train and test (3 images, one batch each) and the floor (12 images, 4 batches)
    assert first["banks_built"] == 2 and first["networks_trained"] == 4 and first["batches_computed"] == 8 + 16
    assert first["shards_written"] >= 2
    assert {k: second[k] for k in ("banks_built", "shards_written", "batches_computed", "networks_trained")} == \
        dict.fromkeys(("banks_built", "shards_written", "batches_computed", "networks_trained"), 0)
    work = json.loads((study["out"] / "work.json").read_text())
    assert len(work["banks"]) == 2 and len(work["estimates"]) == 8 + 4 and len(work["networks"]) == 4
    final = rows(study["out"] / "cells.parquet")
    for problem in ("denoising", "inpainting"):
        assert len({r["bank_key"] for r in final if r["problem"] == problem}) == 1
    assert all(Path(study["out"], "work", "banks", f"{k}.zarr").is_dir() for k in work["banks"])


def test_aggregates_are_psnrs_of_the_pooled_mse_of_the_per_image_table(study):
    cells = rows(study["out"] / "cells.parquet")
    images = rows(study["out"] / "images.parquet")
    for row in cells:
        mine = [i for i in images if (i["cell"], i["split"], i["network"]) == (row["cell"], row["split"], row["network"])]
        assert len(mine) == 3 == row["n_images"]
        metrics = (("psnr_z_x", "mse_z_x"), ("psnr_lemmse_x", "mse_lemmse_x"))
        if row["network"] != "none":
            metrics += (("psnr_net_lemmse", "mse_net_lemmse"), ("psnr_net_x", "mse_net_x"))
        for column, error in metrics:
            pooled = math.fsum(i[error] for i in mine) / 3
            expected = min(PSNR_CAP, 10 * math.log10(1 / pooled)) if pooled > 0 else PSNR_CAP
            assert row[column] == pytest.approx(expected, rel=1e-12)
            assert row[f"{column}_mean"] == pytest.approx(math.fsum(i[column] for i in mine) / 3, rel=1e-12)
            assert math.isfinite(row[f"{column}_mean"])


def test_per_image_psnr_matches_the_stored_arrays(study):
    images = rows(study["out"] / "images.parquet")
    for row in [r for r in images if r["network"] == "none"]:
        group = zarr.open_group(str(study["out"] / "work" / "estimates" / f"{row['estimate_key']}.zarr"), mode="r")
        x = np.asarray(group["x"][row["image"]], dtype=np.float64)
        mean = np.asarray(group["mean"][row["image"]], dtype=np.float64)
        z = np.asarray(group["z"][row["image"]], dtype=np.float64)
        for column, estimate in (("psnr_lemmse_x", mean), ("psnr_z_x", z)):
            total = 0.0
            for a, b in zip(estimate.ravel(), x.ravel()):
                total += (a - b) ** 2
            expected = min(PSNR_CAP, 10 * math.log10(x.size / total)) if total > 0 else PSNR_CAP  # capped
            assert row[column] == pytest.approx(expected, abs=1e-6)


def test_loss_floor_flags_the_planted_clean_image_network_only(study):
    train = {r["network"]: r for r in study["first"]["cells"]
             if (r["split"], r["problem"], r["sigma"]) == ("train", "denoising", 0.2)}
    assert train["oracle"]["below_floor"] and train["oracle"]["mse_net_x"] == 0.0
    assert train["oracle"]["loss_floor"] > 0 and train["oracle"]["floor_images"] == 12
    assert train["oracle"]["mse_gap"] == pytest.approx(-train["oracle"]["loss_floor"], rel=1e-12)  # MSE 0 − floor
    assert train["patchmlp"]["in_lemmse_class"] is True and train["none"]["loss_floor"] == train["oracle"]["loss_floor"]
    assert not train["patchmlp"]["below_floor"]
    assert not any(r["below_floor"] for r in study["first"]["cells"] if r["network"] == "patchmlp")
    assert "**oracle** in cell" in study["first_report"]
    assert "**patchmlp** in cell" not in study["first_report"]


def test_copying_is_total_on_train_queries_at_tiny_sigma_not_on_test(study):
    none = {(r["problem"], r["sigma"], r["split"]): r for r in rows(study["out"] / "cells.parquet")
            if r["network"] == "none"}
    assert none[("denoising", 0.002, "train")]["copy_rate"] == 1.0
    assert none[("denoising", 0.002, "test")]["copy_rate"] < 1.0
    assert none[("denoising", 0.002, "train")]["copy_undecided"] == 0.0
    assert all(0.0 <= r["copy_undecided"] <= 1.0 - r["copy_rate"] for r in none.values())


def test_epochs_table_ends_at_the_final_network(study):
    cells = {(r["cell"], r["split"], r["network"]): r for r in rows(study["out"] / "cells.parquet")}
    epochs = rows(study["out"] / "epochs.parquet")
    assert {(r["cell"], r["split"], r["network"], r["epoch"]) for r in epochs} == \
        {(c, s, "patchmlp", 1) for c in range(CELLS) for s in SPLITS}
    for r in epochs:  # one epoch: its snapshot is the final checkpoint
        final = cells[(r["cell"], r["split"], "patchmlp")]
        assert r["psnr_net_lemmse"] == pytest.approx(final["psnr_net_lemmse"], rel=1e-9) and r["step"] == 60
    classes = rows(study["out"] / "classes.parquet")
    for (cell, split, network), row in cells.items():
        if network == "none":
            mine = [c for c in classes if (c["cell"], c["split"]) == (cell, split)]
            assert sum(c["pixels"] for c in mine) == row["pixels"] == 3 * 64
            assert sum(c["pixels"] for c in mine if c["interior"]) == row["interior_share"] * row["pixels"]


def test_report_rerenders_without_ray(study):
    out = study["out"]
    (out / "report.md").unlink()
    (out / "figures" / "tiny_psnr.png").unlink()
    assert (out / "figures" / "tiny_examples.png").is_file() and (out / "figures" / "tiny_ess.png").is_file()
    code = ("import sys; sys.modules['ray'] = None\n"  # any import of ray now fails
            "from lemmse_ray.cli import main\n"
            f"sys.exit(main(['report', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    text = (out / "report.md").read_text()
    assert "![PSNR vs σ](figures/tiny_psnr.png)" in text and "*LE-MMSE quality.*" in text
    assert (out / "figures" / "tiny_psnr.png").stat().st_size > 1000
    assert "| problem | sigma | split | network | RF |" in text
    assert "![tiny examples](figures/tiny_examples.png)" in text and "![tiny ess](figures/tiny_ess.png)" in text
    assert "![tiny grid](figures/tiny_grid.png)" in text and (out / "figures" / "tiny_epochs.png").is_file()


def test_another_spec_or_foreign_folder_is_refused(study, tmp_path, capsys):
    other = {**SPEC, "grid": {"sigmas": [0.2], "problem": ["denoising"]}}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    before = (study["out"] / "cells.parquet").read_bytes()
    assert main(["study", str(path), "--out", str(study["out"])]) == 2
    assert "holds the study 'tiny' of another spec" in capsys.readouterr().err
    assert (study["out"] / "cells.parquet").read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    assert main(["study", str(path), "--out", str(foreign)]) == 2
    assert "is a folder that lemmse_ray did not write" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


BAD = [
    ({"grid": {"sigmaz": [0.1]}}, "grid.sigmaz is not a configuration field"),
    ({"grid": {"sigmas": []}}, "grid.sigmas must not be empty"),
    ({"grid": {}}, "grid must not be empty"),
    ({"grid": {"patch_size": 5}}, "grid.patch_size must be a list"),
    ({"zip": {"problem": ["denoising", "inpainting"], "input": ["direct"]}}, "zip lists must have one length"),
    ({"base": {"networks": ["resnet"]}, "grid": {"patch_size": [1, 3]}}, "networks: resnet cannot be built with "
                                                                          "patch_size=1"),
    ({"grid": {"patch_size": [3, 4]}}, "patch_size must be odd, got 4 (in the cell patch_size=4 of bad)"),
    ({"base": {"out": "x"}}, "base.out is set by the study"),
    ({"grid": {"dataset": ["cifar10"]}}, "root is required for dataset 'cifar10'"),
    ({"figures": [{"kind": "line", "file": "f", "title": "t", "x": "sigma", "xlabel": "σ", "ylabel": "dB"}]},
     "figures[0].y is required"),
    ({"figures": [{"kind": "pie", "file": "f", "title": "t"}]}, "figures[0].kind must be one of"),
]


@pytest.mark.parametrize("changes, message", BAD)
def test_bad_specs_fail_on_one_line_before_any_work(tmp_path, capsys, changes, message):
    spec = {"name": "bad", "base": {"dataset": "digits", "networks": []}, "grid": {"sigmas": [0.1]}}
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if key == "base" else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lemmse: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_preset_and_set_override(tmp_path, capsys):
    assert main(["study", "no-such-preset", "--out", str(tmp_path / "o")]) == 2
    assert "SPEC: 'no-such-preset' is neither a file nor a preset" in capsys.readouterr().err
    assert main(["study", "concentration", "--set", "n_train=50", "--set", "sigmaz=1", "--dry-run"]) == 2
    assert "--set.sigmaz is not a configuration field" in capsys.readouterr().err
    assert main(["study", "concentration", "--set", "sigmas=[0.1]", "--dry-run"]) == 0
    assert "1 cells in 1 part(s)" in capsys.readouterr().out


def test_presets_expand_to_valid_cells():
    from lemmse_ray.studies.presets import PRESETS
    from lemmse_ray.studies.cli import load_study

    for name in PRESETS:
        _, parts, cells = load_study(name, "quick")
        assert cells and all(c.cfg.dataset == "photos" and c.cfg.grayscale for c in cells)
        assert all(part.figures for part in parts)
        roots = [f"{d}=/data/{d}" for d in ("fashion-mnist", "cifar10", "ffhq32")]
        _, _, full = load_study(name, "full", roots=roots)
        assert {c.cfg.dataset for c in full} == {"fashion-mnist", "cifar10", "ffhq32"}
    _, _, cells = load_study("concentration")
    sigmas = sorted(c.sigma for c in cells)
    assert len(sigmas) >= 8 and sigmas[0] <= 0.01 and sigmas[-1] >= 30.0  # both limits of docs/theory.md §6
    _, _, cells = load_study("patch-size")
    assert sorted({c.cfg.patch_size for c in cells}) == [3, 5, 7, 9, 11]


def test_readme_example_spec_is_valid(tmp_path):
    from lemmse_ray.studies.spec import parse_spec
    from lemmse_ray.studies.cli import load_study

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    name, parts = parse_spec(yaml.safe_load(block))
    path = tmp_path / "example.yaml"
    path.write_text(block)
    _, _, cells = load_study(str(path))
    assert name == "my-study" and len(cells) == 3 * 3 * 2 and parts[0].figures
