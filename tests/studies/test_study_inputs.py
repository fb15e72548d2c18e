"""Study inputs are checked before any work or write, and study records hold no secret (issue 16: items 1, 6,
7, 10, 11).

* item 1 -- every record of a study (``study.json``, ``work.json``, ``history.json``, the tables,
  ``report.md``) goes through :func:`lemmse_ray.storage.redact.public`; ``storage_options`` are refused
  from ``--set`` and, from the spec's base, reach the study's reads and writes;
* item 6 -- YAML alias bombs, recursive aliases, deep nesting and oversized files (spec, ``--set``,
  ``lemmse run --config``) are refused on one line naming the file, fast and in little memory;
* item 7 -- ``lemmse report`` re-checks ``study.json`` (names, figures), caps the files it reads (bytes and
  rows, from the Parquet footer), requires its columns, and writes nothing before every check passed;
* item 10 -- the number of cells is computed from the grid sizes and refused above the cap before expanding;
* item 11 -- every figure's keys and columns are checked against the columns the study will produce when the
  spec is read.

Every refusal is checked through the CLI: exit status 2, one ``lemmse: error:`` line, nothing written.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lemmse_ray.cli import main

SECRETS = {"key": "AKIAEXAMPLEKEY4242", "secret": "wJalrSECRETexample9876", "token": "tok-SESSION-5555",
           "url_password": "urlPW-31337"}
BASE = {"dataset": "digits", "networks": []}
LINE = {"kind": "line", "file": "psnr", "x": "sigma", "y": "psnr_lemmse_x", "style": "split",
        "where": {"network": "none"}, "title": "PSNR", "xlabel": "σ", "ylabel": "dB", "caption": "PSNR."}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def refused(capsys, argv: list[str], *messages: str) -> str:
    """Run the CLI here: exit 2, one error line holding every message.  Returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("lemmse: error: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, err
    return err


CHILD = ("import json, resource, sys, time\n"
         "import lemmse_ray.cli, lemmse_ray.studies.cli\n"
         "def work(*args, **kwargs):\n"
         "    sys.exit('started work: the input was not refused first')\n"
         "lemmse_ray.cli.ensure_ray = lemmse_ray.studies.cli.run_study = work\n"
         "from lemmse_ray.cli import main\n"
         "t0 = time.perf_counter()\n"
         "code = main(json.loads(sys.argv[1]))\n"
         "seconds = time.perf_counter() - t0\n"
         "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
         "print(json.dumps({'code': code, 'seconds': seconds, 'peak': peak}))\n")


def in_child(argv: list[str], cwd: Path) -> tuple[dict, str]:
    """The CLI in a fresh process: ({code, seconds of main(), peak resident bytes}, stderr)."""
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=180)
    lines = done.stdout.strip().splitlines()
    assert lines, f"the command did not return (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1]), done.stderr


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """The peak memory of a process that imports the CLI and refuses an unknown preset."""
    result, err = in_child(["study", "no-such-preset"], tmp_path_factory.mktemp("baseline"))
    assert result["code"] == 2, err
    return result["peak"]


