"""``target-sft train``: fine-tune a causal LM with a target method (the recipe of
:func:`targetsft.training.recipe.train`)."""

from __future__ import annotations

import argparse
import os

from targetsft.cli.arguments import add_config_arguments, config_or_none


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft train`` options to ``parser`` (then call :func:`run_train_from_args`)."""
    add_config_arguments(
        parser,
        "YAML config (see configs/); without it the defaults are used",
        "key=value overrides, e.g. loss.method=dft train.max_steps=50",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    return parser


def run_train_from_args(args: argparse.Namespace) -> int:
    """Train from parsed options; 0 on success, 2 on a configuration error."""
    cfg = config_or_none(args)
    if cfg is None:
        return 2
    from targetsft.training.config import check_inputs
    from targetsft.training.recipe import train

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
