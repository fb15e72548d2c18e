"""``lemmse study SPEC``: read and check a spec (preset or YAML), then run it (:mod:`lemmse_ray.studies.engine`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..runs.config import join
from .engine import run_study
from .presets import PRESETS, preset
from .spec import (
    Cell,
    Part,
    SpecError,
    apply_overrides,
    check_networks,
    expand,
    parse_roots,
    parse_set,
    parse_spec,
    read_spec_file,
)


def load_study(spec: str, size: str = "quick", overrides: list[str] | None = None,
               roots: list[str] | None = None) -> tuple[str, list[Part], list[Cell]]:
    """(name, parts, cells) of a preset name or YAML file, every cell validated and every network checked
    against its patch size; raises ValueError naming the bad field before any work."""
    if Path(spec).is_file():
        raw = read_spec_file(spec)
    elif spec in PRESETS:
        raw = preset(spec, size)
    else:
        raise SpecError(f"SPEC: {spec!r} is neither a file nor a preset ({', '.join(PRESETS)})")
    name, parts = parse_spec(raw)
    parts = apply_overrides(parts, parse_set(overrides or []))
    cells = expand(parts, roots=parse_roots(roots or []))
    check_networks(cells)
    return name, parts, cells


def describe(cells: list[Cell]) -> str:
    return "\n".join(f"{c.index:>4}  {c.label()}" for c in cells)


def study_command(args: argparse.Namespace) -> int:
    name, parts, cells = load_study(args.spec, args.size, args.set, args.root)
    size = args.size if args.spec in PRESETS else None
    out = args.out or join("results", f"study-{name}" + (f"-{size}" if size else ""))
    if args.dry_run:
        print(describe(cells))
        print(f"{len(cells)} cells in {len(parts)} part(s); outputs would go to {out}", flush=True)
        return 0
    run_study(name, parts, cells, out, work_dir=args.work, size=size, overwrite=args.overwrite,
              verbose=args.verbose)
    return 0
