"""Running an experiment: train (or resume), evaluate and record each run, skipping finished ones.

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
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gc
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import (
    EvalSpec,
    Experiment,
    ExperimentError,
    Run,
    expand_grid,
    run_dir,
    runs_root,
    tables_dir,
    teacher_ref,
    teacher_run_model_dir,
)
from targetsft.experiments.records import (
    DONE_FILE,
    PROBE_FILE,
    RECORD_VERSION,
    RETRAIN_DIR,
    compare_training,
    holds_every_set,
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
from targetsft.losses.methods import get_method
from targetsft.runtime.files import atomic_write_text
from targetsft.runtime.precision import environment
from targetsft.training.config import config_from_dict


def run_status(exp: Experiment, run: Run) -> str:
    """``new``, ``started`` (no checkpoint yet), ``resume`` (a checkpoint), ``evaluate`` (trained, sets missing),
    ``retrain`` (the record says trained, the model is gone), ``done``, ``stale`` (the folder belongs to another
    configuration) or ``precision`` (recorded at another training precision than the run gets on this machine)."""
    out, record = run_dir(exp, run), record_dir(exp, run)
    started, done = read_record(record / "run.json"), read_record(record / DONE_FILE)
    if started is not None and started["fingerprint"] != run_fingerprint(run):
        return "stale"
    if started is not None and not run.is_baseline:
        was = recorded_precision(done or started, run.config)
        if was is not None and was != run_precision(run):
            return "precision"
    if holds_every_set(done, exp):
        return "done"
    if run.is_baseline or trained(exp, run):
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
    from targetsft.training import trainer

    out, record = run_dir(exp, run), record or record_dir(exp, run)
    if trained(exp, run):
        summary = json.loads((out / "summary.json").read_text())
    else:
        config = json.loads(json.dumps(run.config))
        ref = teacher_ref(run)
        if ref is not None:
            config["teacher"]["model"] = str(_teacher_model(teachers or exp, run, ref, log))
        if exp.teacher_cache_k and (config.get("teacher") or {}).get("model"):
            teacher = config["teacher"]
            if teacher.get("prompt") == "own_template":  # its prompts are still rendered by its tokenizer
                teacher = {**teacher, "tokenizer": teacher.get("tokenizer") or teacher["model"]}
            config["teacher"] = {**teacher, "model": None, "cache": str(_teacher_cache(exp, config, log))}
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
    if not (record_dir(exp, teacher) / DONE_FILE).is_file():
        raise ExperimentError(f"run {run.id}: its teacher run {ref!r} is not done ({record_dir(exp, teacher)})")
    model = teacher_run_model_dir(run_dir(exp, teacher), run.config["teacher"]["model"])
    config = {**run.config, "teacher": {**run.config["teacher"], "model": str(model)}}
    cached = exp.teacher_cache_k and (_teacher_cache_folder(exp, config) / "COMPLETE").is_file()
    if not cached and not (trained(exp, teacher) and model.is_dir()):
        log(f"training {teacher.id} (retrain: the teacher of {run.id}; its model is gone)")
        shutil.rmtree(run_dir(exp, teacher) / "snapshots", ignore_errors=True)  # rewritten by the new training
        _retrain_teacher(exp, teacher, log)
    return model


def _retrain_teacher(exp: Experiment, teacher: Run, log: Callable[[str], None]) -> None:
    """Train a finished teacher run again (its model lost), its training's record in ``<record>/retrain/`` beside
    ``comparison.json``, the new training logs against the recorded ones: the record keeps the training it was
    evaluated on, and the log says whether the students' new teacher is the same."""
    recorded, folder = record_dir(exp, teacher), record_dir(exp, teacher) / RETRAIN_DIR
    if recorded == run_dir(exp, teacher):  # no records_dir: the record is the run folder, rewritten by the trainer
        _train(exp, teacher, log)
        return
    folder.mkdir(parents=True, exist_ok=True)
    _train(exp, teacher, log, record=folder)
    comparison = compare_training(recorded, folder)
    write_json(folder / "comparison.json", comparison)
    loss = comparison["columns"].get("loss", {}).get("max_abs", math.nan)
    same = "identical to" if comparison["identical"] else f"not identical to (largest |Δ loss| {loss:.3g})"
    log(f"retrained {teacher.id}: its training log is {same} the recorded one ({folder / 'comparison.json'})")


