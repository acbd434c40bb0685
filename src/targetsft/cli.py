"""The ``target-sft`` command line."""

from __future__ import annotations

import argparse
import sys

from targetsft import __version__
from targetsft.methods import METHODS


def _methods(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list(METHODS)
    for name in names:
        if name not in METHODS:
            print(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}", file=sys.stderr)
            return 2
    print("\n\n".join(METHODS[n].doc for n in names))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from targetsft.demo import main as demo_main

    return demo_main()


def _train(args: argparse.Namespace) -> int:
    from targetsft.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from targetsft.trainer import train

    summary = train(cfg, resume=args.resume)
    print(f"final model: {summary['final_model']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="target-sft",
        description="Fine-tune language models with designed target distributions Q = γ·onehot(y) + (1 − γ)·π̃.",
    )
    parser.add_argument("--version", action="version", version=f"targetsft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("methods", help="list the registered methods with γ, π̃ and their parameters")
    p.add_argument("name", nargs="?", help="show one method only")
    p.set_defaults(func=_methods)
    p = sub.add_parser("train", help="fine-tune a causal LM with a target method (transformers.Trainer)")
    p.add_argument("--config", help="YAML config (see configs/); without it the defaults are used")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.method=dft train.max_steps=50")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(func=_train)
    p = sub.add_parser("demo", help="run every method on a synthetic batch and check ∂loss/∂z = w·(p − Q)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
