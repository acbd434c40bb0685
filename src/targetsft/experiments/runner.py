"""Running an experiment: train (or resume), evaluate and record each run, skipping finished ones.

Resume
------
``<runs_dir>/<id>/`` (default ``runs_dir``: ``<output_dir>/runs``) holds the trainer's outputs;
``<records_dir>/<id>/`` (default: the same folder) the run's record: ``run.json``, the trainer's ``summary.json``
and ``metrics.csv`` (copied there when training ends), ``eval/<label>/`` the evaluation files (the items
gzip-compressed: :mod:`~targetsft.experiments.records`) and ``DONE.json``
(the metrics, written atomically when the run is complete). A run is skipped when ``DONE.json`` exists for the
same configuration (a fingerprint of its TrainConfig; a different one is an error, never silently reused) and
covers the current eval sets. Otherwise training is skipped if the run folder holds ``summary.json`` (written last
by the trainer) and ``final/``, resumed from the newest complete ``checkpoint-N`` (one holding
``trainer_state.json``, which the Trainer writes last; incomplete ones are removed), or started from scratch
(``retrain`` when the record says it was trained before but the model is gone); each eval set whose
``result.json`` matches its spec is reused.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import EvalSpec, Experiment, ExperimentError, Run, expand_grid, run_dir, teacher_ref
from targetsft.experiments.records import (
    DONE_FILE,
    PROBE_FILE,
    RECORD_VERSION,
    read_record,
    record_dir,
    recorded_precision,
    run_fingerprint,
    run_precision,
    same_spec,
    spec_dict,
    trained,
    training_id,
    write_json,
)
from targetsft.experiments.status import (
    Progress,
    complete_checkpoints,
    drop_incomplete_checkpoints,
    run_status,
    select_runs,
)
from targetsft.experiments.teacher_runs import teacher_cache, teacher_model
from targetsft.runtime.files import atomic_write_text, compress_file
from targetsft.runtime.precision import environment
from targetsft.training.config import config_from_dict
from targetsft.training.scoring import gamma_probe


def _train(
    exp: Experiment,
    run: Run,
    log: Callable[[str], None],
    teachers: Experiment | None = None,
    record: Path | None = None,
) -> dict[str, Any]:
    """Train the run (from scratch, or resumed from its newest complete checkpoint); its trainer summary, with the
    training's part of the record (summary.json, metrics.csv, gamma_probe.jsonl) in ``record`` (default: the run's
    record). A teacher run it names is looked up in ``teachers`` (default: ``exp``)."""
    from targetsft.training import recipe

    out, record = run_dir(exp, run), record or record_dir(exp, run)
    if trained(exp, run):
        summary = json.loads((out / "summary.json").read_text())
    else:
        config = json.loads(json.dumps(run.config))
        ref = teacher_ref(run)
        if ref is not None:
            config["teacher"]["model"] = str(teacher_model(teachers or exp, run, ref, log, _train))
        if exp.teacher_cache_k and (config.get("teacher") or {}).get("model"):
            teacher = config["teacher"]
            if teacher.get("prompt") == "own_template":  # its prompts are still rendered by its tokenizer
                teacher = {**teacher, "tokenizer": teacher.get("tokenizer") or teacher["model"]}
            config["teacher"] = {**teacher, "model": None, "cache": str(teacher_cache(exp, config, log))}
        drop_incomplete_checkpoints(out, log)
        resume = bool(complete_checkpoints(out))
        if not resume:
            (record / PROBE_FILE).unlink(missing_ok=True)
        cfg = config_from_dict(config)
        probe = [gamma_probe(cfg, exp.gamma_probe, record / PROBE_FILE)] if exp.gamma_probe else []
        summary = recipe.train(cfg, resume=resume, callbacks=probe)
    if record != out:  # the trainer's part of the record
        for name in ("summary.json", "metrics.csv"):
            if (out / name).is_file():
                atomic_write_text(record / name, (out / name).read_text())
    return summary


def _evaluate_set(
    model: Any, tokenizer: Any, spec: EvalSpec, out: Path, name: str, progress: bool, engine: str = "compact"
) -> dict[str, Any]:
    """Evaluate one set into ``out``; the harness's record of it (spec, metrics, items file relative to ``out``)."""
    from targetsft import evaluation as E

    kind = spec.kind or E.set_kind(spec.set)
    summary = E.evaluate_set(
        model,
        tokenizer,
        spec.set,
        kind=kind,
        decode=spec.decode_options(engine),
        choice=spec.choice_options(),
        size=spec.size,
        data_seed=spec.data_seed,
        out_dir=out,
        model_name=name,
        progress=progress,
    )
    items = Path(summary["files"]["items"])
    compress_file(items)  # kept as <items>.gz under the name the record gives (records.compact_record)
    return {
        "spec": spec_dict(spec),
        "kind": kind,
        "n": summary["n"],
        "metrics": summary["metrics"],
        "items": items.name,
    }