def _teacher_key(config: dict[str, Any]) -> dict[str, Any]:
    """What a teacher cache depends on: the teacher section (with its model), the student model, the data and the
    method's teacher temperature (named only when it is not 1, so that caches built before it was keep their key)."""
    key = {k: config.get(k) for k in ("model", "data", "teacher")}
    temperature = _teacher_temperature(config)
    return key if temperature == 1.0 else {**key, "temperature": temperature}


def _teacher_temperature(config: dict[str, Any]) -> float:
    method = config["loss"]["method"]
    return float({**get_method(method).defaults, **config["loss"].get("params", {})}.get("temperature", 1.0))


def _teacher_cache_folder(exp: Experiment, config: dict[str, Any]) -> Path:
    """``<teacher_cache_dir>/<hash of the teacher, its prompt, the model, the data and k>``."""
    from targetsft.runtime.files import sha256_json

    return teacher_cache_root(exp) / sha256_json({**_teacher_key(config), "k": exp.teacher_cache_k})[:16]


def teacher_cache_root(exp: Experiment) -> Path:
    """``teacher_cache_dir``, by default ``teacher_cache/`` beside the runs folder."""
    return Path(exp.teacher_cache_dir) if exp.teacher_cache_dir else runs_root(exp).parent / "teacher_cache"


def _teacher_cache(exp: Experiment, config: dict[str, Any], log: Callable[[str], None]) -> Path:
    """The top-k cache of the run's teacher over its training data, built on first use (resumable)."""
    from targetsft.training.teacher_cache import command

    folder, key = _teacher_cache_folder(exp, config), _teacher_key(config)
    if not (folder / "COMPLETE").is_file():
        log(f"teacher cache: building {folder} (teacher {config['teacher']['model']}, k={exp.teacher_cache_k})")
        t0 = time.time()
        temperature = _teacher_temperature(config)
        command.cache_teacher(config_from_dict(config), folder, k=exp.teacher_cache_k, temperature=temperature)
        atomic_write_text(folder / "COMPLETE", json.dumps({**key, "seconds": round(time.time() - t0, 1)}, default=str))
    return folder


def label_logprobs(model: Any, items: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Per tokenized example, ``log p_θ(y_t)`` of each supervised token (one forward pass each, no grad)."""
    import torch

    from targetsft.training.integration import IGNORE_INDEX, unwrap

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


def probe_histogram(values: Sequence[float], bins: int = 20) -> dict[str, Any]:
    """Mean, quantiles (10/25/50/75/90%, nearest rank) and a histogram on ``bins`` equal bins of [0, 1]."""
    v = sorted(values)
    n = len(v)
    quantiles = {f"q{int(100 * q)}": v[min(n - 1, int(q * n))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if n else {}
    hist = [0] * bins
    for x in v:
        hist[min(bins - 1, int(x * bins))] += 1
    return {"n": n, "mean": math.fsum(v) / n if n else math.nan, **quantiles, "hist": hist}


def _gamma_probe(cfg: Any, examples: int, path: Path) -> Any:
    """A TrainerCallback that records :func:`probe_histogram` of :func:`label_probabilities` on the first ``examples``
    training examples at the start and about every tenth of training into ``path`` (JSON lines, one per step)."""
    from transformers import TrainerCallback

    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.dataset import build_dataset

    small = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, size=min(examples, cfg.data.size or examples)))
    items, _ = build_dataset(small, load_tokenizer(resolve_model(cfg.model)))

    class GammaProbe(TrainerCallback):
        def _record(self, state: Any, model: Any) -> None:
            record = probe_histogram(label_probabilities(model, items))  # on every rank: sharded models need them all
            if state.is_world_process_zero:
                rows = read_probe(path) | {state.global_step: record}
                atomic_write_text(path, "".join(json.dumps({"step": k, **v}) + "\n" for k, v in sorted(rows.items())))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = max(1, state.max_steps // 10)
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self._record(state, model)

    return GammaProbe()


def read_probe(path: Path) -> dict[int, dict[str, Any]]:
    """``{step: distribution}`` from a probe file (a step recorded twice, after a resume: the last one)."""
    from targetsft.data.sft import read_jsonl

    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in read_jsonl(path)} if path.is_file() else {}


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
    items = Path(summary["files"]["items"]).name
    return {"spec": spec_dict(spec), "kind": kind, "n": summary["n"], "metrics": summary["metrics"], "items": items}


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


def select_runs(runs: Sequence[Run], only: str | None) -> list[Run]:
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
        root = tables_dir(exp)
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
    plans = [(exp, select_runs(expand_grid(exp), only)) for exp in exps]
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
