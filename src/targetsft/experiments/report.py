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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from targetsft.experiments.comparisons import (
    by_config,
    comparison_rows,
    primary_metrics,
    ranked_configs,
    ranking_rows,
    selection_rows,
)
from targetsft.experiments.grid import BASELINE_ID, Experiment, ExperimentError, expand_grid, tables_dir
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


def _section(title: str, note: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A section of ``results.md``: ``## title``, a note (none when empty), a table of ``columns`` with its rows."""
    out = [f"## {title}", "", *([note, ""] if note else [])]
    out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return [*out, *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


def _interval(mean: float, lo: float | None, hi: float | None) -> str:
    return f"{_pct(mean)} [{_pct(lo)}, {_pct(hi)}]"


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
    done = len({r["config"] for r in summary})
    trained = f" Training precision: {', '.join(precisions)}." if precisions else ""
    lines = [
        f"# {exp.name}",
        "",
        f"{n_runs} runs finished, {done} configurations.{trained} Values in %; mean over seeds "
        "± the 95% t-interval half-width [interval]; `*`: one run, its 95% interval over problems.",
        "",
    ]
    if earlier:
        lines += [
            "Evaluated on an earlier training of the run, retrained since (its model was gone when another "
            "experiment needed it; the training statistics here are the new training's): "
            + "; ".join(f"{run} ({', '.join(sets)})" for run, sets in earlier)
            + ".",
            "",
        ]
    for spec in exp.eval:
        rows = [r for r in summary if r["set"] == spec.label]
        if not rows:
            continue
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        table = []
        for cid in dict.fromkeys(r["config"] for r in rows):
            cells, n = [], 0
            for metric in metrics:
                r = next((x for x in rows if x["config"] == cid and x["metric"] == metric), None)
                if r is None:
                    cells.append("—")
                    continue
                n = r["n_runs"]
                if r["interval"] == "problems":
                    cells.append(_interval(r["mean"], r["lo"], r["hi"]) + "*")
                else:
                    cells.append(f"{_pct(r['mean'])} ± {_pct(r['half'])} [{_pct(r['lo'])}, {_pct(r['hi'])}]")
            table.append([cid, n, *cells])
        lines += _section(f"{spec.label} ({spec.set})", "", ["config", "runs", *metrics], table)
    # the teacher's temperature and the entropy of its top-k, for records that have them (runs since they were
    # recorded; a table of older records keeps its columns)
    sharpness = bool(teachers) and all("topk_entropy" in t for t in teachers)
    if teachers:
        lines += _section(
            "Teachers on the training labels",
            "Per supervised token of the training data, from each teacher's top-k cache: how often its top token is "
            "the label, how often the label is in its top-k, and its mean probability of the label (0 counted where "
            "the label is outside the top-k: a lower bound).",
            ["teacher", "prompt", "used by", "tokens", "top-1 = label", "label in top-k", "mean π_T(label)"]
            + (["T", "H(top-k), nats"] if sharpness else []),
            (
                [t["teacher"] + build_suffix(t), t["prompt"], ", ".join(t["configs"]), t["tokens"], _pct(t["top1"])]
                + [_pct(t["in_topk"])]
                + [_pct(t["p_label"])]
                + ([f"{t.get('temperature', 1.0):g}", f"{t['topk_entropy']:.3f}"] if sharpness else [])
                for t in teachers
            ),
        )
    if len({p["cache"] for p in students}) > 1:
        lines += _section(
            "Students by teacher",
            "Each student's accuracy beside its teacher's agreement with the training labels and the entropy of its "
            "top-k (`plots/accuracy_vs_teacher_<set>.png`, with SFT and DFT as bands).",
            ["set", "teacher", "top-1 = label", "H(top-k), nats", "student", "runs", "metric", "accuracy"],
            (
                [p["set"], p["teacher_label"], _pct(p["top1"])]
                + ["—" if p["topk_entropy"] is None else f"{p['topk_entropy']:.3f}", p["config"], p["n_runs"]]
                + [p["metric"], _interval(p["mean"], p["lo"], p["hi"]) + ("*" if p["interval"] == "problems" else "")]
                for p in students
            ),
        )
    if predictors:
        lines += _section(
            "What predicts a student",
            "Spearman's ρ between a property of the teacher (or of the student's target) and the student's "
            "accuracy, one point per teacher (the student's mean over the seeds every student has); two-sided p from "
            f"the permutation test over the pairings, exact for up to {EXACT_PERMUTATIONS_UP_TO} teachers (with n of "
            "them the smallest p is 2/n!).",
            ["set", "metric", "property", "teachers", "seeds", "ρ", "p (permutation)"],
            (
                [r["set"], r["metric"], r["property"], r["n"], r["seeds"]]
                + (["—", "—"] if math.isnan(r["rho"]) else [f"{r['rho']:+.2f}", f"{r['p']:.3g}"])
                for r in predictors
            ),
        )
    if training:
        lines += _section(
            "Target statistics over training",
            "Per supervised token, the mean over the logged steps (`metrics.csv`), then over seeds: the label trust γ, "
            "the target's mass on the label Q(label), the model's p_θ(label), and the residual's entropy H(π̃) "
            "(— where it is undefined: a signed target).",
            ["config", "runs", "mean γ", "mean Q(label)", "mean p_θ(label)", "mean H(π̃), nats"],
            (
                [t["config"], t["n_runs"], f"{t['gamma']:.3f}", f"{t['q_label']:.3f}", f"{t['p_label']:.3f}"]
                + ["—" if math.isnan(t["residual_entropy"]) else f"{t['residual_entropy']:.3f}"]
                for t in training
            ),
        )
    if selection:
        lines += _section(
            f"Learning rate chosen on {selection[0]['set']} ({selection[0]['metric']})",
            "Per family of configs that differ only in their rate: the best mean wins; a rate whose paired "
            "difference with it is a tie (95% interval containing 0) joins it, and the lowest training NLL (the "
            "mean `nll` of the last third of the logged steps) decides among them.",
            ["family", "config", "runs", "value", "− best [95%]", "tied with best", "training NLL", "chosen"],
            (
                [c["family"], c["config"], c["n_runs"], _pct(c["mean"])]
                + ["—" if c["lo"] is None else _interval(c["diff_to_best"], c["lo"], c["hi"])]
                + ["yes" if c["tied_with_best"] else "no", f"{c['nll']:.3f}", "**yes**" if c["selected"] else ""]
                for c in selection
            ),
        )
    if ranking:
        sets, seeds, expected = exp.rank["sets"], exp.rank.get("seeds"), len(ranked_configs(exp))
        over = "all their seeds" if seeds is None else f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
        lines += _section(
            f"Chosen on {' + '.join(sets)}",
            f"The configs matching `{exp.rank.get('among', '*')}` by the sum of their means over {over} on the "
            f"validation sets (a tie on the sum goes to the higher {sets[0]}); the first {exp.rank.get('top', 1)} "
            "chosen."
            + ("" if len(ranking) >= expected else f" **Not final**: {len(ranking)} of the {expected} have finished."),
            ["rank", "config", "runs", *sets, "sum", "chosen"],
            (
                [r["rank"], r["config"], r["n_runs"], *(_pct(r[label]) for label in sets), _pct(r["sum"])]
                + ["**yes**" if r["chosen"] else ""]
                for r in ranking
            ),
        )
    if probes:
        lines += _section(
            "p_θ(label) on the probe examples, start → end of training",
            "Per supervised token of the first training examples (`gamma_probe`), the model's probability of the "
            "label: γ itself for the γ = p_θ(y) methods, and for every method how well it fits its training labels. "
            "Mean over seeds.",
            ["config", "runs", "tokens", "last step", "mean", "10% quantile", "median"]
            + [f"p < {probes[0]['bin']:g}", f"p ≥ {1 - probes[0]['bin']:g}"],
            (
                [p["config"], p["n_runs"], p["tokens"], p["step"]]
                + [f"{_pct(p[f'{k}_start'])} → {_pct(p[f'{k}_end'])}" for k in PROBE_KEYS]
                for p in probes
            ),
        )
    if comparisons:
        lines += _section(
            "Paired comparisons (A − B, same problems and seeds)",
            "Difference in points with its 95% t-interval over problems (per problem: mean over seeds); "
            "McNemar exact p on the discordant (seed, problem) pairs for 0/1 metrics. A win or loss only when "
            "the interval excludes 0.",
            ["set", "metric", "A", "B", "A − B [95%]", "problems × seeds", "A only / B only", "p (McNemar)", "verdict"],
            (
                [c["set"], c["metric"], c["a"], c["b"], _interval(c["diff"], c["lo"], c["hi"])]
                + [f"{c['n_problems']} × {c['n_seeds']}", f"{c['a_better']} / {c['b_better']}"]
                + ["—" if c["p_mcnemar"] is None else f"{c['p_mcnemar']:.3g}", f"**{c['verdict']}**"]
                for c in comparisons
            ),
        )
    return "\n".join(lines)


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
