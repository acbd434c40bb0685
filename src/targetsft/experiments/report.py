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
from pathlib import Path
from statistics import fmean
from typing import Any

from targetsft.experiments.comparisons import (
    by_config,
    comparison_rows,
    primary_metrics,
    ranking_rows,
    selection_rows,
)
from targetsft.experiments.grid import BASELINE_ID, Experiment, ExperimentError, expand_grid, tables_dir
from targetsft.experiments.markdown import PROBE_KEYS, format_markdown
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
from targetsft.experiments.statistics import t_interval
from targetsft.experiments.teachers import predictor_rows, teacher_points, teacher_rows
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
