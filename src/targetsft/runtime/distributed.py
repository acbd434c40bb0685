"""Ending a run launched on several processes (``accelerate launch``, ``torchrun``) in order, so that it exits 0.

torch asks every process to destroy its process group before it exits. Left to the interpreter's teardown, gloo's
worker threads (and DeepSpeed's, which run on the same group) can be destroyed while still joinable, and the C++
runtime then aborts a run that has already finished (SIGABRT, ``terminate called without an active exception``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

_registered = False


def end_process_group() -> None:
    """Destroy torch.distributed's process groups (the default one and every subgroup) if this process made one."""
    torch = sys.modules.get("torch")  # a process that never imported torch made no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_process_group_at_exit() -> None:
    """Register :func:`end_process_group` to run at interpreter exit (once per process), for scripts that do not call
    ``trainer.accelerator.end_training()`` themselves; atexit handlers run before the teardown that aborts."""
    global _registered
    if not _registered:
        atexit.register(end_process_group)
        _registered = True


def exit_distributed(code: int) -> None:
    """End a command that ran on several processes: the process group destroyed, atexit handlers run, logs and
    standard streams flushed, then ``os._exit(code)``, skipping the C++ static destructors where a thread left by a
    library can still abort. Returns without exiting in a process that never joined a group."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    end_process_group()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
