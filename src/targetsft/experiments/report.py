"""Aggregating finished runs into tables.

Outputs, in :func:`~targetsft.experiments.grid.tables_dir` (the experiment's ``output_dir``; its committed
``results_dir`` with ``update_results``): ``results.csv`` (one row per run × set × metric), ``summary.csv`` and
``results.md`` (mean ± interval over seeds), ``comparisons.csv``, ``selection.csv`` (the learning rate chosen on
the validation set, for an experiment with ``select``), ``ranking.csv`` (the configs chosen on validation sets,
for one with ``rank``), ``probe.csv`` (p_θ(y) on the probe examples, start
and end of training), ``training.csv`` (the target statistics over training), ``teachers.csv`` (each teacher's
students), ``predictors.csv`` (the rank correlation of teacher properties with the students' accuracy, where three
or more students each had a teacher of their own), ``plots/*.png``; the runner's ``progress.log`` is in
``output_dir``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from statistics import fmean
from typing import Any, TypeVar

from targetsft.experiments.comparisons import (
    by_config,
    comparison_rows,
    primary_metrics,
    ranked_configs,
    ranking_rows,
    selection_rows,
)
from targetsft.experiments.grid import BASELINE_ID, EvalSpec, Experiment, ExperimentError, expand_grid, tables_dir
from targetsft.experiments.plots import write_plots
from targetsft.experiments.records import (
    DONE_FILE,
    PROBE_FILE,
    holds_every_set,
    read_metrics_csv,
    read_record,
    record_dir,
    recorded_precision,
    records_root,
)
from targetsft.experiments.statistics import EXACT_PERMUTATIONS_UP_TO, t_interval
from targetsft.experiments.teachers import build_suffix, predictor_rows, teacher_points, teacher_rows
from targetsft.runtime.files import atomic_write_csv, atomic_write_text
from targetsft.training.scoring import read_probe


def done_records(exp: Experiment) -> list[dict[str, Any]]:
    """The ``DONE.json`` records of the experiment's finished runs (:func:`~targetsft.experiments.records.read_record`:
    in the current layout), in grid order: those evaluated on every set of the experiment with its current spec (a
    run shared through ``runs_dir`` may be done for another experiment and not yet for this one)."""
    out = []
    for run in expand_grid(exp):
        record = read_record(record_dir(exp, run) / DONE_FILE)
        if holds_every_set(record, exp):
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
        for cid, runs in by_config(records).items():
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


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _interval(mean: float, lo: float | None, hi: float | None) -> str:
    return f"{_pct(mean)} [{_pct(lo)}, {_pct(hi)}]"


Row = TypeVar("Row")


def from_row(cls: type[Row], row: Mapping[str, Any]) -> Row:
    """The dataclass ``cls`` with each field read from the row's key of the same name."""
    return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Table:
    """A section of ``results.md``: ``## title``, a note (none when empty), a table of ``columns`` with its rows."""

    title: str
    note: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]

    def lines(self) -> list[str]:
        """The section's lines, the last one empty."""
        out = [f"## {self.title}", "", *([self.note, ""] if self.note else [])]
        out += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return [*out, *("| " + " | ".join(str(cell) for cell in row) + " |" for row in self.rows), ""]


@dataclass(frozen=True)
class Estimate:
    """A config's mean on one set and metric with its interval: over seeds (``half`` its half-width), or, from one
    run, over problems (``over_problems``)."""

    mean: float
    lo: float | None
    hi: float | None
    n_runs: int
    over_problems: bool
    half: float = math.nan


def estimate(row: Mapping[str, Any]) -> Estimate:
    """The :class:`Estimate` of a row of :func:`teacher_points`, without its half-width."""
    return Estimate(row["mean"], row["lo"], row["hi"], row["n_runs"], row["interval"] == "problems")


