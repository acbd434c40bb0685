"""``target-sft experiment``: its options and the command itself (run a grid, ``--dry-run`` its plan,
``--aggregate-only``, ``--reproduce``, ``--rescore``, ``--compact-records``).

The tables and plots go to the experiment's ``output_dir``; ``--update-results`` writes them to its committed
``results_dir`` instead (:func:`~targetsft.experiments.grid.tables_dir`): ``--aggregate-only --update-results``
refreshes the committed tables from the records; ``--reproduce RUN_ID`` reruns one finished run and compares it
with its record (:mod:`~targetsft.experiments.reproduce`); ``--rescore PATTERN`` scores finished runs' recorded
outputs again, without a model; ``--compact-records`` stores the records' evaluation items gzip-compressed
(:func:`~targetsft.experiments.records.compact_records`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from targetsft.experiments.grid import Experiment, ExperimentError, expand_grid, load_experiment, tables_dir
from targetsft.experiments.report import aggregate
from targetsft.experiments.runner import run_experiments
from targetsft.experiments.status import format_plan, select_runs
from targetsft.training.config import ConfigError


def add_experiment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft experiment`` options to ``parser`` (then call :func:`run_experiment_from_args`)."""
    parser.add_argument(
        "--config",
        required=True,
        action="append",
        help="experiment YAML (see experiments/); repeat it to run several together, run-major (a shared run is "
        "trained once and evaluated for all of them while its model is at hand)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    parser.add_argument("--only", metavar="PATTERN", help="run only the runs whose id matches (glob or substring)")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="write the tables and plots to the experiment's committed results_dir instead of its output_dir "
        "(with --aggregate-only: refresh the committed tables from the records)",
    )
    parser.add_argument(
        "--reproduce",
        metavar="RUN_ID",
        help="train and evaluate this finished run again in <output_dir>/reproduce/ and compare the new record with "
        "the committed one (exit status 1 if an eval metric differs by more than --tolerance); nothing else runs",
    )
    parser.add_argument(
        "--rescore",
        metavar="PATTERN",
        help="score the recorded outputs of the finished runs whose id matches (glob or substring; '*': all) again, "
        "without a model, and compare them with their records (exit status 1 if a metric differs by more than "
        "--tolerance); nothing else runs",
    )
    parser.add_argument(
        "--compact-records",
        action="store_true",
        help="store the evaluation items of the experiment's records gzip-compressed (<items>.gz, the same bytes "
        "for the same content); nothing else runs",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="with --reproduce or --rescore: the largest accepted |recorded - rerun| of an eval metric (default 0: "
        "exactly)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no per-batch progress bars")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def run_experiment_from_args(args: argparse.Namespace) -> int:
    """Run ``target-sft experiment`` from parsed options; 0 on success, 2 on a configuration error."""
    from targetsft.data.sft import check_source
    from targetsft.runtime.inputs import check_model

    try:
        exps = [load_experiment(path) for path in args.config]
        update = getattr(args, "update_results", False)
        for exp in exps:  # before anything runs: --update-results needs every experiment's results_dir
            tables_dir(exp, update)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"target-sft experiment: config error: {err}", file=sys.stderr)
        return 2
    no_training = args.aggregate_only or getattr(args, "rescore", None) or getattr(args, "compact_records", False)
    if not no_training:  # the models and the training data of what will run
        checked = set()
        for run in (r for exp in exps for r in expand_grid(exp) if not r.is_baseline):
            model, data = run.config.get("model"), run.config.get("data") or {}
            key = json.dumps([model, data], default=str)
            if key not in checked:  # an InputError: one line and status 2 from the console script
                check_model(model)
                check_source(data.get("train", "gsm-train"), data.get("size"), data.get("seed"))
                checked.add(key)
    if args.dry_run:
        print("\n".join(format_plan(exp, select_runs(expand_grid(exp), args.only), update) for exp in exps))
        return 0
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "reproduce", None):
        return _reproduce(exps, args)
    if getattr(args, "rescore", None):
        return _rescore(exps, args)
    if getattr(args, "compact_records", False):
        return _compact(exps)
    if not args.aggregate_only:
        try:
            run_experiments(exps, only=args.only, progress=args.progress)
        except ExperimentError as err:
            print(f"target-sft experiment: {err}", file=sys.stderr)
            return 1
    for exp in exps:
        result = aggregate(exp, update_results=update)
        print(Path(result["paths"]["results.md"]).read_text())
        print(f"target-sft experiment: {exp.name}: tables and plots in {tables_dir(exp, update)}", file=sys.stderr)
    return 0


def _reproduce(exps: Sequence[Experiment], args: argparse.Namespace) -> int:
    """``--reproduce RUN_ID``: 0 when every eval metric of the rerun is within ``--tolerance`` of the record."""
    from targetsft.experiments.reproduce import format_comparison, largest_metric_gap, reproduce_run

    if len(exps) != 1 or args.aggregate_only or args.only:
        message = "--reproduce takes one --config, without --only or --aggregate-only"
        print(f"target-sft experiment: {message}", file=sys.stderr)
        return 2
    try:
        comparison = reproduce_run(exps[0], args.reproduce, progress=args.progress)
    except ExperimentError as err:
        print(f"target-sft experiment: {err}", file=sys.stderr)
        return 1
    print(format_comparison(comparison))
    gap = largest_metric_gap(comparison)
    return 0 if gap <= args.tolerance else 1


def _rescore(exps: Sequence[Experiment], args: argparse.Namespace) -> int:
    """``--rescore PATTERN``: 0 when every metric of every matching run scores again within ``--tolerance`` of its
    record."""
    from targetsft.experiments.reproduce import format_rescore, largest_rescore_gap, rescore_runs

    if args.aggregate_only or args.only:
        print("target-sft experiment: --rescore takes no --only or --aggregate-only", file=sys.stderr)
        return 2
    gap = 0.0
    for exp in exps:
        try:
            comparisons = rescore_runs(exp, args.rescore)
        except ExperimentError as err:
            print(f"target-sft experiment: {err}", file=sys.stderr)
            return 1
        for comparison in comparisons:
            print(format_rescore(comparison))
            gap = max(gap, largest_rescore_gap(comparison))
    return 0 if gap <= args.tolerance else 1


def _compact(exps: Sequence[Experiment]) -> int:
    """``--compact-records``: every plain items file of the experiments' records stored as ``.gz``."""
    from targetsft.experiments.records import compact_records

    for exp in exps:
        written = compact_records(exp)
        print(f"target-sft experiment: {exp.name}: {len(written)} items file(s) compressed", file=sys.stderr)
    return 0
