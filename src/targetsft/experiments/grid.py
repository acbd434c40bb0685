"""Experiment grids (``target-sft experiment --config experiments/<name>.yaml``): the schema, the runs it expands
to, and where their tables and model folders are (each run's record: :mod:`~targetsft.experiments.records`).

An experiment is a grid of runs (methods × parameters × seeds) over one model and data setup; its YAML schema and
how runs are named are on the docs site's Experiments page (``docs/experiments.md``). Every run's TrainConfig is
built with :func:`~targetsft.training.config.config_from_dict` when the experiment is loaded, before anything starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from targetsft.losses.methods import get_method
from targetsft.training.config import (
    TRAIN_DEFAULTS,
    ConfigError,
    build_section,
    config_from_dict,
    load_yaml,
    unknown_key,
)

if TYPE_CHECKING:
    from targetsft.evaluation.options import ChoiceOptions, DecodeOptions

EVAL_DTYPES = ("float32", "bfloat16", "float16")


BASELINE_ID = "base"


DEFAULT_COMPARE = (("*", "sft"), ("target_sft", "dft"))


RANK_KEYS = ("sets", "among", "top", "seeds", "metric")


_ABBREV = {"learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "bs", "label_noise": "noise"}


_GEN_KEYS = ("samples", "temperature", "top_p", "greedy", "max_new_tokens", "seed", "prompt")


_MC_KEYS = ("normalize",)


_MC_METRICS = ["accuracy", "accuracy_mean", "accuracy_sum"]


BINARY_METRICS = ("greedy", "average@1", *_MC_METRICS)


class ExperimentError(RuntimeError):
    """A run folder that cannot be used as it is (another configuration, a missing teacher run)."""


@dataclass
class EvalSpec:
    """One evaluation set and its options (see :func:`targetsft.evaluation.suite.evaluate`); ``name`` labels it
    (default: the set's name), ``metrics`` picks the metrics tabulated and compared (default:
    :func:`~targetsft.experiments.comparisons.primary_metrics`)."""

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
    engine: str = "compact"

    @property
    def label(self) -> str:
        from targetsft.evaluation.generation_set import set_label

        return self.name or set_label(self.set)

    def decode_options(self, engine: str) -> DecodeOptions:
        """The spec's decoding, for a generative set, with ``engine`` (the engine the runner opened)."""
        from targetsft.evaluation.options import DecodeOptions

        return DecodeOptions(
            samples=self.samples,
            temperature=self.temperature,
            top_p=self.top_p,
            greedy=self.greedy,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size or 32,
            seed=self.seed,
            prompt=self.prompt,
            engine=engine,
        )

    def choice_options(self) -> ChoiceOptions:
        """The spec's scoring, for a multiple-choice set."""
        from targetsft.evaluation.options import ChoiceOptions

        return ChoiceOptions(batch_size=self.batch_size or 16, normalize=self.normalize)

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
    snapshot_steps: list[int] = field(default_factory=list)


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
    results_dir: str | None = None
    runs_dir: str | None = None
    records_dir: str | None = None
    teacher_cache_dir: str | None = None
    compare: list[list[str]] = field(default_factory=lambda: [list(p) for p in DEFAULT_COMPARE])
    select: dict[str, str] | None = None
    rank: dict[str, Any] | None = None


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


def eval_spec(raw: Any, where: str) -> EvalSpec:
    spec = build_section(EvalSpec, raw, where)
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
            raise unknown_key(f"{where} ({kind} set {spec.set!r})", key, valid)
    if spec.samples > 1 and spec.temperature == 0:
        raise ConfigError(f"{where}: samples > 1 needs temperature > 0 (greedy samples are identical)")
    if spec.normalize not in ("mean", "sum"):
        raise ConfigError(f"{where}: normalize must be 'mean' or 'sum', got {spec.normalize!r}")
    from targetsft.evaluation.prompts import PROMPT_STYLES

    if spec.prompt not in PROMPT_STYLES:
        raise ConfigError(f"{where}: prompt must be one of {PROMPT_STYLES}, got {spec.prompt!r}")
    from targetsft.evaluation.engines import ENGINES

    if spec.engine not in ENGINES:
        raise ConfigError(f"{where}: engine must be one of {ENGINES}, got {spec.engine!r}")
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
            raise unknown_key("the experiment", key, valid)
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
    grid = [build_section(RunGroup, g, f"grid[{i}]") for i, g in enumerate(raw["grid"])]
    specs = [eval_spec(e, f"eval[{i}]") for i, e in enumerate(raw["eval"])]
    exp = Experiment(**{**raw, "grid": grid, "eval": specs, "base": raw.get("base") or {}})
    _check_experiment(exp)
    return exp


