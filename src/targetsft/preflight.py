"""Checks of what a user gives the command line, run before any model is loaded.

Each failure is an :class:`InputError` with one line that names the input: a model folder that does not exist, a
data file that cannot be read (with the line number of a malformed JSONL record), a teacher cache that is not
one. The console script prints it on stderr and exits with status 2 (``--debug`` keeps the traceback).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["InputError", "check_data", "check_model", "check_teacher_cache", "check_train_inputs"]


class InputError(ValueError):
    """An input of the command line that cannot be used (one line, naming it)."""


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, relative with ./, ~, or deeper) is a path."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_model(name: str | os.PathLike | None, role: str = "model") -> None:
    """``name`` is the embedded default, a folder with a ``config.json``, or (not a path) a hub id left to
    transformers; a path that is not such a folder is an :class:`InputError`."""
    from targetsft.models import DEFAULT_MODEL_ALIASES

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
    if _looks_like_path(text):
        raise InputError(f"{role} {text!r}: no such model folder")


def check_data(source: str, size: int | None = None, seed: int | None = None) -> None:
    """A local training data file (or folder) loads and every record has a supported format; built-in and hub
    names are left to the loader."""
    from targetsft.data.sft import load_records

    if source == "gsm-train":
        return
    path = Path(source)
    if not path.exists():
        if path.suffix.lower() in (".jsonl", ".json", ".parquet") or _looks_like_path(source):
            raise InputError(f"data {source!r}: no such file")
        return  # a datasets hub name
    try:
        load_records(source, size=size, seed=seed)
    except (ValueError, OSError) as err:
        raise InputError(str(err)) from None


def check_teacher_cache(path: str | os.PathLike) -> None:
    """A teacher cache folder exists and holds a manifest (its contents are checked when it is opened)."""
    from targetsft.teacher_cache import MANIFEST_NAME

    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"teacher cache {str(path)!r}: no such folder")
    if not (folder / MANIFEST_NAME).is_file():
        raise InputError(f"teacher cache {str(path)!r}: no {MANIFEST_NAME} (build it with target-sft cache-teacher)")


def check_train_inputs(cfg: Any) -> None:
    """Everything a training config points to: its models, its data and its teacher cache."""
    check_model(cfg.model)
    check_model(cfg.teacher.model, "teacher.model")
    check_model(cfg.reference.model, "reference.model")
    if cfg.teacher.cache:
        check_teacher_cache(cfg.teacher.cache)
    check_data(cfg.data.train, cfg.data.size, cfg.data.seed)
