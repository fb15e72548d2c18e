"""Built-in study presets: the experiments of the paper, each at two sizes, read from the YAML files of
``presets/`` beside this module.

* ``quick`` -- 28×28 grayscale tiles of the embedded photographs (``photos``, ``size: 28``, ``grayscale``),
  small banks, few query images and short training, sized for a 2-core CPU machine (the README gives the
  estimated times and shows the figures);
* ``full`` -- the paper's datasets (Fashion-MNIST, CIFAR-10, FFHQ-32: ``--root NAME=PATH`` tells where each
  one's files are), full training sets and longer training, for a cluster.

``presets/<name>.yaml`` holds the spec of preset ``name`` (:mod:`lemmse_ray.studies.spec`) at each size, under
``quick`` and ``full`` (YAML anchors and merge keys share what the sizes have in common);
``presets/sizes.yaml`` the base configuration of every preset at each size, under the preset's own ``base``;
``presets/paper.yaml`` the preset ``paper``, whose parts are the presets it names, in its order.  A new preset
is one more file.  Each part declares its key figures (:mod:`lemmse_ray.studies.report`).  The files are data:
they are read with ``yaml.safe_load``, which builds plain mappings, lists and scalars and never runs code.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

FOLDER = Path(__file__).resolve().parent / "presets"


@lru_cache(maxsize=None)
def read_preset_file(name: str) -> dict[str, Any]:
    """The mapping of ``presets/<name>.yaml`` (read once; callers copy before changing it)."""
    with open(FOLDER / f"{name}.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


SIZES = tuple(read_preset_file("sizes"))
PAPER = tuple(read_preset_file("paper")["parts"])
#: the paper's parts in its order, then any other preset file by name, then ``paper``
PRESETS = (*PAPER, *sorted({p.stem for p in FOLDER.glob("*.yaml")} - {*PAPER, "paper", "sizes"}), "paper")


def preset(name: str, size: str = "quick") -> dict:
    """The spec mapping of preset ``name`` at ``size`` (``quick`` or ``full``): a new mapping on every call."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if name not in PRESETS:
        raise ValueError(f"SPEC: no preset {name!r} (presets: {', '.join(PRESETS)}) and no such file")
    if name != "paper":
        return copy.deepcopy(preset_part(name, size))
    paper = read_preset_file("paper")
    return copy.deepcopy({"name": paper["name"], "description": paper["description"],
                          "parts": [preset_part(p, size) for p in PAPER]})


def preset_part(name: str, size: str) -> dict:
    """Preset ``name`` at ``size`` with the size's base under its own (shares objects with the files read)."""
    spec = read_preset_file(name)[size]
    return {**spec, "base": {**read_preset_file("sizes")[size], **spec["base"]}}