def _kept_set(result: dict[str, Any], label: str, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """A reused ``result.json`` (:func:`read_record`) as ``DONE.json``'s entry for its set: the entry the run's
    record holds where it is the same evaluation (spec, metrics and items; it names the model, which a version-1
    ``result.json`` did not), else the result with its items path under the record."""
    entry = {**{k: v for k, v in result.items() if k != "record_version"}, "items": f"eval/{label}/{result['items']}"}
    same = recorded is not None and all(recorded[k] == entry[k] for k in ("spec", "kind", "n", "metrics", "items"))
    return recorded if same else entry


def _evaluate(
    exp: Experiment,
    run: Run,
    log: Callable[[str], None],
    progress: bool,
    model_id: str | None,
    recorded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every eval set of the run (reusing the sets whose ``result.json`` matches their spec: :func:`_kept_set`, with
    ``recorded`` the sets of the run's ``DONE.json``); a new result names the model it was evaluated on
    (``model_id``: :func:`training_id`)."""
    import torch

    from targetsft.evaluation.suite import close_model, open_model
    from targetsft.runtime.models import load_tokenizer, resolve_model

    out, record = run_dir(exp, run), record_dir(exp, run)
    results: dict[str, Any] = {}
    model = tokenizer = None
    loaded = None  # (dtype, requested engine) of the open model; one model (one vLLM engine) serves successive sets
    engine = "compact"
    try:
        for spec in exp.eval:
            folder = record / "eval" / spec.label
            old = read_record(folder / "result.json")
            if old is not None and same_spec(old["spec"], spec):
                results[spec.label] = _kept_set(old, spec.label, (recorded or {}).get(spec.label))
                continue
            if model is None or loaded != (spec.dtype, spec.engine):
                close_model(model)
                model = None
                gc.collect()
                path = resolve_model(run.config.get("model")) if run.is_baseline else str(out / "final")
                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                model, engine = open_model(path, spec.engine, getattr(torch, spec.dtype), device)
                tokenizer, loaded = load_tokenizer(path, padding_side="left"), (spec.dtype, spec.engine)
            log(f"evaluating {run.id} on {spec.label}" + (f" ({engine})" if engine != "compact" else ""))
            result = {**_evaluate_set(model, tokenizer, spec, folder, run.id, progress, engine), "model": model_id}
            write_json(folder / "result.json", {"record_version": RECORD_VERSION, **result})
            results[spec.label] = {**result, "items": f"eval/{spec.label}/{result['items']}"}
    finally:
        close_model(model)
        del model
        gc.collect()
    return results


def train_record(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of the trainer's summary that a run's record keeps (its data, metrics, teacher and environment)."""
    return summary and {k: summary[k] for k in ("data", "metrics", "teacher", "environment") if k in summary}


def _trained_precision(summary: dict[str, Any] | None) -> str | None:
    """The precision a trainer's summary says it trained at (its ``environment``; none for the baseline, nor in the
    summary of a trainer from before it was recorded)."""
    return ((summary or {}).get("environment") or {}).get("precision")


def _record(run: Run, fingerprint: str, train_summary: dict | None, sets: dict, seconds: float) -> dict[str, Any]:
    """The content of ``DONE.json`` (:data:`~targetsft.experiments.records.RECORD_VERSION`) but its
    ``earlier_models`` (:func:`_earlier_models`); ``seconds``: the run's wall time summed over the experiments that
    used it."""
    return {
        "record_version": RECORD_VERSION,
        "run": run.id,
        "config_id": run.config_id,
        "group": run.group,
        "method": run.method,
        "params": run.params,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "fingerprint": fingerprint,
        "train": train_record(train_summary),
        "precision": _trained_precision(train_summary),
        "eval_environment": environment(),
        "sets": sets,
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_one(
    exp: Experiment,
    run: Run,
    log: Callable[[str], None] = print,
    progress: bool = True,
    teachers: Experiment | None = None,
) -> dict[str, Any]:
    """Train (or resume), evaluate and record one run; returns its ``DONE.json`` record. ``teachers``: the
    experiment whose runs and records hold the run's teacher runs (default ``exp``; another for a reproduction,
    :mod:`~targetsft.experiments.reproduce`)."""
    out, record = run_dir(exp, run), record_dir(exp, run)
    status = run_status(exp, run)
    if status == "stale":
        raise ExperimentError(
            f"{record} was started with another configuration than run {run.id} has now; delete the folder or use "
            "another runs_dir"
        )
    if status == "precision":
        raise ExperimentError(_precision_message(exp, [run]))
    if status == "done":
        return read_record(record / DONE_FILE)
    t0 = time.perf_counter()
    fingerprint = run_fingerprint(run)
    started = {"run": run.id, "fingerprint": fingerprint, "config": run.config, "precision": run_precision(run)}
    write_json(record / "run.json", {"record_version": RECORD_VERSION, **started})
    train_summary = None
    if not run.is_baseline:
        if status != "evaluate":
            log(f"training {run.id} ({status})")
        train_summary = _train(exp, run, log, teachers)
    earlier = read_record(record / DONE_FILE)  # the record of other experiments sharing runs_dir, if any
    held = earlier["sets"] if earlier else {}
    sets = _evaluate(exp, run, log, progress, training_id(train_record(train_summary)), held)
    sets = {**{k: v for k, v in held.items() if k not in sets}, **sets}
    seconds = (earlier["seconds"] if earlier else 0.0) + time.perf_counter() - t0
    done = _record(run, fingerprint, train_summary, sets, seconds)
    done["earlier_models"] = _earlier_models(earlier, done)
    write_json(record / DONE_FILE, done)
    if not exp.keep_checkpoints:  # only a resume needs them; final/ stays
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    return done


def _earlier_models(earlier: dict[str, Any] | None, done: dict[str, Any]) -> list[dict[str, Any]]:
    """The sets of ``done`` evaluated on a model that is gone (the run was retrained since), grouped by that model,
    each group with its training record: ``[{"sets": [...], "train": ...}]``, so no set passes for the new model's.
    A set names its model by :func:`training_id`; its training is the one of ``earlier`` (the run's previous
    ``DONE.json``, :func:`~targetsft.experiments.records.read_record`) or of one of its groups."""
    trainings: dict[str | None, Any] = {}
    if earlier is not None:
        trainings = {training_id(g["train"]): g["train"] for g in earlier["earlier_models"]}
        trainings[training_id(earlier["train"])] = earlier["train"]
    now, groups = training_id(done["train"]), {}
    for label, result in done["sets"].items():
        if result["model"] != now:
            groups.setdefault(result["model"], []).append(label)
    return [{"sets": labels, "train": trainings.get(model)} for model, labels in groups.items()]


def _precision_message(exp: Experiment, runs: Sequence[Run]) -> str:
    """Why runs recorded at another precision are not continued here, and the two ways on."""
    record = record_dir(exp, runs[0])
    was = recorded_precision(read_record(record / DONE_FILE) or read_record(record / "run.json"), runs[0].config)
    now = run_precision(runs[0])
    names = ", ".join(r.id for r in runs[:4]) + (f" and {len(runs) - 4} more" if len(runs) > 4 else "")
    return (
        f"{len(runs)} run(s) ({names}) of {exp.name} were recorded at precision {was}, and this machine would train "
        f"them at {now}: results of the two are not mixed. Set precision: {was} in the experiment's base to "
        f"continue them at {was}, or give it another records_dir and runs_dir to rerun everything at {now}"
    )


def run_experiments(
    exps: Sequence[Experiment], *, only: str | None = None, progress: bool = True, stream: Any = None
) -> list[list[dict[str, Any]]]:
    """Run several experiments together, run-major: each run id (in order of first appearance) is trained once and
    evaluated for every experiment that has it before the next run starts, so a run shared through ``runs_dir`` is
    evaluated on all their sets while its model is at hand (records outlive models; see ``records_dir``).
    Finished runs are skipped; a progress line per experiment (see :func:`run_experiment`). Returns each
    experiment's ``DONE.json`` records."""
    plans = [(exp, select_runs(expand_grid(exp), only)) for exp in exps]
    for exp, runs in plans:  # before anything starts: never a grid of two precisions
        other = [r for r in runs if run_status(exp, r) == "precision"]
        if other:
            raise ExperimentError(_precision_message(exp, other))
    meters = [Progress(exp, len(runs), stream) for exp, runs in plans]
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
    """Run every (selected) run in order, skipping finished ones; a progress line logged (on ``stream`` when given)
    and appended to ``<output_dir>/progress.log``. Returns the ``DONE.json`` records."""
    return run_experiments([exp], only=only, progress=progress, stream=stream)[0]
