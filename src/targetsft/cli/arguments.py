"""Pieces several commands share: the ``--engine`` of the commands that score given sequences, and a training
config read from ``--config`` and its overrides."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_scoring_engine_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--engine transformers|vllm`` for a command that scores given sequences: ``what`` is scored with the
    transformers model (default) or by vLLM's prompt log-probs."""
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help=f"score with the transformers {what} (default) or vLLM's prompt log-probs",
    )


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, overrides_help: str) -> None:
    """``--config`` (a training config YAML) and its positional ``key=value`` overrides."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("overrides", nargs="*", help=overrides_help)


def config_or_none(args: argparse.Namespace) -> Any:
    """The checked config of ``--config`` + overrides, or None after printing why not."""
    from targetsft.training.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None


def options_of(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The parsed options ``names`` as keyword arguments of the library call a command makes."""
    return {name: getattr(args, name) for name in names}
