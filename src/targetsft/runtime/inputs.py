"""User inputs the command line checks before any model is loaded: the error they raise, and model sources.

An :class:`InputError` is one line naming the input (a model folder that does not exist, a data file that cannot
be read, with the line number of a malformed JSONL record, a teacher cache that is not one); the console script
prints it on stderr and exits with status 2 (``--debug`` keeps the traceback). The checks of data sources and of
teacher caches live beside their loaders (:func:`targetsft.data.sft.check_source`,
:func:`targetsft.training.teacher_cache.check_cache_folder`); :func:`targetsft.training.config.check_inputs` runs
them all for a training config.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["InputError", "check_model", "looks_like_path"]


class InputError(ValueError):
    """An input of the command line that cannot be used (one line, naming it)."""


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, relative with ./, ~, or deeper) is a path."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_model(name: str | os.PathLike | None, role: str = "model") -> None:
    """``name`` is the embedded default, a folder with a ``config.json``, or (not a path) a hub id left to
    transformers; a path that is not such a folder is an :class:`InputError`."""
    from targetsft.runtime.models import DEFAULT_MODEL_ALIASES

    if name is None or str(name).lower() in DEFAULT_MODEL_ALIASES:
        return
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{role} {text!r}: the folder has no config.json (not a transformers model folder)")
        return
    if path.exists():
        raise InputError(f"{role} {text!r} is a file; give the model's folder")
    if looks_like_path(text):
        raise InputError(f"{role} {text!r}: no such model folder")
