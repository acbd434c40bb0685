"""An experiment's ``results.md``, rendered from typed rows: one function per section (set tables, teachers,
students, predictors, training statistics, selection, ranking, probes, comparisons), each a :class:`Table`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from targetsft.experiments.comparisons import ranked_configs
from targetsft.experiments.grid import EvalSpec, Experiment
from targetsft.experiments.statistics import EXACT_PERMUTATIONS_UP_TO
from targetsft.experiments.teachers import build_suffix

PROBE_KEYS = ("mean", "q10", "q50", "low", "high")  # p_θ(y) statistics of the probe examples


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
