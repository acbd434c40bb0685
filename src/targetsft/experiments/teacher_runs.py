"""A student's teacher in an experiment: a teacher run of the grid (retrained when its model is gone and its cache
is not built) and the top-k teacher cache, kept under a key of what it depends on (the teacher, the student model,
the data, the method's teacher temperature and k)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import (
    Experiment,
    ExperimentError,
    Run,
    expand_grid,
    run_dir,
    runs_root,
    teacher_run_model_dir,
)
from targetsft.experiments.records import DONE_FILE, RETRAIN_DIR, compare_training, record_dir, trained, write_json
from targetsft.losses.methods import get_method
from targetsft.runtime.files import atomic_write_text
from targetsft.training.config import config_from_dict

# train(exp, run, log, record=None): train one run (resumed when it can be), its training's record in ``record``
TrainRun = Callable[..., dict[str, Any]]


def teacher_model(exp: Experiment, run: Run, ref: str, log: Callable[[str], None], train: TrainRun) -> Path:
    """The final model folder of the teacher run ``ref``, which must be done; retrained first (by ``train``) when its
    model is gone and its cache (if the experiment caches teachers) is not already built."""
    teacher = next(r for r in expand_grid(exp) if r.id == ref)
    if not (record_dir(exp, teacher) / DONE_FILE).is_file():
        raise ExperimentError(f"run {run.id}: its teacher run {ref!r} is not done ({record_dir(exp, teacher)})")
    model = teacher_run_model_dir(run_dir(exp, teacher), run.config["teacher"]["model"])
    config = {**run.config, "teacher": {**run.config["teacher"], "model": str(model)}}
    cached = exp.teacher_cache_k and (teacher_cache_folder(exp, config) / "COMPLETE").is_file()
    if not cached and not (trained(exp, teacher) and model.is_dir()):
        log(f"training {teacher.id} (retrain: the teacher of {run.id}; its model is gone)")
        shutil.rmtree(run_dir(exp, teacher) / "snapshots", ignore_errors=True)  # rewritten by the new training
        retrain_teacher(exp, teacher, log, train)
    return model


def retrain_teacher(exp: Experiment, teacher: Run, log: Callable[[str], None], train: TrainRun) -> None:
    """Train a finished teacher run again (its model lost), its training's record in ``<record>/retrain/`` beside
    ``comparison.json``, the new training logs against the recorded ones: the record keeps the training it was
    evaluated on, and the log says whether the students' new teacher is the same."""
    recorded, folder = record_dir(exp, teacher), record_dir(exp, teacher) / RETRAIN_DIR
    if recorded == run_dir(exp, teacher):  # no records_dir: the record is the run folder, rewritten by the trainer
        train(exp, teacher, log)
        return
    folder.mkdir(parents=True, exist_ok=True)
    train(exp, teacher, log, record=folder)
    comparison = compare_training(recorded, folder)
    write_json(folder / "comparison.json", comparison)
    loss = comparison["columns"].get("loss", {}).get("max_abs", math.nan)
    same = "identical to" if comparison["identical"] else f"not identical to (largest |Δ loss| {loss:.3g})"
    log(f"retrained {teacher.id}: its training log is {same} the recorded one ({folder / 'comparison.json'})")


def teacher_key(config: dict[str, Any]) -> dict[str, Any]:
    """What a teacher cache depends on: the teacher section (with its model), the student model, the data and the
    method's teacher temperature (named only when it is not 1, so that caches built before it was keep their key)."""
    key = {k: config.get(k) for k in ("model", "data", "teacher")}
    temperature = teacher_temperature(config)
    return key if temperature == 1.0 else {**key, "temperature": temperature}


def teacher_temperature(config: dict[str, Any]) -> float:
    """The temperature the run's method applies to its teacher (its ``temperature`` parameter; 1 without one)."""
    method = config["loss"]["method"]
    return float({**get_method(method).defaults, **config["loss"].get("params", {})}.get("temperature", 1.0))


def teacher_cache_folder(exp: Experiment, config: dict[str, Any]) -> Path:
    """``<teacher_cache_dir>/<hash of the teacher, its prompt, the model, the data and k>``."""
    from targetsft.runtime.files import sha256_json

    return teacher_cache_root(exp) / sha256_json({**teacher_key(config), "k": exp.teacher_cache_k})[:16]


def teacher_cache_root(exp: Experiment) -> Path:
    """``teacher_cache_dir``, by default ``teacher_cache/`` beside the runs folder."""
    return Path(exp.teacher_cache_dir) if exp.teacher_cache_dir else runs_root(exp).parent / "teacher_cache"


def teacher_cache(exp: Experiment, config: dict[str, Any], log: Callable[[str], None]) -> Path:
    """The top-k cache of the run's teacher over its training data, built on first use (resumable)."""
    from targetsft.training.teacher_cache import from_config

    folder, key = teacher_cache_folder(exp, config), teacher_key(config)
    if not (folder / "COMPLETE").is_file():
        log(f"teacher cache: building {folder} (teacher {config['teacher']['model']}, k={exp.teacher_cache_k})")
        t0 = time.time()
        temperature = teacher_temperature(config)
        from_config.cache_teacher(config_from_dict(config), folder, k=exp.teacher_cache_k, temperature=temperature)
        atomic_write_text(folder / "COMPLETE", json.dumps({**key, "seconds": round(time.time() - t0, 1)}, default=str))
    return folder
