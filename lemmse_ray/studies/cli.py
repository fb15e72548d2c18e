"""``lemmse study SPEC``: read and check a spec (preset or YAML), then run it (:mod:`lemmse_ray.studies.engine`).

Every check of :mod:`lemmse_ray.studies.spec` runs here before anything is computed or written, ``--dry-run``
or not.  A spec's ``storage_options`` (its base; never ``--set``) are the study's own: they reach every read
and write of the study (``--out``, ``--work``, the banks, estimates and networks), and no record keeps them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..runs.config import join
from ..storage.redact import public
from .engine import run_study
from .presets import PRESETS, preset
from .spec import (
    Cell,
    Part,
    SpecError,
    apply_overrides,
    check_figures,
    check_networks,
    expand,
    parse_roots,
    parse_set,
    parse_spec,
    read_spec_file,
)


def load_study(spec: str, size: str = "quick", overrides: list[str] | None = None,
               roots: list[str] | None = None) -> tuple[str, list[Part], list[Cell]]:
    """(name, parts, cells) of a preset name or YAML file, every cell validated, every network checked
    against its patch size and every figure against the columns the study will write; raises ValueError
    naming the bad field before any work."""
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
    check_figures(parts, cells)
    storage_options(cells)
    return name, parts, cells


def storage_options(cells: list[Cell]) -> dict | None:
    """The ``storage_options`` of a study: one set for all its cells (a study reads and writes one ``--out``
    and one ``--work``), else ``SpecError``."""
    options = [c.cfg.storage_options for c in cells]
    if any(o != options[0] for o in options):
        raise SpecError("storage_options: the parts of a study must share one storage_options (set it in the "
                        "spec's top-level base)")
    return options[0] if options else None


def describe(cells: list[Cell]) -> str:
    return "\n".join(f"{c.index:>4}  {c.label()}" for c in cells)


def study_command(args: argparse.Namespace) -> int:
    name, parts, cells = load_study(args.spec, args.size, args.set, args.root)
    size = args.size if args.spec in PRESETS else None
    out = args.out or join("results", f"study-{name}" + (f"-{size}" if size else ""))
    if args.dry_run:
        print(describe(cells))
        print(f"{len(cells)} cells in {len(parts)} part(s); outputs would go to {public(out)}", flush=True)
        return 0
    run_study(name, parts, cells, out, work_dir=args.work, size=size, overwrite=args.overwrite,
              storage_options=storage_options(cells), verbose=args.verbose)
    return 0
