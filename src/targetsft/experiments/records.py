"""A run's record: the small text a finished run is judged by (``run.json``, ``summary.json``, ``metrics.csv``,
``gamma_probe.jsonl``, ``eval/``, ``DONE.json``), where it lives, what it must match to be reused and how two
trainings of its run compare.

The record folder is ``<records_dir>/<run id>`` (``runs_dir`` when the experiment has no ``records_dir``); the
models and checkpoints stay in :func:`~targetsft.experiments.grid.run_dir`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import EvalSpec, Experiment, Run, run_dir, runs_root
from targetsft.runtime.files import atomic_write_text
from targetsft.training.config import config_from_dict

DONE_FILE = "DONE.json"
"""The file whose presence marks a run finished: its eval sets, each with the spec it was evaluated with."""

PROBE_FILE = "gamma_probe.jsonl"
"""The γ probe's rows (p_θ(y) on fixed training examples at the start and every tenth of training)."""

RETRAIN_DIR = "retrain"
"""Where a teacher retrained for its students (its model lost) keeps its training's part of the record, beside
``comparison.json`` (:func:`compare_training` with the recorded one): the record keeps the training it was evaluated
on."""


def records_root(exp: Experiment) -> Path:
    return Path(exp.records_dir) if exp.records_dir else runs_root(exp)


def record_dir(exp: Experiment, run: Run) -> Path:
    """The run's record: run.json, summary.json, metrics.csv, gamma_probe.jsonl, eval/, DONE.json."""
    return records_root(exp) / run.id


def trained(exp: Experiment, run: Run) -> bool:
    """Whether the run folder holds a finished training: the trainer's ``summary.json`` and ``final/``."""
    out = run_dir(exp, run)
    return (out / "summary.json").is_file() and (out / "final").is_dir()


def run_fingerprint(run: Run) -> str:
    """What a finished run must match to be reused: sha256 of its TrainConfig (canonical JSON) without the output
    folder."""
    from targetsft.runtime.files import sha256_json

    return sha256_json({k: v for k, v in run.config.items() if k != "output_dir"})


def run_precision(run: Run) -> str | None:
    """The training precision the run gets on this machine
    (:meth:`~targetsft.training.config.TrainConfig.resolved_precision`); ``None`` for the baseline (untrained)."""
    if run.is_baseline:
        return None
    import warnings

    with warnings.catch_warnings():  # the slow-bf16 warning is for the run itself, not for a status check
        warnings.simplefilter("ignore", RuntimeWarning)
        return config_from_dict(run.config).resolved_precision().name


def recorded_precision(record: dict[str, Any] | None, config: dict[str, Any] | None = None) -> str | None:
    """The training precision a ``DONE.json`` or ``run.json`` record says its run used; for a record written before
    precision was recorded, the explicit precision of its ``config`` (every committed record: ``train.bf16: true``),
    else ``None`` (unknown)."""
    record = record or {}
    envs = (record.get("environment"), (record.get("train") or {}).get("environment"))
    found = record.get("precision") or next((e["precision"] for e in envs if e and e.get("precision")), None)
    if found or config is None:
        return found
    requested = config_from_dict(config).requested_precision()
    return None if requested == "auto" else requested


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n")


def spec_dict(spec: EvalSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def same_spec(recorded: dict[str, Any] | None, spec: EvalSpec) -> bool:
    """Whether a recorded spec is ``spec``; an option added to :class:`EvalSpec` after the record was written counts
    as its default (so adding an option never re-evaluates finished sets)."""
    if recorded is None:
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(EvalSpec) if f.default is not dataclasses.MISSING}
    return {**defaults, **recorded} == spec_dict(spec)


def holds_every_set(done: dict[str, Any] | None, exp: Experiment) -> bool:
    """Whether a ``DONE.json`` record has every eval set of ``exp``, each evaluated with the spec ``exp`` has now."""
    return done is not None and all(same_spec(done["sets"].get(s.label, {}).get("spec"), s) for s in exp.eval)


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """The trainer's ``metrics.csv`` as float rows (empty cells dropped)."""
    if not path.is_file():
        return []
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


#: metrics.csv columns never compared: the step (the key) and the speed (a property of the machine's load)
NOT_COMPARED = ("step", "tokens_per_second")


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def differences(a: float, b: float) -> tuple[float, float]:
    """(|a − b|, |a − b| / max(|a|, |b|)); (0, 0) for equal values, NaN against NaN included."""
    if _same(a, b):
        return 0.0, 0.0
    gap = abs(a - b)
    return gap, gap / max(abs(a), abs(b))


def compare_training(old_dir: Path, new_dir: Path) -> dict[str, Any]:
    """Two records' training logs (``metrics.csv``) side by side: per logged statistic (all but ``NOT_COMPARED``),
    the largest :func:`differences` over the steps both logged; ``identical`` when they logged the same steps and
    every value agrees exactly."""
    old = {int(r["step"]): r for r in read_metrics_csv(old_dir / "metrics.csv")}
    new = {int(r["step"]): r for r in read_metrics_csv(new_dir / "metrics.csv")}
    steps = sorted(old.keys() & new.keys())
    columns: dict[str, dict[str, float]] = {}
    for step in steps:
        for key in old[step].keys() & new[step].keys():
            if key in NOT_COMPARED:
                continue
            gap, rel = differences(old[step][key], new[step][key])
            worst = columns.setdefault(key, {"max_abs": 0.0, "max_rel": 0.0})
            worst["max_abs"], worst["max_rel"] = max(worst["max_abs"], gap), max(worst["max_rel"], rel)
    return {
        "steps": len(steps),
        "recorded_steps": len(old),
        "rerun_steps": len(new),
        "columns": dict(sorted(columns.items())),
        "identical": len(steps) == len(old) == len(new) and all(c["max_abs"] == 0 for c in columns.values()),
    }
