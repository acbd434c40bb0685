"""Experiment grids: ``target-sft experiment --config experiments/<name>.yaml``.

An experiment is a grid of runs (methods × parameters × seeds) over one model and data setup. Each run trains
(:func:`targetsft.trainer.train`), evaluates (:func:`targetsft.evaluate.evaluate_generation` /
:func:`~targetsft.evaluate.evaluate_multiple_choice`) and records; the results are aggregated over seeds, compared
pairwise over the same problems and seeds, and plotted.

Schema (strict: an unknown key anywhere is an error that names it and lists the valid ones)
-------------------------------------------------------------------------------------------
* ``name``, ``output_dir``.
* ``base``: a :class:`~targetsft.config.TrainConfig` dict applied to every run (``model``, ``data``, ``teacher``,
  ``reference``, ``lora``, ``train``, ``loss.chunk_size``; not ``output_dir``, the method, its params or the
  seed). ``teacher`` goes only to the methods that use one.
* ``grid``: run groups ``{name?, method, params?, train?, data?, teacher?, seeds}``; every **list** value is swept
  (the cartesian product of all lists; write ``[[a, b]]`` for a list value). ``teacher.model: "@<run id>"`` is the
  final model of an earlier run of the experiment (a trained teacher).
* ``eval``: sets ``{set, name?, size?, data_seed?, batch_size?, metrics?, dtype?}`` (``dtype``: the weights'
  dtype during evaluation, ``float32`` by default, explicit so that a set's spec means the same on every machine;
  ``bfloat16`` generates about twice as fast on a CPU with native bf16, tens of times slower on an AVX2-only one,
  and changes greedy outputs) plus, for generation, ``samples``, ``temperature``, ``top_p``,
  ``greedy``, ``max_new_tokens``, ``seed``, ``prompt`` (``gsm`` or ``boxed``), and for multiple choice ``normalize``
  (:func:`targetsft.evaluate.evaluate`); ``name`` labels the set, ``metrics`` are those tabulated and compared.
* ``baseline: true``: also evaluate the untrained model once (run ``base``).
* ``base.precision`` (or ``base.train.bf16``): the training precision (:mod:`targetsft.precision`; ``auto`` by
  default, resolved on the machine that trains). Each record keeps the precision its run was trained at; runs of
  two precisions are never pooled or compared (:func:`check_one_precision`), and a grid whose records were trained
  at another precision than this machine would use is refused before anything starts (status ``precision``).
* ``compare``: pairs ``[A, B]`` of method names or globs over config ids (default: every config against ``sft``,
  ``target_sft`` against ``dft``; ``*`` leaves the baseline out, ``base`` names it).
* ``keep_checkpoints``: keep ``checkpoint-N`` folders of finished runs (default false: removed once ``DONE.json``
  is written, ``final/`` stays; a 135M-parameter checkpoint with its optimizer state is about 1.6 GB).
* ``teacher_cache_k``: k > 0 caches each distinct teacher's top-k log-probs once per training set (teacher,
  its prompt, model and data section) in ``teacher_cache/`` beside the runs folder
  (:func:`~targetsft.trainer.cache_teacher`; resumable) and trains every teacher run from that cache instead of
  running the teacher at each step; 0 (default): teacher online.
* ``runs_dir``: where the runs live (default ``<output_dir>/runs``). Experiments that name the same ``runs_dir``
  share the runs they have in common (same id and configuration: trained once, each evaluated on the union of
  their sets; ``DONE.json`` keeps every set). Give a set label the same spec in all of them.
* ``records_dir``: where each run's *record* lives, apart from its models (default: in the run folder itself).
  The record is the small text a finished run is judged by: ``run.json``, ``summary.json``, ``metrics.csv``,
  ``gamma_probe.jsonl``, ``eval/`` and ``DONE.json``; ``runs_dir`` keeps ``final/`` and the checkpoints. Commit
  the records and a finished run stays finished on another machine, without its gigabytes of weights; a run whose
  model is needed again (a new eval set, a teacher without its cache) and is gone is retrained from scratch.
* ``teacher_cache_dir``: where the teacher caches live (default ``teacher_cache/`` beside ``runs_dir``).
* ``gamma_probe``: training examples on which p_θ(y) (γ of dft and target_sft) is recorded as a distribution at
  the start and every tenth of training (default 16; 0: off).

Runs and ids
------------
A run's id is its content: ``<group name or method>-<params>-<swept data/teacher/train values and lr>-s<seed>``,
e.g. ``target_sft-eta0.5-lr5e-05-s1``; its config id drops ``-s<seed>``. **Seeds set ``train.seed`` only**
(data order, LoRA init, sampling); ``data.seed`` stays as in ``base``, so every method and seed trains on the same
examples and the comparison is paired on the data. Runs go seed-major (all configs of the first seed first), so
partial results are already paired. Every run's TrainConfig is built with
:func:`~targetsft.config.config_from_dict` when the experiment is loaded, before anything starts.

Resume
------
``<runs_dir>/<id>/`` (default ``runs_dir``: ``<output_dir>/runs``) holds the trainer's outputs;
``<records_dir>/<id>/`` (default: the same folder) the run's record: ``run.json``, the trainer's ``summary.json``
and ``metrics.csv`` (copied there when training ends), ``eval/<label>/`` the evaluation files and ``DONE.json``
(the metrics, written atomically when the run is complete). A run is skipped when ``DONE.json`` exists for the
same configuration (a fingerprint of its TrainConfig; a different one is an error, never silently reused) and
covers the current eval sets. Otherwise training is skipped if the run folder holds ``summary.json`` (written last
by the trainer) and ``final/``, resumed from the newest complete ``checkpoint-N`` (one holding
``trainer_state.json``, which the Trainer writes last; incomplete ones are removed), or started from scratch
(``retrain`` when the record says it was trained before but the model is gone); each eval set whose
``result.json`` matches its spec is reused.

Statistics
----------
* Over seeds: mean and the t-interval ``mean ± t_{0.975,n−1}·s/√n`` (:func:`t_interval`; ``s`` with ``n − 1``);
  with one run the table shows that run's own interval over problems instead (marked ``*``).
* Paired, config A − config B, on the problems both evaluated and the seeds both ran (a baseline pairs with every
  seed): per problem the mean over seeds of ``a − b``, then the t-interval over problems (problems are the unit:
  the seeds of one problem are not independent). For 0/1 metrics, also the exact McNemar test on the discordant
  (seed, problem) pairs: ``p = min(1, 2·P(X ≤ min(b, c)))``, ``X ~ Bin(b + c, 1/2)`` (:func:`mcnemar_exact`).
  A difference is a ``win``/``loss`` only when its interval excludes 0, else a ``tie``.

Outputs: ``results.csv`` (one row per run × set × metric), ``summary.csv`` and ``results.md`` (mean ± interval
over seeds), ``comparisons.csv``, ``probe.csv`` (p_θ(y) on the probe examples, start and end of training),
``plots/*.png``, ``progress.log``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import gc
import itertools
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from targetsft.config import TRAIN_DEFAULTS, ConfigError, _build, _unknown, _yaml, config_from_dict
from targetsft.files import atomic_write_csv, atomic_write_text
from targetsft.methods import get_method
from targetsft.precision import environment

__all__ = [
    "EvalSpec",
    "Experiment",
    "ExperimentError",
    "Run",
    "RunGroup",
    "add_experiment_arguments",
    "aggregate",
    "done_records",
    "expand_grid",
    "experiment_from_dict",
    "format_progress",
    "load_experiment",
    "mcnemar_exact",
    "paired_comparison",
    "run_experiment",
    "run_experiments",
    "run_experiment_from_args",
    "t_interval",
    "t_quantile",
]

DONE_FILE = "DONE.json"
EVAL_DTYPES = ("float32", "bfloat16", "float16")
PROBE_FILE = "gamma_probe.jsonl"
BASELINE_ID = "base"
DEFAULT_COMPARE = (("*", "sft"), ("target_sft", "dft"))
_ABBREV = {"learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "bs", "label_noise": "noise"}
_GEN_KEYS = ("samples", "temperature", "top_p", "greedy", "max_new_tokens", "seed", "prompt")
_MC_KEYS = ("normalize",)
_MC_METRICS = ["accuracy", "accuracy_mean", "accuracy_sum"]
_BINARY_METRICS = ("greedy", "average@1", *_MC_METRICS)


class ExperimentError(RuntimeError):
    """A run folder that cannot be used as it is (another configuration, a missing teacher run)."""


# ------------------------------------------------------------------------------------------------------ schema


@dataclass
class EvalSpec:
    """One evaluation set and its options (see :func:`targetsft.evaluate.evaluate`); ``name`` labels it (default:
    the set's name), ``metrics`` picks the metrics tabulated and compared (default: :func:`primary_metrics`)."""

    set: str
    name: str | None = None
    size: int | str | None = None
    data_seed: int | None = None
    samples: int = 1
    temperature: float | None = None
    top_p: float = 1.0
    greedy: bool = True
    max_new_tokens: int = 256
    batch_size: int | None = None
    seed: int = 0
    normalize: str = "mean"
    metrics: list[str] | None = None
    dtype: str = "float32"
    prompt: str = "gsm"

    @property
    def label(self) -> str:
        from targetsft.evaluate import _set_label

        return self.name or _set_label(self.set)

    @property
    def kind(self) -> str | None:
        """``generation`` or ``multiple_choice`` for a named set; None for a ``.jsonl`` file (known when read)."""
        from targetsft.data.eval_sets import EVAL_SETS, MC_SETS

        return "generation" if self.set in EVAL_SETS else "multiple_choice" if self.set in MC_SETS else None


@dataclass
class RunGroup:
    """A group of runs of one method; list values in ``params``/``train``/``data``/``teacher`` are swept."""

    method: str
    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class Experiment:
    """A checked experiment: see the module docstring for the schema."""

    name: str
    output_dir: str
    grid: list[RunGroup]
    eval: list[EvalSpec]
    base: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    gamma_probe: int = 16
    keep_checkpoints: bool = False
    teacher_cache_k: int = 0
    runs_dir: str | None = None
    records_dir: str | None = None
    teacher_cache_dir: str | None = None
    compare: list[list[str]] = field(default_factory=lambda: [list(p) for p in DEFAULT_COMPARE])


@dataclass(frozen=True)
class Run:
    """One run: its id, config id (the id without the seed), method, effective params, seed and TrainConfig dict
    (``config``; for the baseline only ``model``)."""

    id: str
    config_id: str
    group: str
    method: str
    params: dict[str, Any]
    seed: int | None
    config: dict[str, Any]

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE_ID

    @property
    def learning_rate(self) -> float | None:
        return None if self.is_baseline else {**TRAIN_DEFAULTS, **self.config.get("train", {})}["learning_rate"]


def _eval_spec(raw: Any, where: str) -> EvalSpec:
    spec = _build(EvalSpec, raw, where)
    kind = spec.kind
    if kind is None and not str(spec.set).lower().endswith(".jsonl"):
        from targetsft.data.eval_sets import EVAL_SETS, MC_SETS

        raise ConfigError(
            f"{where}: unknown set {spec.set!r}; choose from generation sets {sorted(EVAL_SETS)}, multiple-choice "
            f"sets {sorted(MC_SETS)}, or a .jsonl file"
        )
    wrong = _MC_KEYS if kind == "generation" else _GEN_KEYS if kind == "multiple_choice" else ()
    for key in raw:
        if key in wrong:
            valid = [f.name for f in dataclasses.fields(EvalSpec) if f.name not in wrong]
            raise _unknown(f"{where} ({kind} set {spec.set!r})", key, valid)
    if spec.samples > 1 and spec.temperature == 0:
        raise ConfigError(f"{where}: samples > 1 needs temperature > 0 (greedy samples are identical)")
    if spec.normalize not in ("mean", "sum"):
        raise ConfigError(f"{where}: normalize must be 'mean' or 'sum', got {spec.normalize!r}")
    from targetsft.evaluate import PROMPT_STYLES

    if spec.prompt not in PROMPT_STYLES:
        raise ConfigError(f"{where}: prompt must be one of {PROMPT_STYLES}, got {spec.prompt!r}")
    if spec.dtype not in EVAL_DTYPES:
        raise ConfigError(f"{where}: dtype must be one of {EVAL_DTYPES}, got {spec.dtype!r}")
    generation = ["greedy", f"average@{spec.samples}", f"pass@{spec.samples}"]
    allowed = {"generation": generation, "multiple_choice": list(_MC_METRICS)}.get(kind, generation + _MC_METRICS)
    for metric in spec.metrics or []:
        if metric not in allowed:
            raise ConfigError(f"{where}: metric {metric!r} has no per-problem values to compare; choose from {allowed}")
    return spec


def experiment_from_dict(raw: dict[str, Any]) -> Experiment:
    """A checked :class:`Experiment` from plain data; every run's TrainConfig is built (and so checked) here."""
    if not isinstance(raw, dict):
        raise ConfigError("an experiment must be a mapping")
    valid = [f.name for f in dataclasses.fields(Experiment)]
    for key in raw:
        if key not in valid:
            raise _unknown("the experiment", key, valid)
    for key in ("name", "output_dir", "grid", "eval"):
        if raw.get(key) is None:
            raise ConfigError(f"the experiment needs {key!r}")
    if not isinstance(raw["grid"], list) or not raw["grid"]:
        raise ConfigError("grid must be a non-empty list of run groups")
    if not isinstance(raw["eval"], list) or not raw["eval"]:
        raise ConfigError("eval must be a non-empty list of evaluation sets")
    for where, items, key in (("grid", raw["grid"], "method"), ("eval", raw["eval"], "set")):
        for i, item in enumerate(items):
            if not isinstance(item, dict) or key not in item:
                raise ConfigError(f"{where}[{i}] must be a mapping with {key!r}, got {item!r}")
    grid = [_build(RunGroup, g, f"grid[{i}]") for i, g in enumerate(raw["grid"])]
    specs = [_eval_spec(e, f"eval[{i}]") for i, e in enumerate(raw["eval"])]
    exp = Experiment(**{**raw, "grid": grid, "eval": specs, "base": raw.get("base") or {}})
    _check_experiment(exp)
    return exp


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML (see the module docstring)."""
    import yaml

    try:
        raw = _yaml(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    try:
        return experiment_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _check_experiment(exp: Experiment) -> None:
    base = exp.base
    if not isinstance(base, dict):
        raise ConfigError("base must be a mapping (a TrainConfig)")
    k = exp.teacher_cache_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"teacher_cache_k must be an int >= 0 (0: teacher online), got {k!r}")
    if "output_dir" in base:
        raise ConfigError("base.output_dir: every run gets <output_dir>/runs/<run id>; set the top-level output_dir")
    if set(base.get("loss") or {}) - {"chunk_size"}:
        raise ConfigError("base.loss may only hold chunk_size; set method and params in each grid group")
    if "seed" in (base.get("train") or {}) or any("seed" in g.train for g in exp.grid):
        raise ConfigError("train.seed comes from each group's seeds; do not set it")
    for i, g in enumerate(exp.grid):
        try:
            get_method(g.method)
        except ValueError as err:
            raise ConfigError(f"grid[{i}]: {err}") from None
        if not isinstance(g.seeds, list) or not g.seeds or not all(isinstance(s, int) for s in g.seeds):
            raise ConfigError(f"grid[{i}].seeds must be a non-empty list of ints, got {g.seeds!r}")
        for section in ("params", "train", "data", "teacher"):
            if not isinstance(getattr(g, section), dict):
                raise ConfigError(f"grid[{i}].{section} must be a mapping")
    labels = [s.label for s in exp.eval]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"eval sets need distinct labels (give 'name'), got {labels}")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in exp.compare):
        raise ConfigError(f"compare must be a list of [A, B] pairs of names or patterns, got {exp.compare!r}")
    runs = expand_grid(exp)
    for run in runs:
        if not run.is_baseline:
            try:
                config_from_dict(run.config)
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"run {run.id}: {err}") from None
    _check_teacher_refs(runs)


# --------------------------------------------------------------------------------------------------- expansion


def _fmt(value: Any) -> str:
    """A value as an id fragment: ``5e-05``, ``0.5``, ``true``, ``answer_hint``."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def _combos(group: RunGroup) -> list[dict[str, dict[str, Any]]]:
    """The cartesian product of the group's list values: one ``{section: {key: value}}`` per combination."""
    sections = ("params", "data", "teacher", "train")
    axes = [(s, k, v if isinstance(v, list) else [v]) for s in sections for k, v in getattr(group, s).items()]
    out = []
    for values in itertools.product(*(vals for _, _, vals in axes)):
        combo: dict[str, dict[str, Any]] = {s: {} for s in sections}
        for (s, k, _), v in zip(axes, values, strict=True):
            combo[s][k] = v
        out.append(combo)
    return out


def _config_id(group: RunGroup, combo: dict[str, dict[str, Any]]) -> str:
    """``<name or method>`` + every param + the data/teacher/train values swept over 2+ values + the learning rate
    when the group sets it."""
    parts = [group.name or group.method]
    parts += [f"{_ABBREV.get(k, k)}{_fmt(v)}" for k, v in combo["params"].items()]
    for section in ("data", "teacher", "train"):
        for k, v in combo[section].items():
            given = getattr(group, section)[k]
            if (isinstance(given, list) and len(given) > 1) or (section == "train" and k == "learning_rate"):
                parts.append(f"{_ABBREV.get(k, k)}{_fmt(v)}")
    return "-".join(parts)


def _run_config(exp: Experiment, group: RunGroup, combo: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """The run's TrainConfig dict: ``base`` with the group's values on top; the base teacher only for methods that
    use one."""
    base = json.loads(json.dumps(exp.base))
    cfg = {k: v for k, v in base.items() if k not in ("teacher", "loss", "data", "train")}
    cfg["loss"] = {**(base.get("loss") or {}), "method": group.method, "params": combo["params"]}
    cfg["data"] = {**(base.get("data") or {}), **combo["data"]}
    cfg["train"] = {**(base.get("train") or {}), **combo["train"], "seed": seed}
    if "teacher" in get_method(group.method).needs or combo["teacher"]:
        cfg["teacher"] = {**(base.get("teacher") or {}), **combo["teacher"]}
    return cfg


def expand_grid(exp: Experiment) -> list[Run]:
    """Every run of the experiment, baseline first, then seed-major (all configs of a seed before the next seed)."""
    runs: list[tuple[int, int, Run]] = []
    for group in exp.grid:
        method_defaults = get_method(group.method).defaults
        for combo in _combos(group):
            cid = _config_id(group, combo)
            for seed in group.seeds:
                run = Run(
                    id=f"{cid}-s{seed}",
                    config_id=cid,
                    group=group.name or group.method,
                    method=group.method,
                    params={**method_defaults, **combo["params"]},
                    seed=seed,
                    config=_run_config(exp, group, combo, seed),
                )
                runs.append((seed, len(runs), run))
    ordered = [r for _, _, r in sorted(runs, key=lambda t: (t[0], t[1]))]
    if exp.baseline:
        model = exp.base.get("model")
        ordered.insert(0, Run(BASELINE_ID, BASELINE_ID, BASELINE_ID, BASELINE_ID, {}, None, {"model": model}))
    ids = [r.id for r in ordered]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"runs with the same id {dupes}: give the groups distinct names")
    return [dataclasses.replace(r, config={**r.config, "output_dir": str(_run_dir(exp, r))}) for r in ordered]


def run_reference(model: Any) -> str | None:
    """The run id in a ``teacher.model: "@<run id>"`` reference to an earlier run of the grid, else ``None``."""
    return model[1:] if isinstance(model, str) and model.startswith("@") else None


def _teacher_ref(run: Run) -> str | None:
    return run_reference((run.config.get("teacher") or {}).get("model"))


def _check_teacher_refs(runs: Sequence[Run]) -> None:
    """A ``teacher.model: "@<run id>"`` must name a run that comes earlier in the grid."""
    position = {r.id: i for i, r in enumerate(runs)}
    for i, run in enumerate(runs):
        ref = _teacher_ref(run)
        if ref is not None and not position.get(ref, i) < i:
            where = "comes later" if ref in position else "is not in the grid"
            raise ConfigError(f"run {run.id}: its teacher run {ref!r} {where}; list the teacher's group first")


def _runs_root(exp: Experiment) -> Path:
    return Path(exp.runs_dir) if exp.runs_dir else Path(exp.output_dir) / "runs"


def _run_dir(exp: Experiment, run: Run) -> Path:
    """The run's models and checkpoints (the trainer's ``output_dir``)."""
    return _runs_root(exp) / run.id


def _records_root(exp: Experiment) -> Path:
    return Path(exp.records_dir) if exp.records_dir else _runs_root(exp)


def _record_dir(exp: Experiment, run: Run) -> Path:
    """The run's record: run.json, summary.json, metrics.csv, gamma_probe.jsonl, eval/, DONE.json."""
    return _records_root(exp) / run.id


def _trained(exp: Experiment, run: Run) -> bool:
    """Whether the run folder holds a finished training: the trainer's ``summary.json`` and ``final/``."""
    out = _run_dir(exp, run)
    return (out / "summary.json").is_file() and (out / "final").is_dir()


# ------------------------------------------------------------------------------------------------------ runner


def run_fingerprint(run: Run) -> str:
    """What a finished run must match to be reused: sha256 of its TrainConfig (canonical JSON) without the output
    folder."""
    from targetsft.teacher_cache import _sha256_json

    return _sha256_json({k: v for k, v in run.config.items() if k != "output_dir"})


def run_precision(run: Run) -> str | None:
    """The training precision the run gets on this machine (:meth:`~targetsft.config.TrainConfig.resolved_precision`);
    ``None`` for the baseline (untrained)."""
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


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n")


def _spec_dict(spec: EvalSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _same_spec(recorded: dict[str, Any] | None, spec: EvalSpec) -> bool:
    """Whether a recorded spec is ``spec``; an option added to :class:`EvalSpec` after the record was written counts
    as its default (so adding an option never re-evaluates finished sets)."""
    if recorded is None:
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(EvalSpec) if f.default is not dataclasses.MISSING}
    return {**defaults, **recorded} == _spec_dict(spec)


def _holds_every_set(done: dict[str, Any] | None, exp: Experiment) -> bool:
    """Whether a ``DONE.json`` record has every eval set of ``exp``, each evaluated with the spec ``exp`` has now."""
    return done is not None and all(_same_spec(done["sets"].get(s.label, {}).get("spec"), s) for s in exp.eval)


def run_status(exp: Experiment, run: Run) -> str:
    """``new``, ``started`` (no checkpoint yet), ``resume`` (a checkpoint), ``evaluate`` (trained, sets missing),
    ``retrain`` (the record says trained, the model is gone), ``done``, ``stale`` (the folder belongs to another
    configuration) or ``precision`` (recorded at another training precision than the run gets on this machine)."""
    out, record = _run_dir(exp, run), _record_dir(exp, run)
    started = _read_json(record / "run.json")
    if started is not None and started.get("fingerprint") != run_fingerprint(run):
        return "stale"
    if started is not None and not run.is_baseline:
        done = _read_json(record / DONE_FILE)
        was = recorded_precision(done, run.config) if done else recorded_precision(started, run.config)
        if was is not None and was != run_precision(run):
            return "precision"
    if _holds_every_set(_read_json(record / DONE_FILE), exp):
        return "done"
    if run.is_baseline or _trained(exp, run):
        return "evaluate"
    if _complete_checkpoints(out):
        return "resume"
    if (record / "summary.json").is_file():
        return "retrain"
    return "started" if out.exists() or started is not None else "new"


def _complete_checkpoints(out: Path) -> list[Path]:
    """``checkpoint-N`` folders that hold ``trainer_state.json`` (the Trainer writes it last)."""
    return [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]


def _drop_incomplete_checkpoints(out: Path, log: Callable[[str], None]) -> None:
    for p in out.glob("checkpoint-*"):
        if p.is_dir() and not (p / "trainer_state.json").is_file():
            log(f"removing incomplete {p.name} of an interrupted save")
            shutil.rmtree(p)


def _train(exp: Experiment, run: Run, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the run (from scratch, or resumed from its newest complete checkpoint); its trainer summary."""
    from targetsft import trainer

    out, record = _run_dir(exp, run), _record_dir(exp, run)
    if _trained(exp, run):
        summary = json.loads((out / "summary.json").read_text())
    else:
        config = json.loads(json.dumps(run.config))
        ref = _teacher_ref(run)
        if ref is not None:
            config["teacher"]["model"] = str(_teacher_model(exp, run, ref, log))
        if exp.teacher_cache_k and (config.get("teacher") or {}).get("model"):
            config["teacher"] = {**config["teacher"], "model": None, "cache": str(_teacher_cache(exp, config, log))}
        _drop_incomplete_checkpoints(out, log)
        resume = bool(_complete_checkpoints(out))
        if not resume:
            (record / PROBE_FILE).unlink(missing_ok=True)
        cfg = config_from_dict(config)
        probe = [_gamma_probe(cfg, exp.gamma_probe, record / PROBE_FILE)] if exp.gamma_probe else []
        summary = trainer.train(cfg, resume=resume, callbacks=probe)
    if record != out:  # the trainer's part of the record
        for name in ("summary.json", "metrics.csv"):
            if (out / name).is_file():
                atomic_write_text(record / name, (out / name).read_text())
    return summary


def _teacher_model(exp: Experiment, run: Run, ref: str, log: Callable[[str], None]) -> Path:
    """The final model folder of the teacher run ``ref``, which must be done; retrained first when its model is
    gone and its cache (if the experiment caches teachers) is not already built."""
    teacher = next(r for r in expand_grid(exp) if r.id == ref)
    if not (_record_dir(exp, teacher) / DONE_FILE).is_file():
        raise ExperimentError(f"run {run.id}: its teacher run {ref!r} is not done ({_record_dir(exp, teacher)})")
    final = _run_dir(exp, teacher) / "final"
    config = {**run.config, "teacher": {**run.config["teacher"], "model": str(final)}}
    cached = exp.teacher_cache_k and (_teacher_cache_folder(exp, config) / "COMPLETE").is_file()
    if not cached and not _trained(exp, teacher):
        log(f"training {teacher.id} (retrain: the teacher of {run.id}; its model is gone)")
        _train(exp, teacher, log)
    return final


def _teacher_key(config: dict[str, Any]) -> dict[str, Any]:
    """What a teacher cache depends on: the teacher section (with its model), the student model and the data."""
    return {k: config.get(k) for k in ("model", "data", "teacher")}


def _teacher_cache_folder(exp: Experiment, config: dict[str, Any]) -> Path:
    """``<teacher_cache_dir>/<hash of the teacher, its prompt, the model, the data and k>``."""
    from targetsft.teacher_cache import _sha256_json

    key = _teacher_key(config)
    root = Path(exp.teacher_cache_dir) if exp.teacher_cache_dir else _runs_root(exp).parent / "teacher_cache"
    return root / _sha256_json({**key, "k": exp.teacher_cache_k})[:16]


def _teacher_cache(exp: Experiment, config: dict[str, Any], log: Callable[[str], None]) -> Path:
    """The top-k cache of the run's teacher over its training data, built on first use (resumable)."""
    from targetsft import trainer

    folder, key = _teacher_cache_folder(exp, config), _teacher_key(config)
    if not (folder / "COMPLETE").is_file():
        log(f"teacher cache: building {folder} (teacher {config['teacher']['model']}, k={exp.teacher_cache_k})")
        t0 = time.time()
        trainer.cache_teacher(config_from_dict(config), folder, k=exp.teacher_cache_k)
        atomic_write_text(folder / "COMPLETE", json.dumps({**key, "seconds": round(time.time() - t0, 1)}, default=str))
    return folder


def label_logprobs(model: Any, items: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Per tokenized example, ``log p_θ(y_t)`` of each supervised token (one forward pass each, no grad)."""
    import torch

    from targetsft.integration import IGNORE_INDEX, unwrap

    inner = unwrap(model)
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    out: list[list[float]] = []
    try:
        with torch.no_grad():
            for item in items:
                ids = torch.tensor([item["input_ids"]], device=device)
                labels = torch.tensor(item["labels"][1:], device=device)
                keep = labels != IGNORE_INDEX
                logits = inner(input_ids=ids).logits[0, :-1][keep].float()
                out.append(torch.log_softmax(logits, -1).gather(-1, labels[keep][:, None]).flatten().tolist())
    finally:
        inner.train(was_training)
    return out


def label_probabilities(model: Any, items: Sequence[dict[str, Any]]) -> list[float]:
    """p_θ(y_t) of every supervised token of tokenized examples: γ_t itself for the γ = sg p_θ(y) methods (dft,
    target_sft, ...)."""
    return [math.exp(v) for lp in label_logprobs(model, items) for v in lp]


def distribution(values: Sequence[float], bins: int = 20) -> dict[str, Any]:
    """Mean, quantiles (10/25/50/75/90%, nearest rank) and a histogram on ``bins`` equal bins of [0, 1]."""
    v = sorted(values)
    n = len(v)
    quantiles = {f"q{int(100 * q)}": v[min(n - 1, int(q * n))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if n else {}
    hist = [0] * bins
    for x in v:
        hist[min(bins - 1, int(x * bins))] += 1
    return {"n": n, "mean": math.fsum(v) / n if n else math.nan, **quantiles, "hist": hist}


def _gamma_probe(cfg: Any, examples: int, path: Path) -> Any:
    """A TrainerCallback that records :func:`distribution` of :func:`label_probabilities` on the first ``examples``
    training examples at the start and about every tenth of training into ``path`` (JSON lines, one per step)."""
    from transformers import TrainerCallback

    from targetsft.models import load_tokenizer, resolve_model
    from targetsft.trainer import build_dataset

    small = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, size=min(examples, cfg.data.size or examples)))
    items, _ = build_dataset(small, load_tokenizer(resolve_model(cfg.model)))

    class GammaProbe(TrainerCallback):
        def _record(self, state: Any, model: Any) -> None:
            record = distribution(label_probabilities(model, items))  # on every rank: sharded models need them all
            if state.is_world_process_zero:
                rows = _read_probe(path) | {state.global_step: record}
                atomic_write_text(path, "".join(json.dumps({"step": k, **v}) + "\n" for k, v in sorted(rows.items())))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = max(1, state.max_steps // 10)
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self._record(state, model)

    return GammaProbe()


def _read_probe(path: Path) -> dict[int, dict[str, Any]]:
    """``{step: distribution}`` from a probe file (a step recorded twice, after a resume: the last one)."""
    from targetsft.data.sft import read_jsonl

    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in read_jsonl(path)} if path.is_file() else {}


def _evaluate_set(model: Any, tokenizer: Any, spec: EvalSpec, out: Path, name: str, progress: bool) -> dict[str, Any]:
    """Evaluate one set into ``out``; the harness's record of it (spec, metrics, items file relative to ``out``)."""
    from targetsft import evaluate as E

    kind = spec.kind or E._set_kind(spec.set)
    common = {"size": spec.size, "data_seed": spec.data_seed, "out_dir": out, "model_name": name, "progress": progress}
    if kind == "generation":
        summary = E.evaluate_generation(
            model,
            tokenizer,
            spec.set,
            seed=spec.seed,
            samples=spec.samples,
            temperature=spec.temperature,
            top_p=spec.top_p,
            greedy=spec.greedy,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size or 32,
            prompt=spec.prompt,
            **common,
        )
    else:
        summary = E.evaluate_multiple_choice(
            model, tokenizer, spec.set, batch_size=spec.batch_size or 16, normalize=spec.normalize, **common
        )
    items = Path(summary["files"]["items"]).name
    return {"spec": _spec_dict(spec), "kind": kind, "n": summary["n"], "metrics": summary["metrics"], "items": items}


def _evaluate(exp: Experiment, run: Run, log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Every eval set of the run (reusing the sets whose ``result.json`` matches their spec)."""
    import torch

    from targetsft.models import load_model, load_tokenizer, resolve_model

    out, record = _run_dir(exp, run), _record_dir(exp, run)
    results: dict[str, Any] = {}
    model = tokenizer = None
    loaded = None  # the dtype of the loaded model
    for spec in exp.eval:
        folder = record / "eval" / spec.label
        old = _read_json(folder / "result.json")
        if old is not None and _same_spec(old["spec"], spec):
            results[spec.label] = {**old, "items": f"eval/{spec.label}/{old['items']}"}
            continue
        if model is None or loaded != spec.dtype:
            path = resolve_model(run.config.get("model")) if run.is_baseline else str(out / "final")
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_model(path, dtype=getattr(torch, spec.dtype)).to(device)
            tokenizer, loaded = load_tokenizer(path, padding_side="left"), spec.dtype
        log(f"evaluating {run.id} on {spec.label}")
        result = _evaluate_set(model, tokenizer, spec, folder, run.id, progress)
        _write_json(folder / "result.json", result)
        results[spec.label] = {**result, "items": f"eval/{spec.label}/{result['items']}"}
    del model
    gc.collect()
    return results


def _record(run: Run, fingerprint: str, train_summary: dict | None, sets: dict, seconds: float) -> dict[str, Any]:
    """The content of ``DONE.json``; ``seconds``: the run's wall time summed over the experiments that used it."""
    return {
        "run": run.id,
        "config_id": run.config_id,
        "group": run.group,
        "method": run.method,
        "params": run.params,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "fingerprint": fingerprint,
        "train": train_summary
        and {k: train_summary[k] for k in ("data", "metrics", "teacher", "environment") if k in train_summary},
        "precision": recorded_precision(train_summary),
        "eval_environment": environment(),
        "sets": sets,
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_one(exp: Experiment, run: Run, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train (or resume), evaluate and record one run; returns its ``DONE.json`` record."""
    out, record = _run_dir(exp, run), _record_dir(exp, run)
    status = run_status(exp, run)
    if status == "stale":
        raise ExperimentError(
            f"{record} was started with another configuration than run {run.id} has now; delete the folder or use "
            "another runs_dir"
        )
    if status == "precision":
        raise ExperimentError(_precision_message(exp, [run]))
    if status == "done":
        return json.loads((record / DONE_FILE).read_text())
    t0 = time.perf_counter()
    fingerprint = run_fingerprint(run)
    started = {"run": run.id, "fingerprint": fingerprint, "config": run.config, "precision": run_precision(run)}
    _write_json(record / "run.json", started)
    train_summary = None
    if not run.is_baseline:
        if status != "evaluate":
            log(f"training {run.id} ({status})")
        train_summary = _train(exp, run, log)
    sets = _evaluate(exp, run, log, progress)
    earlier = _read_json(record / DONE_FILE) or {}  # the record of other experiments sharing runs_dir, if any
    sets = {**{k: v for k, v in earlier.get("sets", {}).items() if k not in sets}, **sets}
    seconds = earlier.get("seconds", 0.0) + time.perf_counter() - t0
    done = _record(run, fingerprint, train_summary, sets, seconds)
    _write_json(record / DONE_FILE, done)
    if not exp.keep_checkpoints:  # only a resume needs them; final/ stays
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    return done


def _precision_message(exp: Experiment, runs: Sequence[Run]) -> str:
    """Why runs recorded at another precision are not continued here, and the two ways on."""
    record = _record_dir(exp, runs[0])
    was = recorded_precision(_read_json(record / DONE_FILE) or _read_json(record / "run.json"), runs[0].config)
    now = run_precision(runs[0])
    names = ", ".join(r.id for r in runs[:4]) + (f" and {len(runs) - 4} more" if len(runs) > 4 else "")
    return (
        f"{len(runs)} run(s) ({names}) of {exp.name} were recorded at precision {was}, and this machine would train "
        f"them at {now}: results of the two are not mixed. Set precision: {was} in the experiment's base to "
        f"continue them at {was}, or give it another records_dir and runs_dir to rerun everything at {now}"
    )


def _duration(seconds: float) -> str:
    """``1h05m``, ``12m30s`` or ``45s``."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_progress(done: int, total: int, elapsed: float, durations: Sequence[float], current: str = "") -> str:
    """``runs done/total, left, elapsed, ETA``; ETA = mean duration of the runs finished in this process × runs
    left (unknown until one has finished)."""
    left = total - done
    eta = _duration(sum(durations) / len(durations) * left) if durations else "?"
    line = f"[{done}/{total} runs done, {left} left] elapsed {_duration(elapsed)}, ETA {eta}"
    return f"{line} | {current}" if current else line


def _select(runs: Sequence[Run], only: str | None) -> list[Run]:
    """Runs whose id matches the glob ``only`` (a plain string matches as a substring)."""
    if not only:
        return list(runs)
    pattern = only if any(c in only for c in "*?[") else f"*{only}*"
    return [r for r in runs if fnmatch.fnmatchcase(r.id, pattern)]


class _Progress:
    """One experiment's progress line, on ``stream`` and in ``<output_dir>/progress.log``."""

    def __init__(self, exp: Experiment, total: int, stream: Any) -> None:
        self.exp, self.total, self.stream = exp, total, stream
        self.done, self.durations, self.t0 = 0, [], time.perf_counter()
        root = Path(exp.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.logfile = root / "progress.log"

    def log(self, message: str) -> None:
        line = format_progress(self.done, self.total, time.perf_counter() - self.t0, self.durations, message)
        print(line, file=self.stream or sys.stderr, flush=True)
        with self.logfile.open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.exp.name} {line}\n")


def run_experiments(
    exps: Sequence[Experiment], *, only: str | None = None, progress: bool = True, stream: Any = None
) -> list[list[dict[str, Any]]]:
    """Run several experiments together, run-major: each run id (in order of first appearance) is trained once and
    evaluated for every experiment that has it before the next run starts, so a run shared through ``runs_dir`` is
    evaluated on all their sets while its model is at hand (records outlive models; see ``records_dir``).
    Finished runs are skipped; a progress line per experiment (see :func:`run_experiment`). Returns each
    experiment's ``DONE.json`` records."""
    plans = [(exp, _select(expand_grid(exp), only)) for exp in exps]
    for exp, runs in plans:  # before anything starts: never a grid of two precisions
        other = [r for r in runs if run_status(exp, r) == "precision"]
        if other:
            raise ExperimentError(_precision_message(exp, other))
    meters = [_Progress(exp, len(runs), stream) for exp, runs in plans]
    by_id: dict[str, list[tuple[int, Run]]] = {}
    for i, (_, runs) in enumerate(plans):
        for run in runs:
            by_id.setdefault(run.id, []).append((i, run))
    records: list[list[dict[str, Any]]] = [[] for _ in exps]
    for entries in by_id.values():
        for i, run in entries:
            exp, meter = plans[i][0], meters[i]
            skip = run_status(exp, run) == "done"
            started = time.perf_counter()
            records[i].append(run_one(exp, run, meter.log, progress))
            if not skip:
                meter.durations.append(time.perf_counter() - started)
            meter.done += 1
            meter.log(f"{'skipped (done)' if skip else 'finished'} {run.id}")
    return records


def run_experiment(
    exp: Experiment, *, only: str | None = None, progress: bool = True, stream: Any = None
) -> list[dict[str, Any]]:
    """Run every (selected) run in order, skipping finished ones; a progress line on ``stream`` (default stderr)
    and in ``<output_dir>/progress.log``. Returns the ``DONE.json`` records."""
    return run_experiments([exp], only=only, progress=progress, stream=stream)[0]


# -------------------------------------------------------------------------------------------------- statistics


def _t_mass(t: float, df: int) -> float:
    """P(|T| ≤ t), T ~ Student(df), df an integer: the finite series in θ = atan(t/√df) (Abramowitz–Stegun 26.7)."""
    theta = math.atan(t / math.sqrt(df))
    c2, total = math.cos(theta) ** 2, 0.0
    if df % 2 == 1:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(3, df - 1, 2):  # cosθ + (2/3)cos³θ + (2·4)/(3·5)cos⁵θ + … + cos^(df−2)θ
            term *= c2 * (k - 1) / k
            total += term
            if term < 1e-17 * total:
                break
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0
    for k in range(2, df - 1, 2):  # 1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + … + cos^(df−2)θ
        term *= c2 * (k - 1) / k
        total += term
        if term < 1e-17 * total:
            break
    return math.sin(theta) * total


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t quantile t_{(1+c)/2, df}: the t with P(|T| ≤ t) = c (bisection on :func:`_t_mass`)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while _t_mass(hi, df) < confidence:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_mass(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval ``mean ± t_{(1+c)/2, n−1}·s/√n`` (``s``: sample sd with n − 1); n = 1: NaN bounds,
    n = 0: all NaN."""
    from targetsft.evaluate import mean_interval

    return mean_interval(values, lambda n: t_quantile(n - 1, confidence))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar test on ``b`` (A right, B wrong) and ``c`` (A wrong, B right) discordant pairs:
    ``p = min(1, 2·Σ_{i ≤ min(b,c)} C(b+c, i)/2^(b+c))``; 1 without discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def paired_comparison(
    a: dict[Any, dict[str, float]], b: dict[Any, dict[str, float]], *, binary: bool, confidence: float = 0.95
) -> dict[str, Any]:
    """A − B over the same problems and seeds. ``a``/``b``: ``{seed: {problem id: value}}`` (a side with the single
    seed None, a baseline, pairs with every seed of the other). Per problem the mean over seeds of ``a − b``, its
    mean and t-interval over problems; for 0/1 values also McNemar on the discordant (seed, problem) pairs."""
    if None in a or None in b:  # a baseline: its one evaluation pairs with every seed of the other side
        seeds = sorted((set(a) | set(b)) - {None}) or [None]
    else:
        seeds = sorted(set(a) & set(b))
    diffs: dict[str, list[float]] = {}
    n_ab = n_ba = 0
    for s in seeds:
        va, vb = (a[s] if s in a else a[None]), (b[s] if s in b else b[None])
        for pid in va.keys() & vb.keys():
            diffs.setdefault(pid, []).append(va[pid] - vb[pid])
            n_ab += va[pid] > vb[pid]
            n_ba += va[pid] < vb[pid]
    per_problem = [math.fsum(d) / len(d) for d in diffs.values()]
    mean, lo, hi = t_interval(per_problem, confidence)
    lo, hi = max(-1.0, lo), min(1.0, hi)  # differences of fractions
    verdict = "win" if lo > 0 else "loss" if hi < 0 else "tie"
    return {
        "diff": mean,
        "lo": lo,
        "hi": hi,
        "n_problems": len(per_problem),
        "n_seeds": len(seeds),
        "a_better": n_ab,
        "b_better": n_ba,
        "p_mcnemar": mcnemar_exact(n_ab, n_ba) if binary else None,
        "verdict": verdict if not math.isnan(lo) else "n/a",
    }


# ------------------------------------------------------------------------------------------------- aggregation


def done_records(exp: Experiment) -> list[dict[str, Any]]:
    """The ``DONE.json`` records of the experiment's finished runs, in grid order: those evaluated on every set of
    the experiment with its current spec (a run shared through ``runs_dir`` may be done for another experiment and
    not yet for this one)."""
    out = []
    for run in expand_grid(exp):
        record = _read_json(_record_dir(exp, run) / DONE_FILE)
        if _holds_every_set(record, exp):
            out.append(record)
    return out


def check_one_precision(exp: Experiment, records: Sequence[dict[str, Any]]) -> list[str]:
    """The training precisions of the finished runs' records (``unknown`` where a record says none); more than one
    is an :class:`ExperimentError` naming a run of each: runs trained at two precisions are never pooled or
    compared."""
    configs = {r.id: r.config for r in expand_grid(exp)}
    by_precision: dict[str, str] = {}
    for record in records:
        if record["run"] != BASELINE_ID:
            precision = recorded_precision(record, configs.get(record["run"])) or "unknown"
            by_precision.setdefault(precision, record["run"])
    if len(by_precision) > 1:
        named = "; ".join(f"{run} at {p}" for p, run in by_precision.items())
        raise ExperimentError(
            f"{exp.name}: its finished runs were trained at different precisions ({named}); results of different "
            "precisions are not pooled or compared: rerun the odd ones at one precision (see the precision key)"
        )
    return sorted(by_precision)


def primary_metrics(spec: EvalSpec, kind: str) -> list[str]:
    """The metrics tabulated and compared: ``spec.metrics``, else Average@k (k > 1) and greedy for generation
    (``average@1`` when sampling once without greedy), ``accuracy`` for multiple choice."""
    if spec.metrics:
        return list(spec.metrics)
    if kind == "multiple_choice":
        return ["accuracy"]
    out = [f"average@{spec.samples}"] if spec.samples > 1 or (spec.temperature or 0) > 0 else []
    return out + ["greedy"] if spec.greedy else out or ["average@1"]


def per_problem_values(path: Path, metric: str, normalize: str = "mean") -> dict[str, float]:
    """``{problem id: value}`` of ``metric`` from an evaluation JSONL (``<set>.generations.jsonl``: greedy,
    average@k, pass@k; ``<set>.mc.jsonl``: accuracy, accuracy_mean, accuracy_sum)."""
    from targetsft.data.sft import read_jsonl

    out = {}
    for rec in read_jsonl(path):
        if "answer_index" in rec:
            by_sum = metric == "accuracy_sum" or (metric, normalize) == ("accuracy", "sum")
            out[rec["id"]] = float(rec["pred_sum" if by_sum else "pred_mean"] == rec["answer_index"])
        elif metric == "greedy":
            out[rec["id"]] = float(rec["greedy"]["correct"])
        elif metric.startswith("average@"):
            out[rec["id"]] = sum(s["correct"] for s in rec["samples"]) / len(rec["samples"])
        elif metric == f"pass@{len(rec['samples'])}":
            out[rec["id"]] = float(any(s["correct"] for s in rec["samples"]))
        else:
            raise ValueError(f"{path}: no per-problem values for metric {metric!r}")
    return out


def _configs(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by config id, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["config_id"], []).append(r)
    return out


def result_rows(records: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per run × set × metric (``results.csv``), for the sets ``labels`` (default all)."""
    rows = []
    for r in records:
        for label, res in r["sets"].items():
            if labels is not None and label not in labels:
                continue
            for metric, m in res["metrics"].items():
                rows.append(
                    {
                        "run": r["run"],
                        "config": r["config_id"],
                        "method": r["method"],
                        "params": json.dumps(r["params"], sort_keys=True),
                        "learning_rate": r["learning_rate"],
                        "seed": r["seed"],
                        "set": label,
                        "metric": metric,
                        **{k: m.get(k) for k in ("value", "lo", "hi", "n")},
                    }
                )
    return rows


def summary_rows(exp: Experiment, records: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict]:
    """Per config × set × primary metric: mean over seeds with its t-interval (``half``; ``lo``/``hi`` clipped to
    [0, 1]); with one run, that run's interval over problems (``interval = "problems"``)."""
    rows = []
    for spec in exp.eval:
        for cid, runs in _configs(records).items():
            res = [r["sets"][spec.label] for r in runs if spec.label in r["sets"]]
            if not res:
                continue
            for metric in primary_metrics(spec, res[0]["kind"]):
                ms = [x["metrics"][metric] for x in res if x["metrics"].get(metric, {}).get("value") is not None]
                if not ms:
                    continue
                mean, lo, hi = t_interval([m["value"] for m in ms], confidence)
                half, lo, hi, kind = hi - mean, max(0.0, lo), min(1.0, hi), "seeds"  # metrics are fractions
                if len(ms) == 1:
                    half, lo, hi, kind = math.nan, ms[0]["lo"], ms[0]["hi"], "problems"
                first = runs[0]
                rows.append(
                    {
                        "set": spec.label,
                        "metric": metric,
                        "config": cid,
                        "method": first["method"],
                        "params": first["params"],
                        "learning_rate": first["learning_rate"],
                        "mean": mean,
                        "half": half,
                        "lo": lo,
                        "hi": hi,
                        "n_runs": len(ms),
                        "interval": kind,
                        "values": [m["value"] for m in ms],
                    }
                )
    return rows


def _matches(entry: str, cid: str, method: str) -> bool:
    """A compare entry names a method, or is a glob over config ids (``*`` leaves the baseline out)."""
    if method == BASELINE_ID:
        return entry == BASELINE_ID
    return entry == method or fnmatch.fnmatchcase(cid, entry)


def _seed_values(root: Path, runs: Sequence[dict], spec: EvalSpec, metric: str) -> dict[Any, dict[str, float]]:
    """``{seed: {problem id: value}}`` of one config's runs on one set."""
    return {
        r["seed"]: per_problem_values(root / r["run"] / r["sets"][spec.label]["items"], metric, spec.normalize)
        for r in runs
    }


def comparison_rows(exp: Experiment, records: Sequence[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """Paired comparisons (:func:`paired_comparison`) of the ``compare`` pairs on every set's primary metrics."""
    configs = _configs(records)
    pairs: list[tuple[str, str]] = []
    for a_entry, b_entry in exp.compare:
        for a, ra in configs.items():
            for b, rb in configs.items():
                new = a != b and (a, b) not in pairs and (b, a) not in pairs
                if new and _matches(a_entry, a, ra[0]["method"]) and _matches(b_entry, b, rb[0]["method"]):
                    pairs.append((a, b))
    rows = []
    for spec in exp.eval:
        for a, b in pairs:
            sides = [[r for r in configs[c] if spec.label in r["sets"]] for c in (a, b)]
            if not all(sides):
                continue
            for metric in primary_metrics(spec, sides[0][0]["sets"][spec.label]["kind"]):
                a_values, b_values = (_seed_values(root, side, spec, metric) for side in sides)
                stats = paired_comparison(a_values, b_values, binary=metric in _BINARY_METRICS)
                rows.append({"set": spec.label, "metric": metric, "a": a, "b": b, **stats})
    return rows


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_markdown(
    exp: Experiment,
    summary: Sequence[dict],
    comparisons: Sequence[dict],
    n_runs: int,
    teachers: Sequence[dict] = (),
    probes: Sequence[dict] = (),
    precisions: Sequence[str] = (),
) -> str:
    """``results.md``: a table per set (configs × metrics, mean ± interval in %), the teachers' scores on the
    training labels (:func:`teacher_rows`), p_θ(y) on the probe examples (:func:`probe_rows`) and the paired
    comparisons; ``precisions``: the training precision of the runs (:func:`check_one_precision`)."""
    done = len({r["config"] for r in summary})
    trained = f" Training precision: {', '.join(precisions)}." if precisions else ""
    lines = [
        f"# {exp.name}",
        "",
        f"{n_runs} runs finished, {done} configurations.{trained} Values in %; mean over seeds "
        "± the 95% t-interval half-width [interval]; `*`: one run, its 95% interval over problems.",
        "",
    ]
    for spec in exp.eval:
        rows = [r for r in summary if r["set"] == spec.label]
        if not rows:
            continue
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        lines += [
            f"## {spec.label} ({spec.set})",
            "",
            "| config | runs | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for cid in dict.fromkeys(r["config"] for r in rows):
            cells, n = [], 0
            for metric in metrics:
                r = next((x for x in rows if x["config"] == cid and x["metric"] == metric), None)
                if r is None:
                    cells.append("—")
                    continue
                n = r["n_runs"]
                if r["interval"] == "problems":
                    cells.append(f"{_pct(r['mean'])} [{_pct(r['lo'])}, {_pct(r['hi'])}]*")
                else:
                    cells.append(f"{_pct(r['mean'])} ± {_pct(r['half'])} [{_pct(r['lo'])}, {_pct(r['hi'])}]")
            lines.append(f"| {cid} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if teachers:
        lines += [
            "## Teachers on the training labels",
            "",
            "Per supervised token of the training data, from each teacher's top-k cache: how often its top token is "
            "the label, how often the label is in its top-k, and its mean probability of the label (0 counted where "
            "the label is outside the top-k: a lower bound).",
            "",
            "| teacher | prompt | used by | tokens | top-1 = label | label in top-k | mean π_T(label) |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in teachers:
            lines.append(
                f"| {t['teacher']} | {t['prompt']} | {', '.join(t['configs'])} | {t['tokens']} | {_pct(t['top1'])} | "
                f"{_pct(t['in_topk'])} | {_pct(t['p_label'])} |"
            )
        lines.append("")
    if probes:
        lines += [
            "## p_θ(label) on the probe examples, start → end of training",
            "",
            "Per supervised token of the first training examples (`gamma_probe`), the model's probability of the "
            "label: γ itself for the γ = p_θ(y) methods, and for every method how well it fits its training labels. "
            "Mean over seeds.",
            "",
            f"| config | runs | tokens | last step | mean | 10% quantile | median | p < {probes[0]['bin']:g} "
            f"| p ≥ {1 - probes[0]['bin']:g} |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in probes:
            cells = " | ".join(f"{_pct(p[f'{k}_start'])} → {_pct(p[f'{k}_end'])}" for k in PROBE_KEYS)
            lines.append(f"| {p['config']} | {p['n_runs']} | {p['tokens']} | {p['step']} | {cells} |")
        lines.append("")
    if comparisons:
        lines += [
            "## Paired comparisons (A − B, same problems and seeds)",
            "",
            "Difference in points with its 95% t-interval over problems (per problem: mean over seeds); "
            "McNemar exact p on the discordant (seed, problem) pairs for 0/1 metrics. A win or loss only when "
            "the interval excludes 0.",
            "",
            "| set | metric | A | B | A − B [95%] | problems × seeds | A only / B only | p (McNemar) | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            p = "—" if c["p_mcnemar"] is None else f"{c['p_mcnemar']:.3g}"
            lines.append(
                f"| {c['set']} | {c['metric']} | {c['a']} | {c['b']} | {_pct(c['diff'])} [{_pct(c['lo'])}, "
                f"{_pct(c['hi'])}] | {c['n_problems']} × {c['n_seeds']} | {c['a_better']} / {c['b_better']} | {p} | "
                f"**{c['verdict']}** |"
            )
        lines.append("")
    return "\n".join(lines)


def teacher_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per teacher cache the runs trained from: the teacher, its prompt, the configs that used it and how
    it scores their training labels (``label_stats``: top-1 agreement, label in top-k, mean π_T(y))."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        info = (r.get("train") or {}).get("teacher")
        if not info:
            continue
        row = rows.setdefault(
            info["cache"],
            {
                "teacher": info["name"],
                "prompt": info["prompt"],
                "cache": info["cache"],
                "configs": [],
                **info["label_stats"],
            },
        )
        if r["config_id"] not in row["configs"]:
            row["configs"].append(r["config_id"])
    return list(rows.values())


PROBE_KEYS = ("mean", "q10", "q50", "low", "high")


def probe_rows(records: Sequence[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """One row per trained config with probe files: p_θ(y) on its probe examples at the first and the last recorded
    step (``<key>_start``, ``<key>_end``), each the mean over seeds of the run's mean, 10% quantile, median and the
    shares in the histogram's lowest (``low``: p < 1/bins) and highest (``high``: p ≥ 1 − 1/bins) bins."""

    def stats(d: dict[str, Any]) -> dict[str, float]:
        n, hist = d["n"], d["hist"]
        return {"mean": d["mean"], "q10": d["q10"], "q50": d["q50"], "low": hist[0] / n, "high": hist[-1] / n}

    groups: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for r in records:
        probe = _read_probe(root / r["run"] / PROBE_FILE)
        if not probe or r["method"] == BASELINE_ID:
            continue
        first, last = probe[min(probe)], probe[max(probe)]
        groups.setdefault(r["config_id"], []).append((stats(first), stats(last)))
        meta.setdefault(r["config_id"], {"tokens": last["n"], "step": max(probe), "bin": 1 / len(last["hist"])})
    rows = []
    for cid, runs in groups.items():
        row: dict[str, Any] = {"config": cid, "n_runs": len(runs), **meta[cid]}
        for i, when in enumerate(("start", "end")):
            row |= {f"{k}_{when}": math.fsum(run[i][k] for run in runs) / len(runs) for k in PROBE_KEYS}
        rows.append(row)
    return rows


def aggregate(exp: Experiment, *, plots: bool = True) -> dict[str, Any]:
    """Write ``results.csv``, ``summary.csv``, ``comparisons.csv``, ``probe.csv``, ``results.md`` and the plots from
    the finished runs (all trained at one precision, else :class:`ExperimentError`); returns the paths and the
    rows."""
    root = Path(exp.output_dir)
    records = done_records(exp)
    precisions = check_one_precision(exp, records)
    summary = summary_rows(exp, records)
    records_root = _records_root(exp)
    comparisons = comparison_rows(exp, records, records_root)
    probes = probe_rows(records, records_root)
    names = ("results.csv", "summary.csv", "comparisons.csv", "probe.csv", "results.md")
    paths = {name: root / name for name in names}
    atomic_write_csv(paths["results.csv"], result_rows(records, [s.label for s in exp.eval]))
    atomic_write_csv(
        paths["summary.csv"],
        [{**r, "params": json.dumps(r["params"]), "values": json.dumps(r["values"])} for r in summary],
    )
    atomic_write_csv(paths["comparisons.csv"], comparisons)
    atomic_write_csv(paths["probe.csv"], probes)
    teachers = teacher_rows(records)
    markdown = format_markdown(exp, summary, comparisons, len(records), teachers, probes, precisions)
    atomic_write_text(paths["results.md"], markdown)
    figures = write_plots(exp, records, summary) if plots else []
    return {
        "paths": paths,
        "plots": figures,
        "summary": summary,
        "comparisons": comparisons,
        "teachers": teachers,
        "probes": probes,
        "records": records,
    }


# ------------------------------------------------------------------------------------------------------- plots


def _read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """The trainer's ``metrics.csv`` as float rows (empty cells dropped)."""
    if not path.is_file():
        return []
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def _colors(names: Iterable[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(dict.fromkeys(names))}


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_accuracy(rows: Sequence[dict], label: str, metric: str, path: Path) -> Path:
    """Mean per config with its interval (error bars), coloured by method."""
    import matplotlib.pyplot as plt

    colors = _colors(r["method"] for r in rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.8))
    for i, r in enumerate(rows):
        lo, hi = (r["lo"], r["hi"]) if r["lo"] is not None and not math.isnan(r["lo"]) else (r["mean"], r["mean"])
        ax.bar(i, 100 * r["mean"], color=colors[r["method"]], alpha=0.8)
        ax.errorbar(
            i, 100 * r["mean"], yerr=[[100 * (r["mean"] - lo)], [100 * (hi - r["mean"])]], color="black", capsize=4
        )
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{label}: {metric}, mean and 95% interval over seeds (one run: over problems)", fontsize=8)
    return _save(fig, path)


def _plot_curves(records: Sequence[dict], root: Path, keys: Sequence[str], path: Path) -> Path | None:
    """``keys`` (columns of metrics.csv) against the step, one line per run, coloured by config."""
    import matplotlib.pyplot as plt

    series = [(r, _read_metrics_csv(root / r["run"] / "metrics.csv")) for r in records]
    series = [(r, rows) for r, rows in series if rows and all(k in rows[0] for k in keys)]
    if not series:
        return None
    colors = _colors(r["config_id"] for r, _ in series)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        labelled: set[str] = set()
        for r, rows in series:
            cid = r["config_id"]
            ax.plot(
                [x["step"] for x in rows],
                [x[key] for x in rows],
                color=colors[cid],
                lw=1,
                label=None if cid in labelled else cid,
            )
            labelled.add(cid)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    axes[0][0].legend(fontsize=6)
    return _save(fig, path)


def _plot_gamma_distribution(records: Sequence[dict], root: Path, path: Path) -> Path | None:
    """γ = p_θ(y) on the probe examples against the step: median, 25–75% and 10–90% bands, one panel per config
    (its first seed)."""
    import matplotlib.pyplot as plt

    first: dict[str, tuple[dict, dict]] = {}
    for r in records:
        probe = _read_probe(root / r["run"] / PROBE_FILE)
        if probe and r["config_id"] not in first:
            first[r["config_id"]] = (r, probe)
    if not first:
        return None
    fig, axes = plt.subplots(1, len(first), figsize=(4.5 * len(first), 3.8), squeeze=False, sharey=True)
    for ax, (cid, (r, probe)) in zip(axes[0], first.items(), strict=True):
        steps = sorted(probe)
        q = {k: [probe[s][k] for s in steps] for k in ("q10", "q25", "q50", "q75", "q90", "mean")}
        ax.fill_between(steps, q["q10"], q["q90"], alpha=0.2, label="10–90%")
        ax.fill_between(steps, q["q25"], q["q75"], alpha=0.4, label="25–75%")
        ax.plot(steps, q["q50"], label="median")
        ax.plot(steps, q["mean"], ls="--", label="mean")
        ax.set_title(f"{cid} (seed {r['seed']})", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("γ = p(label) on probe examples")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _plot_vs(rows: Sequence[dict], key: str, path: Path, log_x: bool = False) -> Path:
    """Accuracy (mean over seeds, interval) against a parameter, one line per method × metric."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["metric"]), []).append(r)
    for (method, metric), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["x"])
        ys = [100 * r["mean"] for r in rs]
        lo = [100 * (r["mean"] - r["lo"]) if r["lo"] is not None and not math.isnan(r["lo"]) else 0 for r in rs]
        hi = [100 * (r["hi"] - r["mean"]) if r["hi"] is not None and not math.isnan(r["hi"]) else 0 for r in rs]
        ax.errorbar([r["x"] for r in rs], ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{method} {metric}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(exp: Experiment, records: Sequence[dict], summary: Sequence[dict]) -> list[Path]:
    """PNGs in ``<output_dir>/plots/``: accuracy per config and set (with intervals); training curves (loss, NLL);
    for dft vs target_sft the mean γ per logging step (metrics.csv) and its distribution on the probe examples
    (``gamma_probe.jsonl``); accuracy vs η (target_sft) and vs learning rate, where the grid varies them."""
    import matplotlib

    matplotlib.use("Agg")
    root, plots = _records_root(exp), Path(exp.output_dir) / "plots"
    safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s)  # noqa: E731
    out = []
    for label, metric in dict.fromkeys((r["set"], r["metric"]) for r in summary):
        rows = [r for r in summary if (r["set"], r["metric"]) == (label, metric)]
        out.append(_plot_accuracy(rows, label, metric, plots / f"accuracy_{safe(label)}_{safe(metric)}.png"))
    trained = [r for r in records if r["method"] != BASELINE_ID]
    out.append(_plot_curves(trained, root, ("loss", "nll"), plots / "training_curves.png"))
    gamma_runs = [r for r in trained if r["method"] in ("dft", "target_sft")]
    out.append(_plot_curves(gamma_runs, root, ("gamma",), plots / "gamma.png"))
    out.append(_plot_gamma_distribution(gamma_runs, root, plots / "gamma_distribution.png"))
    for label in dict.fromkeys(r["set"] for r in summary):
        eta = [{**r, "x": r["params"]["eta"]} for r in summary if r["set"] == label and r["method"] == "target_sft"]
        if len({r["x"] for r in eta}) > 1:
            out.append(_plot_vs(eta, "η (target_sft)", plots / f"accuracy_vs_eta_{safe(label)}.png"))
        lr = [{**r, "x": r["learning_rate"]} for r in summary if r["set"] == label and r["learning_rate"]]
        if any(len({r["x"] for r in lr if r["method"] == m}) > 1 for m in {r["method"] for r in lr}):
            out.append(_plot_vs(lr, "learning rate", plots / f"accuracy_vs_lr_{safe(label)}.png", log_x=True))
    return [p for p in out if p is not None]


# --------------------------------------------------------------------------------------------------------- CLI


def format_plan(exp: Experiment, runs: Sequence[Run]) -> str:
    """The runs of a dry run: index, id, method, status, folder."""
    lines = [f"experiment {exp.name}: {len(runs)} runs, eval sets {[s.label for s in exp.eval]}"]
    for i, run in enumerate(runs, 1):
        lines.append(f"{i:4d}  {run.id:<48s} {run.method:<20s} {run_status(exp, run):<9s} {_run_dir(exp, run)}")
    return "\n".join(lines)


def add_experiment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft experiment`` options to ``parser`` (then call :func:`run_experiment_from_args`)."""
    parser.add_argument(
        "--config",
        required=True,
        action="append",
        help="experiment YAML (see experiments/); repeat it to run several together, run-major (a shared run is "
        "trained once and evaluated for all of them while its model is at hand)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    parser.add_argument("--only", metavar="PATTERN", help="run only the runs whose id matches (glob or substring)")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the results and plots")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no per-batch progress bars")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def run_experiment_from_args(args: argparse.Namespace) -> int:
    """Run ``target-sft experiment`` from parsed options; 0 on success, 2 on a configuration error."""
    from targetsft.preflight import check_data, check_model

    try:
        exps = [load_experiment(path) for path in args.config]
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"target-sft experiment: config error: {err}", file=sys.stderr)
        return 2
    if not args.aggregate_only:
        checked = set()
        for run in (r for exp in exps for r in expand_grid(exp) if not r.is_baseline):
            model, data = run.config.get("model"), run.config.get("data") or {}
            key = json.dumps([model, data], default=str)
            if key not in checked:  # an InputError: one line and status 2 from the console script
                check_model(model)
                check_data(data.get("train", "gsm-train"), data.get("size"), data.get("seed"))
                checked.add(key)
    if args.dry_run:
        print("\n".join(format_plan(exp, _select(expand_grid(exp), args.only)) for exp in exps))
        return 0
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if not args.aggregate_only:
        try:
            run_experiments(exps, only=args.only, progress=args.progress)
        except ExperimentError as err:
            print(f"target-sft experiment: {err}", file=sys.stderr)
            return 1
    for exp in exps:
        result = aggregate(exp)
        print(Path(result["paths"]["results.md"]).read_text())
    return 0