def summary_estimate(row: Mapping[str, Any]) -> Estimate:
    """The :class:`Estimate` of a row of :func:`summary_rows`, with its half-width where it is over seeds."""
    e = estimate(row)
    return e if e.over_problems else replace(e, half=row["half"])


def marked_interval(e: Estimate) -> str:
    """``mean [lo, hi]`` in %, with ``*`` where the interval is one run's over problems."""
    return _interval(e.mean, e.lo, e.hi) + ("*" if e.over_problems else "")


def summary_cell(e: Estimate | None) -> str:
    """A cell of a set's table: ``mean ± half [lo, hi]`` over seeds, :func:`marked_interval` over problems, ``—``
    where the config has no value of the metric."""
    if e is None:
        return "—"
    if e.over_problems:
        return marked_interval(e)
    return f"{_pct(e.mean)} ± {_pct(e.half)} [{_pct(e.lo)}, {_pct(e.hi)}]"


@dataclass(frozen=True)
class TeacherScores:
    """A teacher build's scores on the training labels (a row of :func:`teacher_rows`); ``topk_entropy`` is ``None``
    in records older than it."""

    name: str
    prompt: str
    configs: Sequence[str]
    tokens: int
    top1: float
    in_topk: float
    p_label: float
    temperature: float
    topk_entropy: float | None


def teacher_scores(row: Mapping[str, Any]) -> TeacherScores:
    """The :class:`TeacherScores` of a row of :func:`teacher_rows`, named with its build where it has one."""
    return TeacherScores(
        name=row["teacher"] + build_suffix(row),
        prompt=row["prompt"],
        configs=row["configs"],
        tokens=row["tokens"],
        top1=row["top1"],
        in_topk=row["in_topk"],
        p_label=row["p_label"],
        temperature=row.get("temperature", 1.0),
        topk_entropy=row.get("topk_entropy"),
    )


@dataclass(frozen=True)
class Student:
    """A student's accuracy on one set beside its teacher's scores (a row of :func:`teacher_points`)."""

    set: str
    teacher: str
    top1: float
    topk_entropy: float | None
    config: str
    metric: str
    accuracy: Estimate


def student(row: Mapping[str, Any]) -> Student:
    """The :class:`Student` of a row of :func:`teacher_points`."""
    return Student(
        set=row["set"],
        teacher=row["teacher_label"],
        top1=row["top1"],
        topk_entropy=row["topk_entropy"],
        config=row["config"],
        metric=row["metric"],
        accuracy=estimate(row),
    )


@dataclass(frozen=True)
class Predictor:
    """Spearman's ρ of a teacher property with the students' accuracy and its permutation p (a row of
    :func:`predictor_rows`)."""

    set: str
    metric: str
    property: str
    n: int
    seeds: str
    rho_p: tuple[float, float] | None


def predictor(row: Mapping[str, Any]) -> Predictor:
    """The :class:`Predictor` of a row of :func:`predictor_rows`; ``rho_p`` is ``None`` where ρ is NaN."""
    rho_p = None if math.isnan(row["rho"]) else (row["rho"], row["p"])
    return Predictor(row["set"], row["metric"], row["property"], row["n"], row["seeds"], rho_p)


@dataclass(frozen=True)
class TargetStatistics:
    """A config's target statistics over training, averaged over seeds (a row of :func:`training_rows`)."""

    config: str
    n_runs: int
    gamma: float
    q_label: float
    p_label: float
    residual_entropy: float


@dataclass(frozen=True)
class RateCandidate:
    """A config of a learning-rate family (a row of :func:`selection_rows`): ``to_best`` is its paired difference
    with the family's best and the difference's interval, ``None`` for the best itself."""

    family: str
    config: str
    n_runs: int
    mean: float
    to_best: tuple[float, float, float] | None
    tied_with_best: bool
    nll: float
    selected: bool


