"""Reproducing a finished run from its committed record (``target-sft experiment --reproduce RUN_ID``), and scoring
its recorded outputs again (``--rescore PATTERN``).

The run is trained and evaluated again from the configuration its record was made with, in a scratch folder
(``<output_dir>/reproduce/<run id>/``: ``runs/`` its model, ``records/`` its new record; its teacher runs and teacher
caches stay the experiment's own), and the new record is compared with the committed one, which is only read:

* every eval set: each tabulated metric, recorded and rerun, and the share of items whose outputs (generated texts,
  multiple-choice picks) are identical;
* training: the largest difference of every logged training statistic (loss, grad norm, γ, ...) over the logged
  steps, |a − b| and |a − b| / max(|a|, |b|).

``--rescore PATTERN`` is the model-free check of the same records (:func:`rescore_record`): each set's items scored
again from the record's outputs (the generated texts against their gold answers, the multiple-choice log-probs
picked from again) and the metrics compared with the recorded ones.

Both records' environments (CPU capability, threads, torch and, where recorded, transformers and the other
libraries) are printed beside the figures: a difference between two kinds of CPU, two thread counts or two library
versions is expected of floating point, not a fault of the run. A killed reproduction
resumes like any run (its checkpoints are in the scratch folder).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from targetsft.data.sft import read_jsonl
from targetsft.experiments.grid import Experiment, ExperimentError, expand_grid, tables_dir
from targetsft.experiments.records import (
    DONE_FILE,
    compare_training,
    differences,
    read_record,
    record_dir,
    recorded_precision,
    run_fingerprint,
    run_precision,
    write_json,
)
from targetsft.experiments.runner import run_one
from targetsft.experiments.teacher_runs import teacher_cache_root


def scratch_experiment(exp: Experiment, run_id: str) -> Experiment:
    """``exp`` with its runs and records in ``<output_dir>/reproduce/<run_id>/`` and its own teacher caches."""
    root = tables_dir(exp) / "reproduce" / run_id
    return dataclasses.replace(
        exp,
        runs_dir=str(root / "runs"),
        records_dir=str(root / "records"),
        teacher_cache_dir=str(teacher_cache_root(exp)),
    )


def reproduce_run(
    exp: Experiment, run_id: str, log: Callable[[str], None] = print, progress: bool = True
) -> dict[str, Any]:
    """Rerun ``run_id`` of ``exp`` in :func:`scratch_experiment` and :func:`compare_records` the committed record
    with the new one; the comparison is also written to ``<scratch>/comparison.json``."""
    runs = {r.id: r for r in expand_grid(exp)}
    if run_id not in runs:
        raise ExperimentError(f"--reproduce: experiment {exp.name} has no run {run_id!r} (runs: {', '.join(runs)})")
    run = runs[run_id]
    committed = record_dir(exp, run)
    done = read_record(committed / DONE_FILE)
    if done is None:
        raise ExperimentError(f"--reproduce: run {run_id} has no finished record to compare with ({committed})")
    if done["fingerprint"] != run_fingerprint(run):
        raise ExperimentError(
            f"--reproduce: the record of {run_id} ({committed}) was made with another configuration than the "
            "experiment gives the run now"
        )
    was, now = recorded_precision(done, run.config), run_precision(run)
    if not run.is_baseline and was is not None and was != now:
        raise ExperimentError(
            f"--reproduce: {run_id} was trained at precision {was} and this machine would train it at {now}; set "
            f"precision: {was} in the experiment's base to reproduce it"
        )
    scratch = scratch_experiment(exp, run_id)
    rerun = next(r for r in expand_grid(scratch) if r.id == run_id)  # its trainer's output_dir in the scratch folder
    log(f"reproducing {run_id} in {Path(scratch.runs_dir).parent}")
    run_one(scratch, rerun, log, progress, teachers=exp)
    comparison = compare_records(committed, record_dir(scratch, rerun))
    write_json(Path(scratch.runs_dir).parent / "comparison.json", comparison)
    return comparison


def _metric_gap(metric: dict[str, float]) -> float:
    """|recorded − rerun| of one compared metric."""
    return differences(metric["recorded"], metric["rerun"])[0]


def _item_output(item: dict[str, Any]) -> Any:
    """What an evaluated item's outputs are: the generated texts, or the multiple-choice picks."""
    if "greedy" in item or "samples" in item:
        texts = [s["text"] for s in item.get("samples") or []]
        return [(item.get("greedy") or {}).get("text"), texts]
    return {k: v for k, v in item.items() if k.startswith("pred_")}


