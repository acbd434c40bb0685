"""The ``target-sft`` command line: the parser (each command's options from its module: ``train``,
``cache_teacher``, ``serve_teacher``, ``eval``, ``experiment``, ``tools``), the dispatch and the exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from targetsft import __version__
from targetsft.cli.logs import configure_logging
from targetsft.losses.methods import METHODS
from targetsft.runtime.distributed import end_process_group, exit_distributed


def _add_methods_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one method only")


def _methods(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list(METHODS)
    for name in names:
        if name not in METHODS:
            print(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}", file=sys.stderr)
            return 2
    print("\n\n".join(METHODS[n].doc for n in names))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from targetsft.cli.demo import main as demo_main

    return demo_main()


def _add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=16, help="training steps of batch 8 per method")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--label-noise", type=float, default=0.2, help="fraction of training answers made wrong")
    p.add_argument("--probe-size", type=int, default=50, help="reference solutions scored per probe set")


def _quickstart(args: argparse.Namespace) -> int:
    from targetsft.cli.quickstart import run_quickstart

    run_quickstart(
        args.out,
        steps=args.steps,
        learning_rate=args.learning_rate,
        label_noise=args.label_noise,
        probe_size=args.probe_size,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``target-sft`` parser: one subcommand each, its options added by its module under ``targetsft.cli``; one
    readable sequence, a ``command(...)`` per subcommand."""
    from targetsft.cli import cache_teacher, experiment, serve_teacher, tools, train
    from targetsft.cli import eval as eval_command

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an input error"
    )
    loudness = debug.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="show warnings and errors only"
    )
    loudness.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show debug lines too"
    )
    parser = argparse.ArgumentParser(
        prog="target-sft",
        parents=[debug],
        description="Fine-tune language models with designed target distributions Q = γ·onehot(y) + (1 − γ)·π̃.",
    )
    parser.add_argument("--version", action="version", version=f"targetsft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, add: Callable[[argparse.ArgumentParser], Any] | None, run: Callable[[argparse.Namespace], int], **kw
    ) -> None:  # --debug before or after the command
        p = sub.add_parser(name, parents=[debug], **kw)
        if add is not None:
            add(p)
        p.set_defaults(func=run)

    command(
        "methods", _add_methods_arguments, _methods, help="list the registered methods with γ, π̃ and their parameters"
    )
    command(
        "train",
        train.add_train_arguments,
        train.run_train_from_args,
        help="fine-tune a causal LM with a target method (transformers.Trainer)",
    )
    command(
        "cache-teacher",
        cache_teacher.add_cache_teacher_arguments,
        cache_teacher.run_cache_teacher_from_args,
        help="store a teacher's top-k log-probs for every supervised token of the training data (resumable)",
    )
    command(
        "serve-teacher",
        serve_teacher.add_serve_teacher_arguments,
        serve_teacher.run_serve_teacher_from_args,
        help="start a vLLM server for the config's teacher.server (the model, its address, top-k log-probs)",
    )
    command(
        "eval",
        eval_command.add_eval_arguments,
        eval_command.run_eval_from_args,
        help="evaluate a model: GSM-style generation (Average@k, pass@k, greedy) and MC sets",
    )
    command(
        "experiment",
        experiment.add_experiment_arguments,
        experiment.run_experiment_from_args,
        help="run a resumable grid of train + eval runs and aggregate the results",
    )
    command(
        "induced-targets",
        tools.add_induced_targets_arguments,
        tools.run_induced_targets_from_args,
        help="the targets Q = p − ∂ℓ/∂z that several losses induce on the same training tokens",
    )
    command(
        "noise-fit",
        tools.add_noise_fit_arguments,
        tools.run_noise_fit_from_args,
        help="how much runs trained with label noise prefer the wrong answers they saw to the true ones",
    )
    command(
        "importance-weights",
        tools.add_importance_weights_arguments,
        tools.run_importance_weights_from_args,
        help="iw-SFT's trajectory weights q(τ)/π_ref(τ) for loss.method=weighted",
    )
    command(
        "mark-critical",
        tools.add_mark_critical_arguments,
        tools.run_mark_critical_from_args,
        help="mark the critical tokens of GSM solutions by counterfactual rollouts (CFT), for loss.method=critical",
    )
    command(
        "quickstart",
        _add_quickstart_arguments,
        _quickstart,
        help="the main job: fine-tune the embedded SmolLM2 with sft and target_sft, score both and the base model",
    )
    command("demo", None, _demo, help="run every method on a synthetic batch and check ∂loss/∂z = w·(p − Q)")
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the user's input is wrong (printed as one line, exit status 2)."""
    from targetsft.runtime.inputs import InputError
    from targetsft.training.config import ConfigError
    from targetsft.training.served_teacher import TeacherServerError
    from targetsft.training.teacher_cache import TeacherCacheError

    return (ConfigError, InputError, TeacherCacheError, TeacherServerError, FileNotFoundError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    """Run ``target-sft ARGV``; returns the exit code (2 for bad input, named in one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(-1 if getattr(args, "quiet", False) else 1 if getattr(args, "verbose", False) else 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except _input_errors() as err:
        if getattr(args, "debug", False):
            raise
        print(f"target-sft {args.command}: error: {err} (--debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        end_process_group()


def console() -> None:
    """The ``target-sft`` console script and ``python -m targetsft.cli``: :func:`main`'s code as the exit status. A
    command run on several processes ends through :func:`~targetsft.runtime.distributed.exit_distributed`, so that
    a finished run exits with its own code, not with an abort of the interpreter's teardown."""
    code = main()
    exit_distributed(code)
    raise SystemExit(code)