def rate_candidate(row: Mapping[str, Any]) -> RateCandidate:
    """The :class:`RateCandidate` of a row of :func:`selection_rows`."""
    to_best = None if row["lo"] is None else (row["diff_to_best"], row["lo"], row["hi"])
    return RateCandidate(
        row["family"],
        row["config"],
        row["n_runs"],
        row["mean"],
        to_best,
        row["tied_with_best"],
        row["nll"],
        row["selected"],
    )


@dataclass(frozen=True)
class RankedConfig:
    """A config ranked on the validation sets (a row of :func:`ranking_rows`): its mean on each set, in order."""

    rank: int
    config: str
    n_runs: int
    means: Sequence[float]
    total: float
    chosen: bool


def ranked_config(row: Mapping[str, Any], sets: Sequence[str]) -> RankedConfig:
    """The :class:`RankedConfig` of a row of :func:`ranking_rows` ranked on ``sets``."""
    means = [row[label] for label in sets]
    return RankedConfig(row["rank"], row["config"], row["n_runs"], means, row["sum"], row["chosen"])


@dataclass(frozen=True)
class ProbeChange:
    """A config's p_θ(y) on the probe examples at the first and the last recorded step (a row of
    :func:`probe_rows`): ``start`` and ``end`` hold the statistics of ``PROBE_KEYS``, in order."""

    config: str
    n_runs: int
    tokens: int
    step: int
    start: Sequence[float]
    end: Sequence[float]


