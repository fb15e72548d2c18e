"""The ``lemmse`` command: ``lemmse run`` (the main job) and its steps as separate commands.

``run``: build the patch bank → estimate train and test queries (Ray actors) → train the networks (Ray Train)
→ evaluate them against the LE-MMSE on the same inputs → ``report.md``.  Each command takes the same flags
(``lemmse run --help`` lists them) or a YAML ``--config``; it connects to the Ray cluster in ``RAY_ADDRESS``
(as under ``ray job submit``) or starts a local Ray.  Every step is resumable: finished bank shards,
estimate batches and networks are reused.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .config import Config, add_arguments, from_args
from .distributed import ensure_ray
from .pipeline import bank_step, estimate_step, load_data, make_problem, report_step, summarize, write_report

COMMANDS = {
    "run": ("the main job: bank, estimates, networks, evaluation and report.md",
            ("bank", "estimate", "train", "evaluate")),
    "build-bank": ("build (or finish) the patch bank of the training set", ("bank",)),
    "estimate": ("estimate train and test queries against the bank (built or finished first)", ("bank", "estimate")),
    "train": ("train the networks (one per name and σ) on Ray Train", ("train",)),
    "evaluate": ("evaluate the trained networks against the stored LE-MMSE estimates", ("evaluate",)),
}


def parse(argv: list[str] | None) -> tuple[str, Config]:
    parser = argparse.ArgumentParser(prog="lemmse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return args.command, from_args(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command, cfg = parse(argv)
    steps = COMMANDS[command][1]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    train, queries = load_data(cfg)
    problem = make_problem(cfg, tuple(train.shape[1:]))
    print(f"{cfg.dataset}: {train.shape[0]} training images of {tuple(train.shape[1:])}; problem {problem}",
          flush=True)
    if set(steps) & {"bank", "estimate", "train"}:
        ensure_ray()
    tables: dict[str, str] = {}
    if "bank" in steps:
        t = time.perf_counter()
        bank = bank_step(cfg, train, problem)
        seconds["bank"] = time.perf_counter() - t
        print(f"bank {cfg.bank_url}: {bank.n_rows} rows in {bank.n_shards} shards "
              f"({bank.build_stats['rows_per_s']:.0f} rows/s this run)", flush=True)
    if "estimate" in steps:
        t = time.perf_counter()
        urls = estimate_step(cfg, bank, problem, queries)
        psnr_rows = report_step(cfg, urls)
        seconds["estimate"] = time.perf_counter() - t
        tables["estimate"] = summarize(psnr_rows)
        print(tables["estimate"], flush=True)
    if "train" in steps:
        from .training import train_all
        t = time.perf_counter()
        train_all(cfg, train, problem)
        seconds["train"] = time.perf_counter() - t
    if "evaluate" in steps:
        from .evaluation import evaluate_all, summary_table
        from .training import trained_networks
        t = time.perf_counter()
        eval_rows = evaluate_all(cfg, trained_networks(cfg))
        seconds["evaluate"] = time.perf_counter() - t
        tables["evaluate"] = summary_table(eval_rows)
        print(tables["evaluate"], flush=True)
    seconds["total"] = time.perf_counter() - t0
    if command == "run":
        write_report(cfg, tables, seconds)
    print(f"results in {cfg.out} ({seconds['total']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
