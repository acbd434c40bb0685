"""A run's record: the small text a finished run is judged by (``run.json``, ``summary.json``, ``metrics.csv``,
``gamma_probe.jsonl``, ``eval/``, ``DONE.json``), where it lives, its layout's version, what it must match to be
reused and how two trainings of its run compare.

The record folder is ``<records_dir>/<run id>`` (``runs_dir`` when the experiment has no ``records_dir``); the
models and checkpoints stay in :func:`~targetsft.experiments.grid.run_dir`.

Evaluation items
----------------
Each ``eval/<label>/result.json`` (and ``DONE.json``'s set) names its items file, ``<set>.generations.jsonl`` or
``<set>.mc.jsonl``; the record keeps it gzip-compressed beside that name, ``<items>.gz`` (the runner compresses
what it evaluates; :func:`compact_record` compresses a record's plain ones), and every reader takes the name through
:func:`~targetsft.runtime.files.stored_file`, which finds the file in either form.

Versions
--------
The files the runner writes (``run.json``, ``eval/<label>/result.json``, ``DONE.json``) carry ``record_version``
(:data:`RECORD_VERSION`); one without it is version 1, the layout of 0.2. Every reader takes them through
:func:`read_record` (:func:`migrate_record`), so the code reads the current layout only. ``summary.json`` and
``metrics.csv`` are the trainer's, and so is ``DONE.json``'s ``train`` (kept as the trainer wrote it: its hash,
:func:`training_id`, names the model each set was evaluated on).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import EvalSpec, Experiment, Run, expand_grid, run_dir, runs_root
from targetsft.runtime.files import GZIP_SUFFIX, atomic_write_text, compress_file, sha256_json
from targetsft.runtime.inputs import InputError
from targetsft.training.config import config_from_dict

DONE_FILE = "DONE.json"
"""The file whose presence marks a run finished: its eval sets, each with the spec it was evaluated with."""

PROBE_FILE = "gamma_probe.jsonl"
"""The γ probe's rows (p_θ(y) on fixed training examples at the start and every tenth of training)."""

RETRAIN_DIR = "retrain"
"""Where a teacher retrained for its students (its model lost) keeps its training's part of the record, beside
``comparison.json`` (:func:`compare_training` with the recorded one): the record keeps the training it was evaluated
on."""


RECORD_VERSION = 2
"""The layout of the records written now (``record_version`` in ``run.json``, ``result.json`` and ``DONE.json``):

* ``run.json``: ``run``, ``fingerprint``, ``config``, ``precision`` (``None``: the untrained baseline, or not
  recorded);
* ``eval/<label>/result.json``: ``spec`` (every :class:`~targetsft.experiments.grid.EvalSpec` option), ``kind``,
  ``n``, ``metrics``, ``items`` (relative to its folder), ``model`` (:func:`training_id` of the training evaluated;
  ``None``: the baseline, or a version-1 file, which did not record it);
* ``DONE.json``: ``run``, ``config_id``, ``group``, ``method``, ``params``, ``learning_rate``, ``seed``,
  ``fingerprint``, ``train`` (the trainer's, as written), ``precision``, ``eval_environment`` (``None``: not
  recorded), ``sets`` (label → a result as above without ``record_version``, ``items`` relative to the record,
  ``model`` always named), ``seconds``, ``finished``, ``earlier_models`` (``[]`` when none).

Version 2 differs from version 1 in exactly these: ``record_version``; ``precision``, ``eval_environment`` and
``earlier_models`` always present; every eval spec with all its options; every set of ``DONE.json`` naming its
model."""

#: the options of an eval spec in version 2, with the value a version-1 spec that lacks one was evaluated with
_SPEC_OPTIONS_V2: dict[str, Any] = {
    "name": None,
    "size": None,
    "data_seed": None,
    "samples": 1,
    "temperature": None,
    "top_p": 1.0,
    "greedy": True,
    "max_new_tokens": 256,
    "batch_size": None,
    "seed": 0,
    "normalize": "mean",
    "metrics": None,
    "dtype": "float32",
    "prompt": "gsm",
    "engine": "compact",
}


class RecordVersionError(InputError):
    """A record whose ``record_version`` this library cannot read (newer than :data:`RECORD_VERSION`, or not a
    version at all)."""


def training_id(train: dict[str, Any] | None) -> str | None:
    """Which training a model came from: a short sha256 of its training record (``DONE.json``'s ``train``: the
    trainer's data, metrics, teacher and environment, unique per training); ``None`` for an untrained baseline."""
    return sha256_json(train)[:16] if train else None


def _spec_v2(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, **{k: v for k, v in _SPEC_OPTIONS_V2.items() if k not in spec}}