def probe_change(row: Mapping[str, Any]) -> ProbeChange:
    """The :class:`ProbeChange` of a row of :func:`probe_rows`."""
    start = [row[f"{k}_start"] for k in PROBE_KEYS]
    end = [row[f"{k}_end"] for k in PROBE_KEYS]
    return ProbeChange(row["config"], row["n_runs"], row["tokens"], row["step"], start, end)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of configs A and B on one set and metric (a row of :func:`comparison_rows`)."""

    set: str
    metric: str
    a: str
    b: str
    diff: float
    lo: float
    hi: float
    n_problems: int
    n_seeds: int
    a_better: int
    b_better: int
    p_mcnemar: float | None
    verdict: str


def heading_lines(name: str, n_runs: int, n_configs: int, precisions: Sequence[str]) -> list[str]:
    """The title of ``results.md``, the counts of runs and configs, their training precision and how to read the
    values."""
    trained = f" Training precision: {', '.join(precisions)}." if precisions else ""
    return [
        f"# {name}",
        "",
        f"{n_runs} runs finished, {n_configs} configurations.{trained} Values in %; mean over seeds "
        "± the 95% t-interval half-width [interval]; `*`: one run, its 95% interval over problems.",
        "",
    ]


def earlier_lines(earlier: Sequence[tuple[str, list[str]]]) -> list[str]:
    """The runs with sets evaluated on a model since retrained (:func:`earlier_model_sets`); none when empty."""
    if not earlier:
        return []
    return [
        "Evaluated on an earlier training of the run, retrained since (its model was gone when another "
        "experiment needed it; the training statistics here are the new training's): "
        + "; ".join(f"{run} ({', '.join(sets)})" for run, sets in earlier)
        + ".",
        "",
    ]


def find_estimate(rows: Sequence[Mapping[str, Any]], config: str, metric: str) -> Estimate | None:
    """The :func:`summary_estimate` of the first of ``rows`` of the config and metric; ``None`` where none is."""
    row = next((r for r in rows if r["config"] == config and r["metric"] == metric), None)
    return None if row is None else summary_estimate(row)


def set_table(spec: EvalSpec, summary: Sequence[Mapping[str, Any]]) -> Table | None:
    """The set's table: a row per config with its runs (those of its last metric) and a :func:`summary_cell` per
    metric; ``None`` where ``summary`` has no row of the set."""
    rows = [r for r in summary if r["set"] == spec.label]
    if not rows:
        return None
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    table = []
    for cid in dict.fromkeys(r["config"] for r in rows):
        cells = [find_estimate(rows, cid, metric) for metric in metrics]
        n_runs = next((e.n_runs for e in reversed(cells) if e is not None), 0)
        table.append([cid, n_runs, *(summary_cell(e) for e in cells)])
    return Table(f"{spec.label} ({spec.set})", "", ["config", "runs", *metrics], table)


def teachers_table(teachers: Sequence[Mapping[str, Any]]) -> Table | None:
    """The teachers' scores on the training labels, with their temperature and top-k entropy where every row has
    the entropy (a table of records older than it keeps its columns); ``None`` without teachers."""
    if not teachers:
        return None
    sharpness = all("topk_entropy" in t for t in teachers)
    rows = [teacher_scores(t) for t in teachers]
    return Table(
        "Teachers on the training labels",
        "Per supervised token of the training data, from each teacher's top-k cache: how often its top token is "
        "the label, how often the label is in its top-k, and its mean probability of the label (0 counted where "
        "the label is outside the top-k: a lower bound).",
        ["teacher", "prompt", "used by", "tokens", "top-1 = label", "label in top-k", "mean π_T(label)"]
        + (["T", "H(top-k), nats"] if sharpness else []),
        [
            [t.name, t.prompt, ", ".join(t.configs), t.tokens, _pct(t.top1), _pct(t.in_topk), _pct(t.p_label)]
            + ([f"{t.temperature:g}", f"{t.topk_entropy:.3f}"] if sharpness else [])
            for t in rows
        ],
    )


def students_table(students: Sequence[Mapping[str, Any]]) -> Table | None:
    """Each student beside its teacher; ``None`` unless the students had more than one teacher cache."""
    if len({p["cache"] for p in students}) <= 1:
        return None
    rows = [student(p) for p in students]
    return Table(
        "Students by teacher",
        "Each student's accuracy beside its teacher's agreement with the training labels and the entropy of its "
        "top-k (`plots/accuracy_vs_teacher_<set>.png`, with SFT and DFT as bands).",
        ["set", "teacher", "top-1 = label", "H(top-k), nats", "student", "runs", "metric", "accuracy"],
        [
            [s.set, s.teacher, _pct(s.top1), "—" if s.topk_entropy is None else f"{s.topk_entropy:.3f}", s.config]
            + [s.accuracy.n_runs, s.metric, marked_interval(s.accuracy)]
            for s in rows
        ],
    )


def predictors_table(predictors: Sequence[Mapping[str, Any]]) -> Table | None:
    """The rank correlations of teacher properties with the students' accuracy; ``None`` without any."""
    if not predictors:
        return None
    rows = [predictor(r) for r in predictors]
    return Table(
        "What predicts a student",
        "Spearman's ρ between a property of the teacher (or of the student's target) and the student's "
        "accuracy, one point per teacher (the student's mean over the seeds every student has); two-sided p from "
        f"the permutation test over the pairings, exact for up to {EXACT_PERMUTATIONS_UP_TO} teachers (with n of "
        "them the smallest p is 2/n!).",
        ["set", "metric", "property", "teachers", "seeds", "ρ", "p (permutation)"],
        [
            [r.set, r.metric, r.property, r.n, r.seeds]
            + (["—", "—"] if r.rho_p is None else [f"{r.rho_p[0]:+.2f}", f"{r.rho_p[1]:.3g}"])
            for r in rows
        ],
    )


def training_table(training: Sequence[Mapping[str, Any]]) -> Table | None:
    """The target statistics over training per config; ``None`` without any."""
    if not training:
        return None
    rows = [from_row(TargetStatistics, t) for t in training]
    return Table(
        "Target statistics over training",
        "Per supervised token, the mean over the logged steps (`metrics.csv`), then over seeds: the label trust γ, "
        "the target's mass on the label Q(label), the model's p_θ(label), and the residual's entropy H(π̃) "
        "(— where it is undefined: a signed target).",
        ["config", "runs", "mean γ", "mean Q(label)", "mean p_θ(label)", "mean H(π̃), nats"],
        [
            [t.config, t.n_runs, f"{t.gamma:.3f}", f"{t.q_label:.3f}", f"{t.p_label:.3f}"]
            + ["—" if math.isnan(t.residual_entropy) else f"{t.residual_entropy:.3f}"]
            for t in rows
        ],
    )