def refused_cheaply(baseline: int, cwd: Path, argv: list[str], *messages: str) -> None:
    """As :func:`refused`, in a fresh process, within generous bounds of time (10 s for what took a minute or
    never ended) and memory (200 MiB above a trivial refusal, for what took gigabytes)."""
    result, err = in_child(argv, cwd)
    assert result["code"] == 2, err
    assert err.startswith("lemmse: error: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, err
    assert result["seconds"] < 10, f"took {result['seconds']:.1f} s"
    extra = result["peak"] - baseline
    assert extra < 200 * 2**20, f"{extra / 2**20:.0f} MiB more memory than a trivial refusal"


def no_ray(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("Ray was started before the input was validated")

    monkeypatch.setattr("lemmse_ray.studies.engine.run_study", fail)
    monkeypatch.setattr("lemmse_ray.studies.cli.run_study", fail)
    monkeypatch.setattr("lemmse_ray.cluster.session.ensure_ray", fail)


# --- item 6: alias bombs, recursion, depth, size ------------------------------------------------------------

def laughs(indent: int, levels: int = 8, width: int = 9) -> str:
    """The block-sequence lines of a billion-laughs bomb (width**levels scalars once expanded)."""
    pad = " " * indent
    lines = [f"{pad}- &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"{pad}- &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def bomb_spec(where: str) -> str:
    head = "name: bomb\nbase: {dataset: digits, networks: []}\ngrid: {sigmas: [0.1]}\n"
    if where == "description":
        return head + "description:\n" + laughs(2)
    return head + ("figures:\n  - kind: line\n    file: f\n    x: sigma\n    y: psnr_lemmse_x\n    title: t\n"
                   "    xlabel: σ\n    ylabel: dB\n    caption:\n" + laughs(6))


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("where", ["description", "caption"])
def test_alias_bomb_in_a_spec_is_refused_fast_and_small(tmp_path, baseline, where, dry_run):
    """9⁸ scalars once expanded (the defect's 9⁹ took 67 s and 2.4 GB); a bomb in a caption passed --dry-run."""
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb_spec(where))
    out = tmp_path / "out"
    refused_cheaply(baseline, tmp_path, ["study", str(path), "--out", str(out), *(["--dry-run"] if dry_run else [])],
                    f"SPEC: {path} expands through YAML aliases", "alias bomb")
    assert not out.exists()


def test_recursive_alias_deep_nesting_and_large_spec_are_refused(tmp_path, capsys, monkeypatch):
    no_ray(monkeypatch)
    head = "name: s\nbase: {dataset: digits, networks: []}\ngrid: {sigmas: [0.1]}\n"
    path = tmp_path / "spec.yaml"
    path.write_text(head + "description: &a [1, *a]\n")
    refused(capsys, ["study", str(path), "--dry-run"], f"SPEC: {path} holds a recursive alias")
    path.write_text(head + "description: " + "[" * 20000 + "]" * 20000 + "\n")
    refused(capsys, ["study", str(path), "--dry-run"], f"SPEC: {path} is nested too deeply")
    path.write_text(head + "description: " + "x" * (2 << 20) + "\n")
    refused(capsys, ["study", str(path), "--dry-run"], f"SPEC: {path} is larger than the limit of 1 MiB")


def test_alias_bomb_in_set_and_in_run_config_is_refused(tmp_path, capsys, monkeypatch, baseline):
    """A bomb as the first σ: the error for a σ that is not a number printed the whole value."""
    bomb = "[[&a [" + ", ".join(["lol"] * 9) + "]" + "".join(
        f", &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefg", "bcdefgh")) + "]]"
    refused_cheaply(baseline, tmp_path, ["study", "concentration", "--set", f"sigmas={bomb}", "--dry-run"],
                    "--set sigmas expands through YAML aliases")
    config = tmp_path / "run.yaml"
    config.write_text(f"sigmas: {bomb}\n")
    out = tmp_path / "out"
    refused_cheaply(baseline, tmp_path, ["run", "--config", str(config), "--out", str(out)],
                    f"--config: {config} expands through YAML aliases")
    no_ray(monkeypatch)
    config.write_text("sigmas: " + "[" * 20000 + "]" * 20000 + "\n")
    refused(capsys, ["run", "--config", str(config), "--out", str(out)], f"--config: {config} is nested too deeply")
    assert not out.exists()


def test_anchors_within_the_limits_still_work(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("name: s\nparts:\n  - {name: a, base: {dataset: digits, networks: [], sigmas: &s [0.1, 0.2]}}\n"
                    "  - {name: b, base: {dataset: digits, networks: [], sigmas: *s}}\n")
    assert main(["study", str(path), "--dry-run"]) == 0
    assert "4 cells in 2 part(s)" in capsys.readouterr().out


# --- item 10: the number of cells --------------------------------------------------------------------------

def test_a_huge_grid_is_refused_at_once(tmp_path, baseline):
    grid = {"sigmas": [0.001 * (i + 1) for i in range(100)], "n_train": list(range(1, 101)),
            "n_queries": list(range(1, 101)), "seed": list(range(100)), "patch_size": list(range(1, 200, 2)),
            "topk": list(range(1, 101))}
    path = write_spec(tmp_path / "huge.yaml", {"name": "huge", "base": BASE, "grid": grid})
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        refused_cheaply(baseline, tmp_path, ["study", str(path), "--out", str(out), *extra],
                        "the study has 1,000,000,000,000 cells, more than the limit of 10,000",
                        "huge: n_queries 100 × n_train 100 × patch_size 100 × seed 100 × sigmas 100 × topk 100")
    assert not out.exists()


def test_cells_are_counted_before_expanding(tmp_path, capsys):
    from lemmse_ray.studies.spec import count_cells, parse_spec
    spec = {"name": "c", "parts": [
        {"name": "a", "base": {**BASE, "sigmas": [0.1, 0.2, 0.3]}, "grid": {"patch_size": [3, 5]}},   # 2 × 3 σ
        {"name": "b", "base": BASE, "grid": {"sigmas": [[0.1, 0.2], [0.3], 0.4], "patch_size": [3, 5]}},  # 4 × 2
        {"name": "c", "base": BASE, "zip": {"sigmas": [[0.1, 0.2], [0.3]], "patch_size": [3, 5]},
         "grid": {"seed": [0, 1, 2]}}]}                                                               # 3 × 3
    _, parts = parse_spec(spec)
    assert count_cells(parts) == 6 + 8 + 9
    path = write_spec(tmp_path / "c.yaml", spec)
    assert main(["study", str(path), "--dry-run"]) == 0
    assert "23 cells in 3 part(s)" in capsys.readouterr().out
    over = {"name": "over", "base": BASE, "grid": {"sigmas": [0.001 * (i + 1) for i in range(100)],
                                                    "n_train": list(range(1, 102))}}
    refused(capsys, ["study", str(write_spec(tmp_path / "over.yaml", over)), "--dry-run"],
            "the study has 10,100 cells, more than the limit of 10,000")


def test_dry_run_of_a_large_grid_is_cheap(tmp_path, capsys):
    """Work bounded by Python function calls per cell: 1,430 before (10⁵ cells took 186 s and 470 MB for a
    dry run), 284 now."""
    grid = {"sigmas": [0.001 * (i + 1) for i in range(40)], "n_train": list(range(1, 51))}
    path = write_spec(tmp_path / "big.yaml", {"name": "big", "base": {**BASE, "networks": ["patchmlp"]},
                                              "grid": grid})
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        code = main(["study", str(path), "--dry-run"])
    finally:
        sys.setprofile(None)
    assert code == 0 and "2000 cells in 1 part(s)" in capsys.readouterr().out
    assert calls / 2000 < 500, f"{calls / 2000:.0f} Python calls per cell"


# --- item 11: figures checked against the study's columns when the spec is read ----------------------------

def spec_with(figure: dict | None = None, base: dict | None = None, figures: list | None = None) -> dict:
    return {"name": "fig", "base": {**BASE, **(base or {})}, "grid": {"sigmas": [0.1, 0.2]},
            "figures": figures if figures is not None else [{**LINE, **(figure or {})}]}


@pytest.mark.parametrize("figure, base, message", [
    ({"x": "sigmaa"}, None, "figures[0].x: 'sigmaa' is not a column of cells.parquet (did you mean 'sigma'?)"),
    ({"hue": ["network", "nosuch"]}, None, "figures[0].hue: 'nosuch' is not a column of cells.parquet"),
    ({"where": {"netwrk": "none"}}, None, "figures[0].where: 'netwrk' is not a column of cells.parquet"),
    ({"band": ["ess_interior_q25", "ess_interior_q7"]}, None, "figures[0].band: 'ess_interior_q7' is not a column"),
    ({"y": "ess_interior_median"}, {"stats": ["variance"]},
     "figures[0].y: the column 'ess_interior_median' holds no value in fig: it needs the statistic 'ess' (stats)"),
    ({"y": "psnr_net_lemmse"}, None, "figures[0].y: the column 'psnr_net_lemmse' holds no value in fig: it "
                                     "needs a network (networks)"),
    ({"x": "setting"}, None, "figures[0].x: the column 'setting' holds text; a line figure needs numbers"),
    ({"ylable": "dB"}, None, "figures[0].ylable is not a key of a line figure"),
    ({"caption": ["a", "b"]}, None, "figures[0].caption must be a string"),
    ({"where": {"network": [["none"]]}}, None, "figures[0].where.network must be a value or a list of values"),
    ({"logx": "yes"}, None, "figures[0].logx must be true or false"),
    ({"band": "ess_q25"}, None, "figures[0].band must be a list of two column names"),
])
def test_figure_columns_and_keys_are_checked_before_any_work(tmp_path, capsys, monkeypatch, figure, base, message):
    no_ray(monkeypatch)
    path = write_spec(tmp_path / "fig.yaml", spec_with(figure, base))
    out = tmp_path / "out"
    refused(capsys, ["study", str(path), "--dry-run"], message)
    refused(capsys, ["study", str(path), "--out", str(out)], message)
    assert not out.exists()


def test_figures_without_a_required_key_or_with_one_file_twice_are_refused(tmp_path, capsys, monkeypatch):
    no_ray(monkeypatch)
    bar = {"kind": "bar", "file": "b", "category": "setting", "value": "psnr_lemmse_x", "title": "t", "ylabel": "dB"}
    binned = {"kind": "binned", "file": "d", "title": "t", "where": {"split": "test"}}
    cases = [([{k: v for k, v in LINE.items() if k != "y"}], {}, "figures[0].y is required (a string) for a line"),
             ([bar], {}, "figures[0].hue is required (a column or a list of columns) for a bar"),
             ([LINE, {**LINE, "y": "psnr_z_x"}], {}, "figures[1].file 'psnr' is used twice in fig"),
             ([binned], {"stats": ["variance"]}, "figures[0]: a binned figure needs the statistic 'log_evidence'"),
             ([{**binned, "where": {"splt": "test"}}], {}, "figures[0].where: 'splt' is not a column of "
                                                           "density.parquet")]
    for figures, base, message in cases:
        path = write_spec(tmp_path / "fig.yaml", spec_with(base=base, figures=figures))
        refused(capsys, ["study", str(path), "--dry-run"], message)


def test_valid_figures_and_every_preset_pass(tmp_path, capsys):
    from lemmse_ray.studies.cli import load_study
    from lemmse_ray.studies.presets import PRESETS

    figures = [LINE, {"kind": "bar", "file": "b", "category": "setting", "value": "psnr_net_lemmse",
                      "hue": ["network", "split"], "title": "t", "ylabel": "dB", "where": {"network": ["patchmlp"]}},
               {"kind": "binned", "file": "d", "title": "t", "where": {"split": "test"}},
               {**LINE, "file": "ess", "y": "ess_interior_median", "band": ["ess_interior_q25", "ess_interior_q75"], "logy": True}]
    path = write_spec(tmp_path / "ok.yaml", spec_with(base={"networks": ["patchmlp"]}, figures=figures))
    assert main(["study", str(path), "--dry-run"]) == 0
    roots = [f"{d}=/data/{d}" for d in ("fashion-mnist", "cifar10", "ffhq32")]
    for name in PRESETS:
        assert load_study(name, "quick")[1] and load_study(name, "full", roots=roots)[1]


# --- item 1: storage_options and secrets ---------------------------------------------------------------------

def test_storage_options_from_set_are_refused(tmp_path, capsys, monkeypatch):
    no_ray(monkeypatch)
    out = tmp_path / "out"
    value = f"storage_options={{key: {SECRETS['key']}, secret: {SECRETS['secret']}}}"
    for extra in (["--dry-run"], []):
        err = refused(capsys, ["study", "concentration", "--set", value, "--out", str(out), *extra],
                      "--set storage_options: credentials are not taken from the command line",
                      "put storage_options in the base of a spec file")
        assert SECRETS["key"] not in err and SECRETS["secret"] not in err
    assert not out.exists()


def test_storage_options_of_the_spec_reach_the_study_io(tmp_path, capsys, monkeypatch):
    options = {"key": SECRETS["key"], "secret": SECRETS["secret"]}
    seen = {}

    def fake_run_study(name, parts, cells, out, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr("lemmse_ray.studies.cli.run_study", fake_run_study)
    path = write_spec(tmp_path / "s.yaml", {"name": "s", "base": {**BASE, "storage_options": options},
                                            "grid": {"sigmas": [0.1]}})
    assert main(["study", str(path), "--out", "s3://bucket/study", "--work", "s3://bucket/work"]) == 0
    assert seen["storage_options"] == options
    both = {"name": "two", "parts": [{"name": "a", "base": {**BASE, "storage_options": options}},
                                     {"name": "b", "base": {**BASE, "storage_options": {"anon": True}}}]}
    refused(capsys, ["study", str(write_spec(tmp_path / "two.yaml", both)), "--dry-run"],
            "storage_options: the parts of a study must share one storage_options")


def test_records_go_through_the_redaction(tmp_path):
    from lemmse_ray.storage.files import save_json, save_parquet, save_text
    from lemmse_ray.storage.redact import public

    url = f"s3://me:{SECRETS['url_password']}@bucket/data"
    record = {"storage_options": {"key": SECRETS["key"]}, "nested": [{"api_token": SECRETS["token"]}],
              "root": url, "bank_key": "0123456789abcdef", "network_key": "planted", "estimate_key": None}
    save_json(record, str(tmp_path / "r.json"))
    save_parquet([{"root": url, "aws_secret": SECRETS["secret"], "bank_key": "0123456789abcdef"}],
                 str(tmp_path / "t.parquet"))
    save_text(f"# report\nread from {url}\n", str(tmp_path / "r.md"))
    for path in tmp_path.iterdir():
        content = path.read_bytes()
        for value in SECRETS.values():
            assert value.encode() not in content, f"{value} written to {path.name}"
    kept = json.loads((tmp_path / "r.json").read_text())
    assert kept["bank_key"] == "0123456789abcdef" and kept["network_key"] == "planted"
    assert kept["estimate_key"] is None and "storage_options" not in kept
    assert pq.read_table(tmp_path / "t.parquet").to_pylist()[0]["bank_key"] == "0123456789abcdef"
    assert public({"bank_key": SECRETS["secret"]})["bank_key"] != SECRETS["secret"]  # not a work key: redacted


# --- item 7: lemmse report trusts nothing in the study folder ------------------------------------------------

def fake_study(folder: Path, parts: list[dict] | None = None, cells: list[dict] | None = None,
               density: list[dict] | None = None, history: list | None = None) -> Path:
    """A study folder written by hand (no Ray): one part, two cells (σ 0.1, 0.2), LE-MMSE rows only."""
    folder.mkdir(parents=True, exist_ok=True)
    part = {"name": "p", "description": "d", "base": BASE, "grid": {"sigmas": [[0.1], [0.2]]}, "zip": {},
            "figures": [LINE, {"kind": "binned", "file": "d", "title": "t", "where": {"split": "test"}}],
            "varying": ["sigma"]}
    record = {"name": "fake", "size": None, "work": str(folder / "work"), "parts": parts or [part]}
    (folder / "study.json").write_text(json.dumps(record))
    rows = cells if cells is not None else [
        {"part": "p", "cell": c, "sigma": s, "split": split, "network": "none", "problem": "denoising",
         "input": "direct", "patch_size": 5, "receptive_field": 5, "psnr_lemmse_x": 20.0 + c,
         "psnr_z_x": 10.0 + c, "below_floor": False}
        for c, s in enumerate((0.1, 0.2)) for split in ("train", "test")]
    pq.write_table(pa.Table.from_pylist(rows), folder / "cells.parquet")
    bins = density if density is not None else [
        {"part": "p", "cell": 0, "sigma": 0.1, "split": "test", "problem": "denoising", "input": "direct",
         "metric": "mse_lemmse_x", "network": "none", "bin": b, "lo": b / 10, "hi": (b + 1) / 10, "mean": 0.01 * (b + 1), "se": 0.001} for b in range(10)]
    pq.write_table(pa.Table.from_pylist(bins), folder / "density.parquet")
    if history is not None:
        (folder / "history.json").write_text(json.dumps(history))
    return folder


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_a_hand_written_study_folder_renders(tmp_path, capsys):
    """The baseline of the refusals below; a figure whose rows hold no value is named, not dropped silently."""
    part = {"name": "p", "description": "d", "base": BASE, "grid": {"sigmas": [[0.1], [0.2]]}, "zip": {},
            "figures": [LINE, {"kind": "binned", "file": "d", "title": "t", "where": {"setting": "denoising (direct)"}},
                        {**LINE, "file": "empty", "where": {"split": "validation"}}], "varying": ["sigma"]}
    out = fake_study(tmp_path / "s", parts=[part], history=[{"time": "t", "seconds": 1.0, "banks_built": 0}])
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "![PSNR](figures/p_psnr.png)" in text and "![t](figures/p_d.png)" in text
    assert "*Figure `p_empty.png` (PSNR) is not drawn: no row of this part selected by its `where` holds" in text
    assert (out / "figures" / "p_psnr.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["p_d.png", "p_psnr.png"]


@pytest.mark.parametrize("change, message", [
    ({"name": "../../escaped"}, "study.json: parts[0].name must be letters, digits, - and _, got '../../escaped'"),
    ({"figures": [{**LINE, "file": "../../escaped"}]}, "study.json: parts[0].figures[0].file must be letters"),
    ({"figures": [{**LINE, "y": "psnr_net_x"}]}, "cells.parquet has no column 'psnr_net_x' (parts[0].figures[0].y in "),
    ({"figures": [{**LINE, "x": "setting"}]}, "parts[0].figures[0].x: the column 'setting' holds text"),
    ({"figures": [LINE, {**LINE, "file": "log", "logy": True, "y": "psnr_z_x", "where": {"split": "none"}},
                  {**LINE, "file": "neg", "logx": True, "x": "psnr_lemmse_x", "y": "sigma"}]},
     "parts[0].figures[2] (neg): logx: column 'psnr_lemmse_x' has values ≤ 0"),
    ({"grid": {"sigmas": "x"}}, "study.json: parts[0].grid.sigmas must be a list of values"),
])
def test_report_refuses_a_tampered_study_json_before_writing(tmp_path, capsys, change, message):
    part = {"name": "p", "description": "d", "base": BASE, "grid": {"sigmas": [[0.1], [0.2]]}, "zip": {},
            "figures": [LINE], "varying": ["sigma"], **change}
    cells = None
    if "neg" in str(change):  # a table where the third figure cannot be drawn: log axis over values ≤ 0
        cells = [{"part": "p", "cell": 0, "sigma": 0.1, "split": "test", "network": "none", "problem": "denoising",
                  "input": "direct", "patch_size": 5, "psnr_lemmse_x": -1.0, "psnr_z_x": 1.0}]
    out = fake_study(tmp_path / "a" / "b" / "s", parts=[part], cells=cells)
    before = files_under(tmp_path)
    refused(capsys, ["report", str(out)], message)
    assert files_under(tmp_path) == before, "nothing may be written"


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "study.json").write_text("{not json"), "study.json is not valid JSON"),
    (lambda out: (out / "study.json").write_text("[" * 100000 + "]" * 100000), "study.json is not valid JSON "
                                                                              "(nested too deeply)"),
    (lambda out: (out / "study.json").write_bytes(b" " * (17 << 20)), "study.json is larger than the limit of "
                                                                      "16 MiB"),
    (lambda out: (out / "study.json").write_text('{"name": "x", "parts": {}}'), "study.json: parts must be a "
                                                                                "non-empty list"),
    (lambda out: (out / "history.json").write_text('["x"]'), "history.json must be a list of mappings with time"),
    (lambda out: (out / "cells.parquet").write_bytes(b"PAR1 not parquet"), "cells.parquet is not a Parquet file"),
    (lambda out: pq.write_table(pa.table({"part": ["p"], "cell": [0]}), out / "cells.parquet"),
     "cells.parquet has no column 'split'"),
    (lambda out: pq.write_table(pa.table({"part": ["p"], "cell": ["zero"], "split": ["test"], "network": ["none"],
                                          "problem": ["denoising"], "input": ["direct"], "sigma": [0.1],
                                          "patch_size": [5]}), out / "cells.parquet"),
     "cells.parquet: the column 'cell' must hold integers"),
    (lambda out: pq.write_table(pa.table({"part": ["p"]}), out / "density.parquet"),
     "density.parquet has no column 'metric'"),
    (lambda out: (out / "density.parquet").unlink(), "density.parquet is missing"),
])
def test_report_refuses_damaged_files_before_writing(tmp_path, capsys, damage, message):
    out = fake_study(tmp_path / "s")
    damage(out)
    before = files_under(tmp_path)
    refused(capsys, ["report", str(out)], message)
    assert files_under(tmp_path) == before


