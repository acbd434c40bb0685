"""``target-sft cache-teacher``: store a teacher's top-k log-probs for every supervised token of a training
config's data (:func:`targetsft.training.teacher_cache.cache_teacher`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from targetsft.cli.arguments import add_config_arguments, add_scoring_engine_argument, config_or_none, options_of
from targetsft.runtime.precision import PRECISIONS


def add_cache_teacher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft cache-teacher`` options to ``parser`` (then call :func:`run_cache_teacher_from_args`)."""
    add_config_arguments(
        parser, "the training config whose data section defines the examples", "key=value overrides of the config"
    )
    parser.add_argument(
        "--teacher",
        help="teacher model path or hub id (default: teacher.model of the config; or, with teacher.server, the rows "
        "are read from that server)",
    )
    parser.add_argument("--out", help="cache folder (default: teacher.cache of the config)")
    parser.add_argument("--k", type=int, default=64, help="tokens kept per position (default 64: 384 bytes per token)")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="teacher softmax temperature baked into the cache"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-examples", type=int, default=256, help="examples per shard (the unit of resume)")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache built for something else")
    parser.add_argument("--precision", choices=PRECISIONS, help="teacher autocast (default: the config's, auto)")
    add_scoring_engine_argument(parser, "teacher (vLLM: temperature 1 only)")
    return parser


def run_cache_teacher_from_args(args: argparse.Namespace) -> int:
    """Build the cache from parsed options; 0 on success, 2 on a configuration error."""
    from targetsft.runtime.inputs import check_model
    from targetsft.training.config import check_inputs
    from targetsft.training.teacher_cache import cache_teacher

    cfg = config_or_none(args)
    if cfg is None:
        return 2
    served = cfg.teacher.server is not None and not args.teacher
    teacher = args.teacher or cfg.teacher.model
    out = args.out or cfg.teacher.cache
    if not (teacher or served) or not out:
        print(
            "cache-teacher needs --teacher (or teacher.model, or teacher.server) and --out (or teacher.cache)",
            file=sys.stderr,
        )
        return 2
    from targetsft.runtime.inputs import InputError

    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--shard-examples", args.shard_examples)):
        if value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if not args.temperature > 0:
        raise InputError(f"--temperature must be positive, got {args.temperature}")
    check_inputs(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=None), teachers=[]))
    if not served:
        check_model(teacher, "teacher")
    names = ("k", "temperature", "batch_size", "shard_examples", "device", "overwrite", "precision", "engine")
    path = cache_teacher(cfg, out, teacher=teacher, **options_of(args, *names))
    print(f"teacher cache: {path}")
    return 0
