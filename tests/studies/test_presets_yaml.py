"""Study presets read from the package's YAML files: the same specs as the Python builders they replaced.

``fixtures/presets.json`` holds ``preset(name, size)`` for every preset and size as last reviewed (first
captured from the Python builders the YAML files replaced; rewritten when the quick presets moved from the
8×8 digits to the 28×28 gray photos), key order included, so a spec that changes by one value, one type
(``1`` against ``1.0``, a number read as a string) or one key's place fails here: change the fixture with
the preset, on purpose.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from lemmse_ray.studies import presets

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = json.loads((ROOT / "tests" / "fixtures" / "presets.json").read_text(encoding="utf-8"))


def test_names_and_sizes_are_those_of_the_builders():
    assert presets.PRESETS == tuple(EXPECTED)
    assert presets.PRESETS == ("agreement", "concentration", "aware-vs-agnostic", "dataset-size", "patch-size",
                               "density", "paper")
    assert presets.SIZES == ("quick", "full")
    assert all(tuple(sizes) == presets.SIZES for sizes in EXPECTED.values())


@pytest.mark.parametrize("size", ["quick", "full"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_preset_and_size_is_the_builders_spec(name, size):
    got = presets.preset(name, size)
    assert got == EXPECTED[name][size]
    # same types (an int stays an int, a float a float, None None) and the same key order
    assert json.dumps(got, ensure_ascii=False) == json.dumps(EXPECTED[name][size], ensure_ascii=False)


def test_each_call_returns_a_new_mapping():
    first = presets.preset("paper", "full")
    first["parts"][0]["base"]["sigmas"].append(9.0)
    first["parts"][0]["grid"]["dataset"].clear()
    first["parts"][1]["figures"][0]["where"]["network"] = "changed"
    assert presets.preset("paper", "full") == EXPECTED["paper"]["full"]
    assert presets.preset("agreement", "full") == EXPECTED["agreement"]["full"]


def test_unknown_names_and_sizes_are_refused():
    with pytest.raises(ValueError, match=r"^size must be one of quick, full, got 'medium'$"):
        presets.preset("agreement", "medium")
    with pytest.raises(ValueError, match=r"^SPEC: no preset 'sizes' \(presets: agreement, concentration, "
                                         r"aware-vs-agnostic, dataset-size, patch-size, density, paper\)"):
        presets.preset("sizes")


def test_files_are_found_beside_the_module_and_each_names_its_preset():
    assert presets.FOLDER == Path(presets.__file__).resolve().parent / "presets"
    files = sorted(p.stem for p in presets.FOLDER.glob("*.yaml"))
    assert files == sorted([*presets.PRESETS, "sizes"])
    for name in presets.PRESETS:
        raw = yaml.safe_load((presets.FOLDER / f"{name}.yaml").read_text(encoding="utf-8"))
        specs = [raw] if name == "paper" else [raw[size] for size in presets.SIZES]
        assert all(spec["name"] == name for spec in specs)


def test_a_new_file_is_a_new_preset_read_beside_the_module(tmp_path):
    shutil.copy(presets.__file__, tmp_path / "presets.py")
    shutil.copytree(presets.FOLDER, tmp_path / "presets")
    text = (tmp_path / "presets" / "density.yaml").read_text(encoding="utf-8")
    (tmp_path / "presets" / "extra.yaml").write_text(text.replace("name: density", "name: extra"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("presets_copy", tmp_path / "presets.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    assert loaded.FOLDER == tmp_path.resolve() / "presets"
    assert loaded.PRESETS == (*presets.PRESETS[:-1], "extra", "paper")
    assert loaded.preset("extra", "full") == {**EXPECTED["density"]["full"], "name": "extra"}
    assert loaded.preset("paper", "quick") == EXPECTED["paper"]["quick"]  # the paper keeps the parts it names


def test_a_file_that_asks_for_python_objects_is_refused(tmp_path, monkeypatch):
    (tmp_path / "evil.yaml").write_text("quick: !!python/object/apply:os.system ['touch " + str(tmp_path / "ran")
                                        + "']\n", encoding="utf-8")
    monkeypatch.setattr(presets, "FOLDER", tmp_path)
    presets.read_preset_file.cache_clear()
    try:
        with pytest.raises(yaml.constructor.ConstructorError):
            presets.read_preset_file("evil")
    finally:
        presets.read_preset_file.cache_clear()
    assert not (tmp_path / "ran").exists()


def test_the_yaml_files_ship_with_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "lemmse_ray" / "studies"
    patterns = package_data["lemmse_ray.studies"]
    for path in presets.FOLDER.glob("*.yaml"):
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