def _v1_to_v2(record: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (0.2) to 2 (see :data:`RECORD_VERSION`), on the parts the record has: a ``run.json`` (``config``),
    a ``result.json`` (``spec``), a ``DONE.json`` (``sets``). A set of a version-1 ``DONE.json`` that names no model
    was evaluated on the training that ``earlier_models`` lists it under, else on the record's own ``train``."""
    out = {"record_version": 2, **record}
    if "config" in out:
        out.setdefault("precision", None)
    if "spec" in out:
        out["spec"] = _spec_v2(out["spec"])
        out.setdefault("model", None)
    if "sets" in out:
        environment = (out.get("train") or {}).get("environment") or {}
        out.setdefault("precision", environment.get("precision"))
        out.setdefault("eval_environment", None)
        out.setdefault("earlier_models", [])
        listed = {label: training_id(g["train"]) for g in out["earlier_models"] for label in g["sets"]}
        own = training_id(out.get("train"))
        out["sets"] = {
            label: {**entry, "spec": _spec_v2(entry["spec"]), "model": entry.get("model", listed.get(label, own))}
            for label, entry in out["sets"].items()
        }
    return out


#: ``_MIGRATIONS[v - 1]`` takes a record of version ``v`` to ``v + 1``
_MIGRATIONS = (_v1_to_v2,)


def migrate_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (the content of a ``run.json``, ``result.json`` or ``DONE.json``) in the current layout
    (:data:`RECORD_VERSION`): upgraded one version at a time from its ``record_version`` (none: version 1), a record
    already current returned as it is (a copy: the argument is never changed). A version newer than this library's,
    or one that is not a positive whole number, is a :class:`RecordVersionError`."""
    version = record.get("record_version", 1)
    if type(version) is not int or version < 1:
        raise RecordVersionError(f"record_version {version!r} is not a record version (1, 2, ...)")
    if version > RECORD_VERSION:
        raise RecordVersionError(
            f"record_version {version} is newer than this targetsft reads (up to {RECORD_VERSION}): the record was "
            "written by a later release; upgrade targetsft to read it"
        )
    out = copy.deepcopy(record)
    for step in _MIGRATIONS[version - 1 :]:
        out = step(out)
    return out


def read_record(path: Path) -> dict[str, Any] | None:
    """A record file through :func:`migrate_record` (``None`` when there is none); a version it cannot read is a
    :class:`RecordVersionError` naming the file."""
    record = read_json(path)
    if record is None:
        return None
    try:
        return migrate_record(record)
    except RecordVersionError as err:
        raise RecordVersionError(f"{path}: {err}") from None


def records_root(exp: Experiment) -> Path:
    return Path(exp.records_dir) if exp.records_dir else runs_root(exp)


def record_dir(exp: Experiment, run: Run) -> Path:
    """The run's record: run.json, summary.json, metrics.csv, gamma_probe.jsonl, eval/, DONE.json."""
    return records_root(exp) / run.id


def compact_record(record: Path) -> list[Path]:
    """Store a record's evaluation items gzip-compressed: each items file that its ``DONE.json`` or an
    ``eval/<label>/result.json`` names and that is still plain becomes ``<items>.gz``
    (:func:`~targetsft.runtime.files.compress_file`: the same bytes for the same content); the record's files, which
    name ``<items>``, are unchanged. Returns the files written."""
    named = [record / entry["items"] for entry in (read_json(record / DONE_FILE) or {}).get("sets", {}).values()]
    for result in sorted(record.glob("eval/*/result.json")):
        named.append(result.parent / read_json(result)["items"])
    plain = [p for p in dict.fromkeys(named) if p.is_file() and not p.name.endswith(GZIP_SUFFIX)]
    return [compress_file(p) for p in plain]


def compact_records(exp: Experiment) -> list[Path]:
    """:func:`compact_record` on the record of every run of ``exp`` (the baseline included); the files written."""
    return [path for run in expand_grid(exp) for path in compact_record(record_dir(exp, run))]


def trained(exp: Experiment, run: Run) -> bool:
    """Whether the run folder holds a finished training: the trainer's ``summary.json`` and ``final/``."""
    out = run_dir(exp, run)
    return (out / "summary.json").is_file() and (out / "final").is_dir()


def run_fingerprint(run: Run) -> str:
    """What a finished run must match to be reused: sha256 of its TrainConfig (canonical JSON) without the output
    folder."""
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
    """The training precision a ``DONE.json`` or ``run.json`` record (:func:`read_record`) says its run used; where
    it names none (``precision: null``: a version-1 record written before precision was recorded), the explicit
    precision of ``config`` (every committed such record: ``train.bf16: true``), else ``None`` (unknown)."""
    found = record["precision"] if record else None
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
    """Whether a recorded spec (of a record through :func:`migrate_record`: every option named) is ``spec``. An
    option added to :class:`EvalSpec` needs a new :data:`RECORD_VERSION` whose migration names it in older specs
    with the value they were evaluated with (so adding an option never re-evaluates finished sets)."""
    return recorded is not None and recorded == spec_dict(spec)


def holds_every_set(done: dict[str, Any] | None, exp: Experiment) -> bool:
    """Whether a ``DONE.json`` record (:func:`read_record`) has every eval set of ``exp``, each evaluated with the
    spec ``exp`` has now."""
    return done is not None and all(
        s.label in done["sets"] and same_spec(done["sets"][s.label]["spec"], s) for s in exp.eval
    )


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
