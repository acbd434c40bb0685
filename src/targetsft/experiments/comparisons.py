"""Paired comparisons of finished runs: each set's primary metrics and their per-problem values, the experiment's
``compare`` pairs (:func:`comparison_rows`), the learning rate chosen on a validation set (:func:`selection_rows`)
and the configs chosen on several (:func:`ranking_rows`)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import (
    BASELINE_ID,
    BINARY_METRICS,
    EvalSpec,
    Experiment,
    ExperimentError,
    expand_grid,
    rate_family,
)
from targetsft.experiments.records import read_metrics_csv
from targetsft.experiments.statistics import paired_comparison


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


def by_config(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by config id, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["config_id"], []).append(r)
    return out


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
    configs = by_config(records)
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
                rows.append(
                    {"set": spec.label, "metric": metric, "a": a, "b": b, **_paired(root, spec, metric, *sides)}
                )
    return rows


def _paired(root: Path, spec: EvalSpec, metric: str, a: Sequence[dict], b: Sequence[dict]) -> dict[str, Any]:
    """:func:`paired_comparison` of two configs' runs on one set and metric."""
    a_values, b_values = _seed_values(root, a, spec, metric), _seed_values(root, b, spec, metric)
    return paired_comparison(a_values, b_values, binary=metric in BINARY_METRICS)


def final_nll(path: Path) -> float:
    """The training NLL of a run: the mean ``nll`` of the last third of its logged steps (``metrics.csv``)."""
    logged = [x["nll"] for x in read_metrics_csv(path) if "nll" in x]
    tail = logged[len(logged) - max(1, len(logged) // 3) :] if logged else []
    return math.fsum(tail) / len(tail) if tail else math.nan


def selection_rows(exp: Experiment, records: Sequence[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """The learning rate of each family of configs that differ only in their rate (2+ rates finished), chosen on
    ``exp.select``'s validation set: per rate its mean over seeds, its paired difference with the best mean
    (:func:`paired_comparison`), whether it ties the best (interval containing 0), its training NLL
    (:func:`final_nll`, mean over seeds) and ``selected`` (the lowest NLL among the best and the rates tied with it)."""
    if not exp.select:
        return []
    spec = next(s for s in exp.eval if s.label == exp.select["set"])
    families: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for cid, runs in by_config(records).items():
        runs = [r for r in runs if spec.label in r["sets"]]
        if runs and runs[0]["method"] != BASELINE_ID:
            families.setdefault(rate_family(cid, runs[0]["learning_rate"]), {})[cid] = runs
    rows = []
    for family, configs in families.items():
        if len(configs) < 2:
            continue
        first = next(iter(configs.values()))[0]
        metric = exp.select.get("metric") or primary_metrics(spec, first["sets"][spec.label]["kind"])[0]
        means = {
            cid: math.fsum(r["sets"][spec.label]["metrics"][metric]["value"] for r in runs) / len(runs)
            for cid, runs in configs.items()
        }
        best = max(means, key=means.get)
        candidates = []
        for cid, runs in configs.items():
            against = _paired(root, spec, metric, runs, configs[best]) if cid != best else None
            nll = math.fsum(final_nll(root / r["run"] / "metrics.csv") for r in runs) / len(runs)
            tied = against is None or against["verdict"] == "tie"
            candidates.append(
                {
                    "family": family,
                    "config": cid,
                    "learning_rate": runs[0]["learning_rate"],
                    "n_runs": len(runs),
                    "set": spec.label,
                    "metric": metric,
                    "mean": means[cid],
                    "diff_to_best": 0.0 if against is None else against["diff"],
                    "lo": None if against is None else against["lo"],
                    "hi": None if against is None else against["hi"],
                    "tied_with_best": tied,
                    "nll": nll,
                }
            )
        chosen = min((c for c in candidates if c["tied_with_best"]), key=lambda c: c["nll"])["config"]
        rows += [{**c, "selected": c["config"] == chosen} for c in candidates]
    return rows


def ranked_configs(exp: Experiment) -> list[str]:
    """The config ids of ``exp``'s grid that ``exp.rank`` ranks once they have finished (its ``among`` and
    ``seeds``)."""
    among, seeds = exp.rank.get("among", "*"), exp.rank.get("seeds")
    runs = [r for r in expand_grid(exp) if seeds is None or r.seed in seeds]
    return list(dict.fromkeys(r.config_id for r in runs if _matches(among, r.config_id, r.method)))


def ranking_rows(exp: Experiment, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configs matching ``exp.rank``'s ``among``, ranked by ``sum`` = Σ over its validation sets of the config's
    mean over ``seeds`` (the runs that have every set; ties on the sum: the higher mean on the first set); the first
    ``top`` are ``chosen``. One row per config: its runs, seeds, each set's mean, the sum and the rank."""
    if not exp.rank:
        return []
    specs = [next(s for s in exp.eval if s.label == label) for label in exp.rank["sets"]]
    among, seeds = exp.rank.get("among", "*"), exp.rank.get("seeds")
    rows = []
    for cid, runs in by_config(records).items():
        runs = [r for r in runs if all(s.label in r["sets"] for s in specs) and (seeds is None or r["seed"] in seeds)]
        if not runs or not _matches(among, cid, runs[0]["method"]):
            continue
        means = {}
        for spec in specs:
            result = runs[0]["sets"][spec.label]
            metric = exp.rank.get("metric") or primary_metrics(spec, result["kind"])[0]
            if metric not in result["metrics"]:
                raise ExperimentError(f"rank.metric {metric!r}: set {spec.label} has {sorted(result['metrics'])}")
            values = [r["sets"][spec.label]["metrics"][metric]["value"] for r in runs]
            means[spec.label] = math.fsum(values) / len(values)
        row = {"config": cid, "n_runs": len(runs), "seeds": " ".join(str(r["seed"]) for r in runs)}
        rows.append({**row, **means, "sum": math.fsum(means.values())})
    first = specs[0].label
    rows.sort(key=lambda r: (-round(r["sum"], 12), -round(r[first], 12)))  # accuracies: rounding errors are no win
    top = exp.rank.get("top", 1)
    return [{**r, "rank": i + 1, "chosen": i < top} for i, r in enumerate(rows)]