def _compare_set(old_dir: Path, new_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    metrics = {
        name: {"recorded": m["value"], "rerun": new["metrics"][name]["value"]}
        for name, m in old["metrics"].items()
        if name in new["metrics"]
    }
    old_items = {i["id"]: _item_output(i) for i in read_jsonl(old_dir / old["items"])}
    new_items = {i["id"]: _item_output(i) for i in read_jsonl(new_dir / new["items"])}
    common = old_items.keys() & new_items.keys()
    same = sum(old_items[k] == new_items[k] for k in common)
    return {
        "metrics": metrics,
        "items": len(common),
        "identical_items": same,
        "identical": same == len(old_items) == len(new_items) and not any(map(_metric_gap, metrics.values())),
    }


def _environment(done: dict[str, Any]) -> dict[str, Any]:
    """The environments of a record (:func:`~targetsft.experiments.records.read_record`): the trainer's (none for
    the baseline, nor in a summary from a trainer before it was recorded) and the evaluation's (``None``: not
    recorded)."""
    return {"train": (done["train"] or {}).get("environment"), "eval": done["eval_environment"]}


def compare_records(old_dir: Path, new_dir: Path) -> dict[str, Any]:
    """The comparison of two records of one run (``DONE.json`` and the files it names): per eval set and for
    training (see the module docstring); ``identical`` when every figure and every output agrees exactly."""
    old, new = read_record(old_dir / DONE_FILE), read_record(new_dir / DONE_FILE)
    if old is None or new is None:
        raise ExperimentError(f"no {DONE_FILE} in {old_dir if old is None else new_dir} to compare")
    sets = {
        label: _compare_set(old_dir, new_dir, spec, new["sets"][label])
        for label, spec in old["sets"].items()
        if label in new["sets"]
    }
    training = compare_training(old_dir, new_dir) if old["train"] else None
    return {
        "run": old["run"],
        "recorded": str(old_dir),
        "rerun": str(new_dir),
        "environments": {"recorded": _environment(old), "rerun": _environment(new)},
        "sets": sets,
        "training": training,
        "identical": all(s["identical"] for s in sets.values()) and (training is None or training["identical"]),
    }


def largest_metric_gap(comparison: dict[str, Any]) -> float:
    """The largest |recorded − rerun| of any eval metric (0 when they agree; NaN against NaN agrees)."""
    return max((_metric_gap(m) for s in comparison["sets"].values() for m in s["metrics"].values()), default=0.0)


def format_comparison(comparison: dict[str, Any]) -> str:
    """The comparison as plain text: environments, one line per eval metric, one per training statistic."""
    envs = comparison["environments"]
    lines = [f"reproduction of {comparison['run']}: {'identical' if comparison['identical'] else 'differs'}"]
    for side in ("recorded", "rerun"):
        env = envs[side]["train"] or envs[side]["eval"] or {}
        keys = ("precision", "cpu_capability", "torch_threads", "torch", "device")
        named = [f"{k} {env[k]}" for k in keys if k in env]
        named += [f"{k} {v}" for k, v in env.get("libraries", {}).items()]  # older records: none
        lines.append(f"  {side:<8s} environment: " + ", ".join(named))
    for label, s in comparison["sets"].items():
        lines.append(f"  {label}: {s['identical_items']}/{s['items']} items with identical outputs")
        for name, m in s["metrics"].items():
            lines.append(
                f"    {name:<12s} recorded {m['recorded']:.4f}  rerun {m['rerun']:.4f}  |Δ| {_metric_gap(m):.4f}"
            )
    training = comparison["training"]
    if training:
        lines.append(
            f"  training: {training['steps']} logged steps compared (recorded {training['recorded_steps']}, "
            f"rerun {training['rerun_steps']}); largest differences:"
        )
        for key, c in training["columns"].items():
            lines.append(f"    {key:<18s} |Δ| {c['max_abs']:.3g}  relative {c['max_rel']:.3g}")
    return "\n".join(lines)


def _value_gap(a: float | None, b: float | None) -> float:
    """|a − b| of two metric values, either of which may be ``None`` (NaN: no value); 0 when they agree."""
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return differences(a, b)[0]


def _rescore_set(record: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """One set of a record scored again (see :func:`rescore_record`)."""
    from targetsft.evaluation.rescore import rescore_items

    spec = entry["spec"]
    again = rescore_items(record / entry["items"], prompt=spec["prompt"], normalize=spec["normalize"])
    rescored = {name: again["metrics"].get(name, {}) for name in entry["metrics"]}
    metrics = {
        name: {"recorded": m["value"], "rescored": rescored[name].get("value")} for name, m in entry["metrics"].items()
    }
    bounds = [_value_gap(m.get(b), rescored[name].get(b)) for name, m in entry["metrics"].items() for b in ("lo", "hi")]
    return {
        "metrics": metrics,
        "items": again["n"],
        "changed": again["changed"],
        "interval_gap": max(bounds, default=0.0),
        "identical": not again["changed"]
        and not any(_value_gap(m["recorded"], m["rescored"]) for m in metrics.values()),
    }


def rescore_record(record: Path) -> dict[str, Any]:
    """A finished run's record (its ``DONE.json`` and the items files it names, plain or ``.gz``) scored again
    without a model (:func:`~targetsft.evaluation.rescore.rescore_items` with each set's prompt and normalization):
    per set, each recorded metric beside its new value, the items whose outcome changed, and the largest difference
    of the interval bounds (recomputed by this library's interval code); ``identical`` when every value agrees
    exactly and no item's outcome changed."""
    done = read_record(record / DONE_FILE)
    if done is None:
        raise ExperimentError(f"no {DONE_FILE} in {record} to score again")
    sets = {label: _rescore_set(record, entry) for label, entry in done["sets"].items()}
    return {
        "run": done["run"],
        "record": str(record),
        "sets": sets,
        "identical": all(s["identical"] for s in sets.values()),
    }


def rescore_runs(exp: Experiment, pattern: str) -> list[dict[str, Any]]:
    """:func:`rescore_record` of every finished run of ``exp`` whose id matches ``pattern`` (a glob; a plain string
    matches as a substring)."""
    from targetsft.experiments.status import select_runs

    runs = [r for r in select_runs(expand_grid(exp), pattern) if (record_dir(exp, r) / DONE_FILE).is_file()]
    if not runs:
        raise ExperimentError(f"--rescore: experiment {exp.name} has no finished run matching {pattern!r}")
    return [rescore_record(record_dir(exp, r)) for r in runs]


def largest_rescore_gap(comparison: dict[str, Any]) -> float:
    """The largest |recorded − rescored| of any metric value of a :func:`rescore_record` comparison."""
    values = [m for s in comparison["sets"].values() for m in s["metrics"].values()]
    return max((_value_gap(m["recorded"], m["rescored"]) for m in values), default=0.0)


def format_rescore(comparison: dict[str, Any]) -> str:
    """A :func:`rescore_record` comparison as plain text: per set, the items scored as recorded, the interval
    bounds' largest difference and one line per metric."""
    lines = [f"re-scoring of {comparison['run']}: {'identical' if comparison['identical'] else 'differs'}"]
    for label, s in comparison["sets"].items():
        same = s["items"] - len(s["changed"])
        lines.append(
            f"  {label}: {same}/{s['items']} items scored as recorded; interval bounds within {s['interval_gap']:.2g}"
        )
        lines += [f"    changed: {', '.join(map(str, s['changed'][:10]))}"] if s["changed"] else []
        for name, m in s["metrics"].items():
            rescored = "none" if m["rescored"] is None else f"{m['rescored']:.4f}"
            recorded = "none" if m["recorded"] is None else f"{m['recorded']:.4f}"
            gap = _value_gap(m["recorded"], m["rescored"])
            lines.append(f"    {name:<12s} recorded {recorded}  rescored {rescored}  |Δ| {gap:.4f}")
    return "\n".join(lines)
