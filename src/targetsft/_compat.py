"""Old import paths, until 0.3.0: ``targetsft.loss`` is ``targetsft.losses.loss``, ``targetsft.training.trainer``
is ``targetsft.training.recipe``, and so on.

The flat modules of 0.1 live in one subpackage per layer, and five training modules of 0.2 have names that say what
they hold. Importing an old path gives the module at its new path (the same object) with a ``DeprecationWarning``;
nothing is copied.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    **{f"targetsft.{m}": f"targetsft.losses.{m}" for m in ("target", "trust", "residual", "methods", "loss")},
    **{f"targetsft.{m}": f"targetsft.losses.{m}" for m in ("fused", "induced", "inputs", "validation")},
    "targetsft.config": "targetsft.training.config",
    "targetsft.trainer": "targetsft.training.recipe",
    "targetsft.integration": "targetsft.training.fused_forward",
    "targetsft.compute_loss": "targetsft.training.loss_func",
    "targetsft.teacher_cache": "targetsft.training.teacher_cache",
    "targetsft.answers": "targetsft.evaluation.answers",
    "targetsft.evaluate": "targetsft.evaluation",
    "targetsft.experiment": "targetsft.experiments",
    "targetsft.analysis": "targetsft.experiments.induced_targets",
    "targetsft.noise_fit": "targetsft.experiments.noise_fit",
    **{f"targetsft.{m}": f"targetsft.runtime.{m}" for m in ("files", "precision", "models")},
    "targetsft.quickstart": "targetsft.cli.quickstart",
    "targetsft.demo": "targetsft.cli.demo",
    # the training modules of 0.2
    "targetsft.training.trainer": "targetsft.training.recipe",
    "targetsft.training.fused_trainer": "targetsft.training.loss_mixin",
    "targetsft.training.sft_trainer": "targetsft.training.trl_trainer",
    "targetsft.training.compute_loss": "targetsft.training.loss_func",
    "targetsft.training.integration": "targetsft.training.fused_forward",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at its new path."""

    def find_spec(self, name: str, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def __init__(self) -> None:
        self._real_specs: dict[str, importlib.machinery.ModuleSpec] = {}  # old name → the module's own spec

    def create_module(self, spec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in 0.3", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._real_specs[spec.name] = module.__spec__  # importlib rebinds __spec__ to the old name's
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._real_specs.pop(module.__spec__.name)  # keyed by name: safe if imports nest


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
