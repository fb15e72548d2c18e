"""The ``lemmse`` command: the main job (``lemmse run``) and each of its steps.

Every command takes the same options (``lemmse run --help`` lists them) or a YAML file of them
(``--config``). It connects to the Ray cluster in RAY_ADDRESS (as under ``ray job submit``) or starts a
local Ray. Every step resumes: finished bank shards, estimate batches and networks are reused.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .cluster.errors import ClusterError
from .runs.config import Config, add_arguments, from_args, join
from .storage.ownership import claim_output_folder
from .studies.presets import SIZES
from .studies.report import render

DESCRIPTION = """\
Exact LE-MMSE estimates at cluster scale, and the networks that try to match them.
'lemmse COMMAND --help' lists the options of a command; 'lemmse run' runs the main job on the
embedded default data."""

COMMANDS = {
    "run": ("the main job: bank, estimates, networks, evaluation and report.md",
            ("bank", "estimate", "train", "evaluate")),
    "build-bank": ("build (or finish) the patch bank of the training set", ("bank",)),
    "verify-bank": ("check every shard of the bank against its checksums; --repair rebuilds the bad ones",
                    ("verify",)),
    "estimate": ("estimate train and test queries against the bank (built or finished first)", ("bank", "estimate")),
    "plan": ("print the estimate step's counts (bank rows, pairs, bytes, memory per actor) and its wall time "
             "predicted from a short calibration on the current cluster", ("plan",)),
    "scaling": ("strong and weak scaling of the estimate step on the current cluster: Parquet and a figure in "
                "<out>/scaling", ("scaling",)),
    "train": ("train the networks (one per name and σ) on Ray Train", ("train",)),
    "evaluate": ("evaluate the trained networks against the stored LE-MMSE estimates", ("evaluate",)),
    "study": ("run a study: a preset or a YAML spec of many cells sharing their work; tables, figures, report.md",
              ("study",)),
    "report": ("re-render report.md and figures of a study folder from its Parquet files (no computing)",
               ("report",)),
}
STUDY_EPILOG = """SPEC is a built-in preset (agreement, concentration, aware-vs-agnostic, dataset-size, patch-size, density,
paper) or a YAML file: base (configuration fields), grid (field: list of values, all combinations), zip
(fields varying together), figures; see README 'Studies'."""


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``lemmse: error: …``, exit 2)."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        self.exit(2, f"lemmse: error: {message} (see '{self.prog} --help')\n")


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = Parser(prog="lemmse", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser,
                                title="commands")
    for name, (help_text, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 epilog=STUDY_EPILOG if name == "study" else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("--verbose", action="store_true", help="show Ray's own log lines and library logs")
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
        if name == "scaling":
            command.add_argument("--max-actors", type=int, default=None, metavar="K",
                                 help="scale from 1 to K actors (default: one per GPU, else one per CPU)")
        if name == "verify-bank":
            command.add_argument("--repair", action="store_true",
                                 help="clear the done flag of the bad shards and rebuild them")
        if name == "study":
            add_study_arguments(command)
        elif name == "report":
            command.add_argument("out", metavar="OUT", help="a study folder (or URL)")
        else:
            add_arguments(command)
    args = parser.parse_args(argv)
    return args, (from_args(args) if args.command not in ("study", "report") else None)


def add_study_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("spec", metavar="SPEC", help="a preset name or a YAML spec file")
    command.add_argument("--size", choices=SIZES, default="quick",
                         help="preset size: quick (embedded data, minutes on 2 CPU cores) or full (the paper's "
                              "datasets, for a cluster); ignored for a YAML spec (default: quick)")
    command.add_argument("--out", metavar="URL", help="output folder or URL (default: results/study-<name>-<size> "
                                                      "for a preset, results/study-<name> for a file)")
    command.add_argument("--work", metavar="URL",
                         help="folder of the shared work (banks, estimates, networks; default: <out>/work); "
                              "studies given one --work reuse each other's finished work")
    command.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                         help="set a configuration field in every cell (YAML value; replaces it in the grid), "
                              "e.g. --set n_train=200; repeatable")
    command.add_argument("--root", action="append", default=[], metavar="DATASET=PATH",
                         help="folder of a dataset's files (fashion-mnist, cifar10, ffhq32, folder), for the "
                              "cells of that dataset; repeatable")
    command.add_argument("--dry-run", action="store_true", help="list the cells (validated), compute and write nothing")
    command.add_argument("--overwrite", action="store_true",
                         help="replace the tables and report of another study in --out (its work is kept)")


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args, cfg = parse(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        return run(args.command, cfg, args)
    except ValueError as err:
        if debug:
            raise
        print(f"lemmse: error: {err}", file=sys.stderr)
        return 2
    except ClusterError as err:  # e.g. a shard actor failed for good (a damaged shard): one line, exit 1
        if debug:
            raise
        import ray  # Ray: already loaded by the work that failed; lemmse report and --help run without it
        ray.shutdown()  # first, so that the calls it abandons are not reported after the error line
        print(f"lemmse: error: {err}", file=sys.stderr)
        return 1


def run(command: str, cfg: Config | None, args: argparse.Namespace) -> int:
    """Run the steps of ``command``; timings go to ``<out>/timings.json`` (kept from the run that computed)."""
    if command == "study":
        from .studies.cli import study_command  # Ray (the study engine): lemmse report runs without it
        return study_command(args)
    if command == "report":
        render(args.out)
        print(f"report: {join(args.out, 'report.md')}; figures: {join(args.out, 'figures')}", flush=True)
        return 0
    from .cluster.session import check_actor_count, ensure_ray  # Ray: lemmse report runs without it
    from .runs.evaluation import evaluate_all, summary_table  # Ray (via the pipeline): as above
    from .runs.pipeline import (bank_step, check_run, estimate_step, load_data, make_problem,  # Ray: as above
                                plan_step, record_timing, report_step, summarize, verify_step, write_report)
    from .runs.training import train_all, trained_networks, unfinished_networks  # Ray Train: as above
    from .studies.scaling import scaling_study  # Ray: as above

    steps = COMMANDS[command][1]
    t0 = time.perf_counter()
    train, queries = load_data(cfg)
    problem = make_problem(cfg, tuple(train.shape[1:]))
    check_run(cfg, train, problem)
    if set(steps) & {"bank", "estimate", "train", "verify", "plan", "scaling"}:
        ensure_ray(verbose=args.verbose)
    if set(steps) & {"estimate", "plan"} and cfg.n_actors is not None:
        check_actor_count(cfg.n_actors, "--n-actors")
    if "scaling" in steps and args.max_actors is not None:
        check_actor_count(args.max_actors, "--max-actors")
    claim_output_folder(cfg.out, cfg.storage_options)
    print(f"{cfg.dataset}: {train.shape[0]} training images of {tuple(train.shape[1:])}; problem {problem}",
          flush=True)
    tables: dict[str, str] = {}
    if "verify" in steps:
        return verify_step(cfg, train, problem, repair=args.repair)
    if "plan" in steps:
        print(plan_step(cfg, train, problem, queries).text(), flush=True)
        return 0
    if "scaling" in steps:
        scaling_study(cfg, train, problem, queries, args.max_actors)
        return 0
    if "bank" in steps:
        t = time.perf_counter()
        bank = bank_step(cfg, train, problem)
        record_timing(cfg, "bank", time.perf_counter() - t, bank.build_stats["shards_written"] > 0)
        print(f"bank {cfg.bank_url}: {bank.n_rows} rows in {bank.n_shards} shards "
              f"({bank.build_stats['shards_written']} written this run)", flush=True)
    if "estimate" in steps:
        t = time.perf_counter()
        plan = plan_step(cfg, train, problem, queries, calibrated=False)  # calibrated on the step's actors
        urls, done = estimate_step(cfg, bank, problem, queries, plan)
        if done.computed and plan.predicted_s is not None:
            tables["plan"] = (f"{plan.text()}\nmeasured: {done.seconds:.1f} s for {done.computed} batches "
                              f"(predicted {plan.predicted_s:.1f} s, measured/predicted "
                              f"{done.seconds / plan.predicted_s:.2f}); actors scanning "
                              f"{100 * done.busy_fraction:.0f} % of it, scanning or loading shards "
                              f"{100 * done.working_fraction:.0f} %")
            print(tables["plan"].splitlines()[-1], flush=True)
        psnr_rows = report_step(cfg, urls)
        record_timing(cfg, "estimate", time.perf_counter() - t, done.computed > 0)
        tables["estimate"] = summarize(psnr_rows)
        print(tables["estimate"], flush=True)
    if "train" in steps:
        t = time.perf_counter()
        pending = unfinished_networks(cfg)
        train_all(cfg, train, problem)
        record_timing(cfg, "train", time.perf_counter() - t, bool(pending))
    if "evaluate" in steps:
        t = time.perf_counter()
        eval_rows = evaluate_all(cfg, trained_networks(cfg))
        record_timing(cfg, "evaluate", time.perf_counter() - t, True)
        tables["evaluate"] = summary_table(eval_rows)
        print(tables["evaluate"], flush=True)
    total = time.perf_counter() - t0
    if command == "run":
        write_report(cfg, tables)
        print(f"report: {join(cfg.out, 'report.md')}; figures: {join(cfg.out, 'figures')} ({total:.0f} s)",
              flush=True)
    else:
        print(f"results in {cfg.out} ({total:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
