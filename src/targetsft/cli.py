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