def selection_table(selection: Sequence[Mapping[str, Any]]) -> Table | None:
    """The learning rates chosen on the validation set, per family; ``None`` without a selection."""
    if not selection:
        return None
    title = f"Learning rate chosen on {selection[0]['set']} ({selection[0]['metric']})"
    rows = [rate_candidate(c) for c in selection]
    return Table(
        title,
        "Per family of configs that differ only in their rate: the best mean wins; a rate whose paired "
        "difference with it is a tie (95% interval containing 0) joins it, and the lowest training NLL (the "
        "mean `nll` of the last third of the logged steps) decides among them.",
        ["family", "config", "runs", "value", "− best [95%]", "tied with best", "training NLL", "chosen"],
        [
            [c.family, c.config, c.n_runs, _pct(c.mean)]
            + ["—" if c.to_best is None else _interval(*c.to_best)]
            + ["yes" if c.tied_with_best else "no", f"{c.nll:.3f}", "**yes**" if c.selected else ""]
            for c in rows
        ],
    )


def ranking_table(exp: Experiment, ranking: Sequence[Mapping[str, Any]]) -> Table | None:
    """The configs ranked on the experiment's validation sets (``rank``), marked not final while some of them have
    not finished; ``None`` without a ranking."""
    if not ranking:
        return None
    sets, seeds, expected = exp.rank["sets"], exp.rank.get("seeds"), len(ranked_configs(exp))
    over = "all their seeds" if seeds is None else f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
    rows = [ranked_config(r, sets) for r in ranking]
    return Table(
        f"Chosen on {' + '.join(sets)}",
        f"The configs matching `{exp.rank.get('among', '*')}` by the sum of their means over {over} on the "
        f"validation sets (a tie on the sum goes to the higher {sets[0]}); the first {exp.rank.get('top', 1)} "
        "chosen."
        + ("" if len(ranking) >= expected else f" **Not final**: {len(ranking)} of the {expected} have finished."),
        ["rank", "config", "runs", *sets, "sum", "chosen"],
        [
            [r.rank, r.config, r.n_runs, *(_pct(m) for m in r.means), _pct(r.total), "**yes**" if r.chosen else ""]
            for r in rows
        ],
    )


def probes_table(probes: Sequence[Mapping[str, Any]]) -> Table | None:
    """p_θ(y) on the probe examples per config, start → end of training; ``None`` without probes."""
    if not probes:
        return None
    bin_width = probes[0]["bin"]
    rows = [probe_change(p) for p in probes]
    return Table(
        "p_θ(label) on the probe examples, start → end of training",
        "Per supervised token of the first training examples (`gamma_probe`), the model's probability of the "
        "label: γ itself for the γ = p_θ(y) methods, and for every method how well it fits its training labels. "
        "Mean over seeds.",
        ["config", "runs", "tokens", "last step", "mean", "10% quantile", "median"]
        + [f"p < {bin_width:g}", f"p ≥ {1 - bin_width:g}"],
        [
            [p.config, p.n_runs, p.tokens, p.step, *(f"{_pct(a)} → {_pct(b)}" for a, b in zip(p.start, p.end))]
            for p in rows
        ],
    )


