"""The teachers of an experiment's students: each teacher build and how it scores the training labels, each
student beside its teacher, and which teacher property ranks with the students' accuracy (the tables
``teachers.csv`` and ``predictors.csv`` and their sections of ``results.md``).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from targetsft.experiments.statistics import rank_correlation


def teacher_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per teacher build the runs trained from: the teacher, its prompt, the configs that used it and how
    it scores their training labels (``label_stats``: top-1 agreement, label in top-k, mean π_T(y)). A build is a
    cache folder with its contents, told apart by those scores (which every record has): a teacher retrained and
    cached again into the same folder is a second row, with ``build`` 1, 2, ... on every row of that folder."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        info = (r["train"] or {}).get("teacher")  # the trainer's summary: a teacher only where the run had one
        if not info:
            continue
        build = json.dumps([info["label_stats"].get(k) for k in ("tokens", "top1", "in_topk", "p_label")])
        row = rows.setdefault(
            (info["cache"], build),
            {
                "teacher": info["name"],
                "prompt": info["prompt"],
                "cache": info["cache"],
                "configs": [],
                **({"temperature": info["temperature"]} if "temperature" in info else {}),
                **info["label_stats"],
            },
        )
        if r["config_id"] not in row["configs"]:
            row["configs"].append(r["config_id"])
    builds = Counter(cache for cache, _ in rows)
    seen: Counter[str] = Counter()
    for (cache, _), row in rows.items():
        if builds[cache] > 1:
            seen[cache] += 1
            row["build"] = seen[cache]
    return list(rows.values())


def build_suffix(teacher: Mapping[str, Any]) -> str:
    return f" (build {teacher['build']})" if "build" in teacher else ""


def teacher_label(teacher: str) -> str:
    """A short name of a teacher: ``<run id>`` for a grid run's final model, ``<run id>@<step>`` for its snapshot
    (the ``teacher.model`` reference, without the ``@`` in front), else the last part of its name or path."""
    path = Path(teacher)
    if path.name == "final" and len(path.parts) > 1:
        return path.parent.name
    if path.parent.name == "snapshots" and path.name.startswith("step-"):
        return f"{path.parent.parent.name}@{path.name.removeprefix('step-')}"
    return path.name


def teacher_points(summary: Sequence[dict], teachers: Sequence[dict]) -> list[dict[str, Any]]:
    """Per set, one row per config trained from a teacher cache: the teacher (``teacher_label``:
    :func:`teacher_label`, and its temperature where it is not 1), its top-1 agreement and top-k entropy on the
    training labels, and the student's mean and interval on the set's first of ``greedy`` or its primary metrics."""
    by_config: dict[str, dict[str, Any]] = {}
    mixed: set[str] = set()
    for t in teachers:
        for c in t["configs"]:
            if c in by_config:
                mixed.add(c)
            by_config[c] = t
    for c in sorted(mixed):
        warnings.warn(
            f"{c}: its runs trained from more than one build of their teacher (a teacher retrained and cached again), "
            "so it has no single teacher to be plotted against; left out of the students by teacher",
            stacklevel=2,
        )
        del by_config[c]
    rows = []
    for label in dict.fromkeys(r["set"] for r in summary):
        at = [r for r in summary if r["set"] == label]
        metric = "greedy" if any(r["metric"] == "greedy" for r in at) else at[0]["metric"]
        for r in at:
            t = by_config.get(r["config"])
            if r["metric"] != metric or t is None:
                continue
            temperature = t.get("temperature", 1.0)
            name = teacher_label(t["teacher"]) + (f" T={temperature:g}" if temperature != 1.0 else "") + build_suffix(t)
            rows.append(
                {
                    "set": label,
                    "metric": metric,
                    "config": r["config"],
                    "teacher": t["teacher"],
                    "teacher_label": name,
                    "cache": t["cache"],
                    "temperature": temperature,
                    "top1": t["top1"],
                    "p_label": t["p_label"],
                    "topk_entropy": t.get("topk_entropy"),
                    **{k: r[k] for k in ("mean", "lo", "hi", "n_runs", "interval")},
                }
            )
    return rows


#: the properties ranked against the students' accuracy: (key, name); ``q_label`` is the student's (training.csv)
PREDICTORS = (
    ("top1", "top-1 = label"),
    ("p_label", "mean π_T(label)"),
    ("topk_entropy", "H(top-k)"),
    ("q_label", "student's mean Q(label)"),
)


def predictor_rows(
    points: Sequence[dict], records: Sequence[dict[str, Any]], means: Mapping[str, dict[str, float] | None]
) -> list[dict[str, Any]]:
    """Per set whose students each had a teacher cache of their own (one student per teacher, three or more), the
    rank correlation of each teacher property (``PREDICTORS``) with the student's accuracy, one point per student
    (:func:`~targetsft.experiments.statistics.rank_correlation`: Spearman's ρ, permutation p). A student's accuracy
    and mean Q(label) (from ``means``: :func:`~targetsft.experiments.report.run_training_means`) are its means over
    the seeds that every student of the set has (``seeds``), so that more seeds for some of them leave the comparison
    balanced."""
    runs: dict[tuple[str, int], dict[str, Any]] = {(r["config_id"], r["seed"]): r for r in records}
    rows = []
    for label in dict.fromkeys(p["set"] for p in points):
        at = [p for p in points if p["set"] == label]
        if len(at) < 3 or len({p["cache"] for p in at}) < len(at):
            continue
        metric = at[0]["metric"]
        have = [{s for c, s in runs if c == p["config"] and label in runs[c, s]["sets"]} for p in at]
        seeds = sorted(set.intersection(*have))
        if not seeds:
            continue
        accuracy = [fmean(runs[p["config"], s]["sets"][label]["metrics"][metric]["value"] for s in seeds) for p in at]
        for key, name in PREDICTORS:
            if key == "q_label":
                per_seed = [[means.get(runs[p["config"], s]["run"]) for s in seeds] for p in at]
                values = [None if None in m else fmean(x["q_label"] for x in m) for m in per_seed]
            else:
                values = [p[key] for p in at]
            if any(v is None for v in values):
                continue
            test = rank_correlation(values, accuracy)
            rows.append({"set": label, "metric": metric, "property": name, **test, "seeds": " ".join(map(str, seeds))})
    return rows
