"""A run on several processes ends in order: the process group is destroyed before the interpreter's teardown (by
the trainers' exit hook, for a user's script), and a ``target-sft`` command exits with its own code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

GROUP = """
import atexit, os, sys, tempfile
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env={**environ, **env}, capture_output=True, text=True
    )


def test_the_group_is_destroyed_at_exit_before_teardown():
    code = GROUP + textwrap.dedent("""
        from targetsft.runtime.distributed import end_process_group_at_exit
        atexit.register(lambda: print("group alive at the end:", dist.is_initialized()))  # runs after ours (LIFO)
        end_process_group_at_exit()
        end_process_group_at_exit()  # registered once
        print("group alive in the script:", dist.is_initialized())
    """)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["group alive in the script: True", "group alive at the end: False"]


def test_a_distributed_command_exits_with_its_code_after_its_exit_handlers():
    code = GROUP + textwrap.dedent("""
        from targetsft.runtime.distributed import exit_distributed
        atexit.register(lambda: print("handler ran; group alive:", dist.is_initialized()))
        sys.stdout.write("buffered, no newline")
        exit_distributed(3)
        print("not reached")
    """)
    proc = _python(code, WORLD_SIZE="2")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newlinehandler ran; group alive: False\n"


def test_exit_distributed_returns_in_a_single_process():
    proc = _python(GROUP + "from targetsft.runtime.distributed import exit_distributed\nexit_distributed(3)\n")
    assert proc.returncode == 0, proc.stderr