def comparisons_table(comparisons: Sequence[Mapping[str, Any]]) -> Table | None:
    """The paired comparisons with their verdicts; ``None`` without any."""
    if not comparisons:
        return None
    rows = [from_row(Comparison, c) for c in comparisons]
    return Table(
        "Paired comparisons (A − B, same problems and seeds)",
        "Difference in points with its 95% t-interval over problems (per problem: mean over seeds); "
        "McNemar exact p on the discordant (seed, problem) pairs for 0/1 metrics. A win or loss only when "
        "the interval excludes 0.",
        ["set", "metric", "A", "B", "A − B [95%]", "problems × seeds", "A only / B only", "p (McNemar)", "verdict"],
        [
            [c.set, c.metric, c.a, c.b, _interval(c.diff, c.lo, c.hi)]
            + [f"{c.n_problems} × {c.n_seeds}", f"{c.a_better} / {c.b_better}"]
            + ["—" if c.p_mcnemar is None else f"{c.p_mcnemar:.3g}", f"**{c.verdict}**"]
            for c in rows
        ],
    )


def format_markdown(
    exp: Experiment,
    summary: Sequence[dict],
    comparisons: Sequence[dict],
    n_runs: int,
    teachers: Sequence[dict] = (),
    probes: Sequence[dict] = (),
    precisions: Sequence[str] = (),
    students: Sequence[dict] = (),
    predictors: Sequence[dict] = (),
    training: Sequence[dict] = (),
    selection: Sequence[dict] = (),
    ranking: Sequence[dict] = (),
    earlier: Sequence[tuple[str, list[str]]] = (),
) -> str:
    """``results.md``: a table per set (configs × metrics, mean ± interval in %), the teachers' scores on the
    training labels (:func:`teacher_rows`) and their students (:func:`teacher_points`), what predicts a student
    (:func:`predictor_rows`), the target statistics over training (:func:`training_rows`), the learning rates
    chosen on the validation set (:func:`selection_rows`), the configs chosen on several (:func:`ranking_rows`),
    p_θ(y) on the probe examples (:func:`probe_rows`) and the paired comparisons;
    ``precisions``: the training precision of the runs (:func:`check_one_precision`); ``earlier``: sets evaluated on
    a model since retrained (:func:`earlier_model_sets`)."""
    lines = heading_lines(exp.name, n_runs, len({r["config"] for r in summary}), precisions) + earlier_lines(earlier)
    tables = [
        *(set_table(spec, summary) for spec in exp.eval),
        teachers_table(teachers),
        students_table(students),
        predictors_table(predictors),
        training_table(training),
        selection_table(selection),
        ranking_table(exp, ranking),
        probes_table(probes),
        comparisons_table(comparisons),
    ]
    return "\n".join(lines + [line for table in tables if table is not None for line in table.lines()])


TRAINING_KEYS = ("gamma", "q_label", "p_label", "residual_entropy")


def training_means(metrics_csv: Path) -> dict[str, float] | None:
    """A run's mean over its logged steps (the trainer's ``metrics.csv``) of γ, Q(label), p_θ(label) and H(π̃)
    (``TRAINING_KEYS``); ``None`` where it logged none (a method without target statistics). A value that is NaN in
    the run (H(π̃) of a signed target) stays NaN."""
    logged = [x for x in read_metrics_csv(metrics_csv) if "gamma" in x]
    return {k: fmean(x.get(k, math.nan) for x in logged) for k in TRAINING_KEYS} if logged else None


def run_training_means(records: Sequence[dict[str, Any]], root: Path) -> dict[str, dict[str, float] | None]:
    """Each run's :func:`training_means` (read once from ``<root>/<run>/metrics.csv``), by run id; ``None`` for the
    untrained baseline and for runs that logged no target statistics."""
    return {
        r["run"]: None if r["method"] == BASELINE_ID else training_means(root / r["run"] / "metrics.csv")
        for r in records
    }


