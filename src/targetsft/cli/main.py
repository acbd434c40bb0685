"""The ``target-sft`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from targetsft import __version__
from targetsft.losses.methods import METHODS
from targetsft.runtime.distributed import end_process_group, exit_distributed
from targetsft.runtime.inputs import add_scoring_engine_argument
from targetsft.runtime.precision import PRECISIONS


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


def _config(args: argparse.Namespace):
    """The checked config of ``--config`` + overrides, or None after printing why not."""
    from targetsft.training.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from targetsft.training.config import check_inputs
    from targetsft.training.trainer import train

    check_inputs(cfg)
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        from targetsft.runtime.inputs import InputError

        out = cfg.output_dir
        if not os.path.isdir(out) or get_last_checkpoint(out) is None:
            raise InputError(f"--resume: no checkpoint-N folder in output_dir {out!r} to continue from")
    summary = train(cfg, resume=args.resume)
    print(f"final model: {summary['final_model']}")
    return 0


def _cache_teacher(args: argparse.Namespace) -> int:
    from targetsft.runtime.inputs import check_model
    from targetsft.training.config import check_inputs
    from targetsft.training.teacher_cache import cache_teacher

    cfg = _config(args)
    if cfg is None:
        return 2
    teacher = args.teacher or cfg.teacher.model
    out = args.out or cfg.teacher.cache
    if not teacher or not out:
        print("cache-teacher needs --teacher (or teacher.model) and --out (or teacher.cache)", file=sys.stderr)
        return 2
    from targetsft.runtime.inputs import InputError

    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--shard-examples", args.shard_examples)):
        if value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if not args.temperature > 0:
        raise InputError(f"--temperature must be positive, got {args.temperature}")
    check_inputs(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=None)))
    check_model(teacher, "teacher")
    path = cache_teacher(
        cfg,
        out,
        teacher=teacher,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        shard_examples=args.shard_examples,
        device=args.device,
        overwrite=args.overwrite,
        precision=args.precision,
        engine=args.engine,
    )
    print(f"teacher cache: {path}")
    return 0


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
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an input error"
    )
    parser = argparse.ArgumentParser(
        prog="target-sft",
        parents=[debug],
        description="Fine-tune language models with designed target distributions Q = γ·onehot(y) + (1 − γ)·π̃.",
    )
    parser.add_argument("--version", action="version", version=f"targetsft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:  # --debug before or after the command
        return sub.add_parser(name, parents=[debug], **kwargs)

    p = command("methods", help="list the registered methods with γ, π̃ and their parameters")
    p.add_argument("name", nargs="?", help="show one method only")
    p.set_defaults(func=_methods)
    p = command("train", help="fine-tune a causal LM with a target method (transformers.Trainer)")
    p.add_argument("--config", help="YAML config (see configs/); without it the defaults are used")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.method=dft train.max_steps=50")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(func=_train)
    p = command(
        "cache-teacher",
        help="store a teacher's top-k log-probs for every supervised token of the training data (resumable)",
    )
    p.add_argument("--config", help="the training config whose data section defines the examples")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--teacher", help="teacher model path or hub id (default: teacher.model of the config)")
    p.add_argument("--out", help="cache folder (default: teacher.cache of the config)")
    p.add_argument("--k", type=int, default=64, help="tokens kept per position (default 64: 384 bytes per token)")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher softmax temperature baked into the cache")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-examples", type=int, default=256, help="examples per shard (the unit of resume)")
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built for something else")
    p.add_argument("--precision", choices=PRECISIONS, help="teacher autocast (default: the config's, auto)")
    add_scoring_engine_argument(p, "teacher (vLLM: temperature 1 only)")
    p.set_defaults(func=_cache_teacher)
    from targetsft.evaluation.suite import add_eval_arguments, run_eval_from_args

    p = command("eval", help="evaluate a model: GSM-style generation (Average@k, pass@k, greedy) and MC sets")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_from_args)
    from targetsft.experiments.command import add_experiment_arguments, run_experiment_from_args

    p = command("experiment", help="run a resumable grid of train + eval runs and aggregate the results")
    add_experiment_arguments(p)
    p.set_defaults(func=run_experiment_from_args)
    from targetsft.experiments.induced_targets import add_induced_targets_arguments, run_induced_targets_from_args

    p = command(
        "induced-targets", help="the targets Q = p − ∂ℓ/∂z that several losses induce on the same training tokens"
    )
    add_induced_targets_arguments(p)
    p.set_defaults(func=run_induced_targets_from_args)
    from targetsft.experiments.noise_fit import add_noise_fit_arguments, run_noise_fit_from_args

    p = command(
        "noise-fit", help="how much runs trained with label noise prefer the wrong answers they saw to the true ones"
    )
    add_noise_fit_arguments(p)
    p.set_defaults(func=run_noise_fit_from_args)
    from targetsft.prep.critical_tokens import add_mark_critical_arguments, run_mark_critical_from_args
    from targetsft.prep.importance_weights import (
        add_importance_weights_arguments,
        run_importance_weights_from_args,
    )

    p = command("importance-weights", help="iw-SFT's trajectory weights q(τ)/π_ref(τ) for loss.method=weighted")
    add_importance_weights_arguments(p)
    p.set_defaults(func=run_importance_weights_from_args)

    p = command(
        "mark-critical",
        help="mark the critical tokens of GSM solutions by counterfactual rollouts (CFT), for loss.method=critical",
    )
    add_mark_critical_arguments(p)
    p.set_defaults(func=run_mark_critical_from_args)
    p = command(
        "quickstart",
        help="the main job: fine-tune the embedded SmolLM2 with sft and target_sft, score both and the base model",
    )
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=16, help="training steps of batch 8 per method")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--label-noise", type=float, default=0.2, help="fraction of training answers made wrong")
    p.add_argument("--probe-size", type=int, default=50, help="reference solutions scored per probe set")
    p.set_defaults(func=_quickstart)
    p = command("demo", help="run every method on a synthetic batch and check ∂loss/∂z = w·(p − Q)")
    p.set_defaults(func=_demo)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the user's input is wrong (printed as one line, exit status 2)."""
    from targetsft.runtime.inputs import InputError
    from targetsft.training.config import ConfigError
    from targetsft.training.teacher_cache import TeacherCacheError

    return (ConfigError, InputError, TeacherCacheError, FileNotFoundError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    """Run ``target-sft ARGV``; returns the exit code (2 for bad input, named in one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