def _check_rank(rank: Any, labels: list[str]) -> None:
    """``rank: {sets, among?, top?, seeds?, metric?}`` (see the module docstring)."""
    if not isinstance(rank, dict) or "sets" not in rank:
        raise ConfigError(
            f"rank must be a mapping {{sets: [<eval label>, ..], among?, top?, seeds?, metric?}}, got {rank!r}"
        )
    for key in rank:
        if key not in RANK_KEYS:
            raise unknown_key("rank", key, list(RANK_KEYS))
    sets = rank["sets"]
    if not isinstance(sets, list) or not sets or len(set(sets)) != len(sets):
        raise ConfigError(f"rank.sets must be a non-empty list of distinct eval labels, got {sets!r}")
    for label in sets:
        if label not in labels:
            raise ConfigError(f"rank.sets: {label!r} is not an eval set of the experiment ({labels})")
    if not isinstance(rank.get("among", "*"), str):
        raise ConfigError(f"rank.among must be a glob over config ids, got {rank['among']!r}")
    top = rank.get("top", 1)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"rank.top must be an int >= 1, got {top!r}")
    seeds = rank.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(isinstance(x, int) for x in seeds)):
        raise ConfigError(f"rank.seeds must be a non-empty list of ints, got {seeds!r}")
    if not isinstance(rank.get("metric", ""), str):
        raise ConfigError(f"rank.metric must be a metric name, got {rank['metric']!r}")


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML (see the module docstring)."""
    import yaml

    try:
        raw = load_yaml(Path(path).read_text())
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
    for key, folder in (("output_dir", exp.output_dir), ("results_dir", exp.results_dir)):
        if folder is not None and not (isinstance(folder, str) and folder):
            raise ConfigError(f"{key} must be a folder path, got {folder!r}")
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
    if exp.select is not None:
        if not isinstance(exp.select, dict) or "set" not in exp.select:
            raise ConfigError(f"select must be a mapping {{set: <eval label>, metric?: <metric>}}, got {exp.select!r}")
        for key in exp.select:
            if key not in ("set", "metric"):
                raise unknown_key("select", key, ["set", "metric"])
        if exp.select["set"] not in labels:
            raise ConfigError(f"select.set {exp.select['set']!r} is not an eval set of the experiment ({labels})")
    if exp.rank is not None:
        _check_rank(exp.rank, labels)
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
    if group.snapshot_steps:  # only when asked for: the configs (hence fingerprints) of other runs stay as they were
        cfg["snapshot_steps"] = list(group.snapshot_steps)
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
    return [dataclasses.replace(r, config={**r.config, "output_dir": str(run_dir(exp, r))}) for r in ordered]


def rate_family(config_id: str, learning_rate: float | None) -> str:
    """The config id without its learning rate: configs of one family differ only in their rate."""
    return (
        config_id
        if learning_rate is None
        else config_id.replace(f"-{_ABBREV['learning_rate']}{_fmt(learning_rate)}", "", 1)
    )


def teacher_run_id(model: Any) -> str | None:
    """The run id in a ``teacher.model: "@<run id>"`` (or ``"@<run id>@<step>"``) reference to an earlier run of the
    grid, else ``None``."""
    return model[1:].split("@")[0] if isinstance(model, str) and model.startswith("@") else None


def teacher_run_step(model: Any) -> int | None:
    """The step of a ``"@<run id>@<step>"`` reference (that run's snapshot after ``step`` optimizer steps; it must
    list the step in its ``snapshot_steps``), else ``None`` (its final model)."""
    if teacher_run_id(model) is None or model.count("@") < 2:
        return None
    step = model.rsplit("@", 1)[1]
    if not step.isdigit() or int(step) < 1:
        raise ConfigError(f"teacher.model {model!r}: the part after the second @ must be a step number")
    return int(step)


def teacher_run_model_dir(run_folder: Path, model: str) -> Path:
    """The model folder a ``"@<run id>[@<step>]"`` reference names inside that run's folder: ``final`` or its
    snapshot after the step (:func:`targetsft.training.callbacks.snapshot_dir`)."""
    from targetsft.training.callbacks import snapshot_dir

    step = teacher_run_step(model)
    return run_folder / "final" if step is None else snapshot_dir(run_folder, step)


def teacher_ref(run: Run) -> str | None:
    return teacher_run_id((run.config.get("teacher") or {}).get("model"))


def teacher_configs(runs: Sequence[Run]) -> set[str]:
    """The config ids of the runs that another run of ``runs`` takes as its teacher (``"@<run id>[@<step>]"``)."""
    refs = {teacher_ref(r) for r in runs}
    return {r.config_id for r in runs if r.id in refs}


def _check_teacher_refs(runs: Sequence[Run]) -> None:
    """A ``teacher.model: "@<run id>"`` must name a run that comes earlier in the grid."""
    position = {r.id: i for i, r in enumerate(runs)}
    for i, run in enumerate(runs):
        ref = teacher_ref(run)
        if ref is not None and not position.get(ref, i) < i:
            where = "comes later" if ref in position else "is not in the grid"
            raise ConfigError(f"run {run.id}: its teacher run {ref!r} {where}; list the teacher's group first")
        step = teacher_run_step((run.config.get("teacher") or {}).get("model"))
        if step is not None and step not in runs[position[ref]].config.get("snapshot_steps", []):
            raise ConfigError(
                f"run {run.id}: its teacher is {ref!r} after {step} steps, but that run keeps no snapshot there; "
                f"add {step} to its group's snapshot_steps"
            )


def tables_dir(exp: Experiment, update_results: bool = False) -> Path:
    """Where the experiment's tables, plots and progress log are written: ``output_dir``; with ``update_results``
    the tables and plots go to the committed ``results_dir`` instead (a :class:`ConfigError` if it has none)."""
    if not update_results:
        return Path(exp.output_dir)
    if not exp.results_dir:
        raise ConfigError(
            f"--update-results: experiment {exp.name!r} has no results_dir (the folder of its committed tables) to "
            f"update; set results_dir in its YAML, or leave out --update-results to write to its output_dir "
            f"({exp.output_dir})"
        )
    return Path(exp.results_dir)


def runs_root(exp: Experiment) -> Path:
    return Path(exp.runs_dir) if exp.runs_dir else Path(exp.output_dir) / "runs"


def run_dir(exp: Experiment, run: Run) -> Path:
    """The run's models and checkpoints (the trainer's ``output_dir``)."""
    return runs_root(exp) / run.id
