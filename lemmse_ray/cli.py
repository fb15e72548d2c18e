"""The ``lemmse`` command: ``lemmse run`` (the main job), ``lemmse build-bank``, ``lemmse estimate``.

Each subcommand takes the same flags (``--help`` lists them) or a YAML ``--config``; they connect to the
Ray cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local Ray.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .config import Config, add_arguments, from_args
from .distributed import ensure_ray
from .pipeline import bank_step, estimate_step, load_data, make_problem, report_step, summarize

COMMANDS = {
    "run": "the main job: build the bank, estimate train and test queries, write figures and a PSNR table",
    "build-bank": "build (or finish) the patch bank of the training set",
    "estimate": "estimate train and test queries against an existing bank",
}


def parse(argv: list[str] | None) -> tuple[str, Config]:
    parser = argparse.ArgumentParser(prog="lemmse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return args.command, from_args(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command, cfg = parse(argv)
    t0 = time.perf_counter()
    train, queries = load_data(cfg)
    problem = make_problem(cfg, tuple(train.shape[1:]))
    print(f"{cfg.dataset}: {train.shape[0]} training images of {tuple(train.shape[1:])}; problem {problem}",
          flush=True)
    ensure_ray()
    bank = bank_step(cfg, train, problem)
    print(f"bank {cfg.bank_url}: {bank.n_rows} rows in {bank.n_shards} shards "
          f"({bank.build_stats['rows_per_s']:.0f} rows/s this run)", flush=True)
    if command == "build-bank":
        return 0
    urls = estimate_step(cfg, bank, problem, queries)
    rows = report_step(cfg, urls)
    print(summarize(rows))
    print(f"results in {cfg.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