def training_rows(
    records: Sequence[dict[str, Any]], means: Mapping[str, dict[str, float] | None]
) -> list[dict[str, Any]]:
    """One row per trained config with target statistics: its runs' ``means`` (:func:`run_training_means`),
    averaged over seeds."""
    groups: dict[str, list[dict[str, float]]] = {}
    for r in records:
        if (run := means.get(r["run"])) is not None:
            groups.setdefault(r["config_id"], []).append(run)
    return [
        {"config": cid, "n_runs": len(runs), **{k: fmean(m[k] for m in runs) for k in TRAINING_KEYS}}
        for cid, runs in groups.items()
    ]


PROBE_KEYS = ("mean", "q10", "q50", "low", "high")


def earlier_model_sets(exp: Experiment, records: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The runs with sets of ``exp`` evaluated on a model since retrained (``DONE.json``'s ``earlier_models``)."""
    labels = [s.label for s in exp.eval]
    found = [(r["run"], {k for g in r["earlier_models"] for k in g["sets"]}) for r in records]
    return [(run, [k for k in labels if k in sets]) for run, sets in found if sets & set(labels)]


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
        probe = read_probe(root / r["run"] / PROBE_FILE)
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


def aggregate(exp: Experiment, *, plots: bool = True, update_results: bool = False) -> dict[str, Any]:
    """Write ``results.csv``, ``summary.csv``, ``comparisons.csv``, ``probe.csv``, ``results.md`` and the plots from
    the finished runs (all trained at one precision, else :class:`ExperimentError`) into the experiment's
    ``output_dir``, or with ``update_results`` into its committed ``results_dir`` (:func:`tables_dir`); returns the
    paths and the rows."""
    root = tables_dir(exp, update_results)
    records = done_records(exp)
    precisions = check_one_precision(exp, records)
    summary = summary_rows(exp, records)
    records_at = records_root(exp)
    comparisons = comparison_rows(exp, records, records_at)
    probes = probe_rows(records, records_at)
    teachers = teacher_rows(records)
    students = teacher_points(summary, teachers)
    means = run_training_means(records, records_at)
    training = training_rows(records, means)
    predictors = predictor_rows(students, records, means)
    selection = selection_rows(exp, records, records_at)
    ranking = ranking_rows(exp, records)
    names = ("results.csv", "summary.csv", "comparisons.csv", "probe.csv", "training.csv", "teachers.csv", "results.md")
    asked = (("selection.csv", exp.select), ("ranking.csv", exp.rank), ("predictors.csv", predictors))
    optional = [name for name, wanted in asked if wanted]
    paths = {name: root / name for name in (*names, *optional)}
    atomic_write_csv(paths["results.csv"], result_rows(records, [s.label for s in exp.eval]))
    atomic_write_csv(
        paths["summary.csv"],
        [{**r, "params": json.dumps(r["params"]), "values": json.dumps(r["values"])} for r in summary],
    )
    atomic_write_csv(paths["comparisons.csv"], comparisons)
    atomic_write_csv(paths["probe.csv"], probes)
    atomic_write_csv(paths["training.csv"], training)
    atomic_write_csv(paths["teachers.csv"], students)
    if exp.select:
        atomic_write_csv(paths["selection.csv"], selection)
    if exp.rank:
        atomic_write_csv(paths["ranking.csv"], ranking)
    if predictors:
        atomic_write_csv(paths["predictors.csv"], predictors)
    markdown = format_markdown(
        exp,
        summary,
        comparisons,
        len(records),
        teachers,
        probes,
        precisions,
        students=students,
        predictors=predictors,
        training=training,
        selection=selection,
        ranking=ranking,
        earlier=earlier_model_sets(exp, records),
    )
    atomic_write_text(paths["results.md"], markdown)
    figures = []
    if plots:
        figures = write_plots(
            exp, records, summary, teacher_points=students, comparisons=comparisons, update_results=update_results
        )
    return {
        "paths": paths,
        "plots": figures,
        "summary": summary,
        "comparisons": comparisons,
        "teachers": teachers,
        "students": students,
        "predictors": predictors,
        "training": training,
        "selection": selection,
        "ranking": ranking,
        "probes": probes,
        "records": records,
    }