def test_report_refuses_a_table_of_a_million_rows_from_its_footer(tmp_path, baseline):
    """A small cells.parquet that decodes to a million rows (it grew to 4.8 GB) is refused from its footer."""
    out = fake_study(tmp_path / "s")
    n = 1_000_000
    table = pa.table({"part": pa.array(["p"] * n), "cell": pa.array([0] * n), "split": pa.array(["test"] * n),
                      "network": pa.array(["none"] * n), "problem": pa.array(["denoising"] * n),
                      "input": pa.array(["direct"] * n), "sigma": pa.array([0.1] * n), "patch_size": pa.array([5] * n)})
    pq.write_table(table, out / "cells.parquet")
    del table
    assert (out / "cells.parquet").stat().st_size < 1 << 20
    before = files_under(tmp_path)
    refused_cheaply(baseline, tmp_path, ["report", str(out)], "cells.parquet has 1,000,000 rows, more than the limit of")
    assert files_under(tmp_path) == before


# --- a real study: no secret in any file, predicted columns = written columns ---------------------------------

def test_a_real_study_writes_no_secret_and_the_columns_it_announced(tmp_path, capsys, ray_cluster):
    """The smallest real study (one cell, one network), with credentials in its spec and a password in two
    URLs: no file under --out or --work holds any of them; its tables have the columns the figures are
    checked against."""
    url = f"https://me:{SECRETS['url_password']}@host/notes"
    spec = {"name": "secret", "description": f"Notes at {url}.", "floor_images": 4, "references": True,
            "base": {"dataset": "digits", "n_train": 40, "n_queries": 2, "patch_size": 3, "batch_images": 2,
                     "networks": ["patchmlp"], "hidden": 8, "epochs": 1, "steps_per_epoch": 5, "batch_size": 8,
                     "storage_options": {"key": SECRETS["key"], "secret": SECRETS["secret"],
                                         "client_kwargs": {"aws_session_token": SECRETS["token"]}}},
            "grid": {"sigmas": [0.2]},
            "figures": [{**LINE, "caption": f"See {url}."}]}
    path = write_spec(tmp_path / "secret.yaml", spec)
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["study", str(path), "--out", str(out), "--work", str(work)]) == 0, capsys.readouterr().err
    files = [p for folder in (out, work) for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 20 and (out / "study.json").is_file() and (out / "report.md").is_file()
    for file in files:
        content = file.read_bytes()
        for value in SECRETS.values():
            assert value.encode() not in content, f"{value} written to {file}"
    from lemmse_ray.studies.cli import load_study
    from lemmse_ray.studies.spec import study_columns

    _, parts, cells = load_study(str(path))
    predicted = study_columns(parts, cells)
    for name in ("cells.parquet", "classes.parquet", "epochs.parquet", "density.parquet"):
        written = set(pq.read_schema(out / name).names) | {"setting", "data"}  # the report adds them
        assert written == predicted[name], (sorted(written - predicted[name]), sorted(predicted[name] - written))
    assert main(["report", str(out)]) == 0
