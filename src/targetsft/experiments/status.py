"""Where each run of an experiment stands and how far the experiment is: a run's status (what running it would do),
the dry run's plan, its complete checkpoints, the runs ``--only`` selects, and the progress line (runs done, left,
elapsed, ETA)."""

from __future__ import annotations

import fnmatch
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import Experiment, Run, run_dir, tables_dir
from targetsft.experiments.records import (
    DONE_FILE,
    holds_every_set,
    read_record,
    record_dir,
    recorded_precision,
    run_fingerprint,
    run_precision,
    trained,
)

logger = logging.getLogger(__name__)


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
    if complete_checkpoints(out):
        return "resume"
    if (record / "summary.json").is_file():
        return "retrain"
    return "started" if out.exists() or started is not None else "new"


def format_plan(exp: Experiment, runs: Sequence[Run], update_results: bool = False) -> str:
    """The runs of a dry run: index, id, method, status, folder; the header says where the tables would go."""
    lines = [
        f"experiment {exp.name}: {len(runs)} runs, eval sets {[s.label for s in exp.eval]}, "
        f"tables in {tables_dir(exp, update_results)}"
    ]
    for i, run in enumerate(runs, 1):
        lines.append(f"{i:4d}  {run.id:<48s} {run.method:<20s} {run_status(exp, run):<9s} {run_dir(exp, run)}")
    return "\n".join(lines)


def complete_checkpoints(out: Path) -> list[Path]:
    """``checkpoint-N`` folders that hold ``trainer_state.json`` (the Trainer writes it last)."""
    return [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]


def drop_incomplete_checkpoints(out: Path, log: Callable[[str], None]) -> None:
    """Remove the ``checkpoint-N`` folders of ``out`` that an interrupted save left without ``trainer_state.json``."""
    for p in out.glob("checkpoint-*"):
        if p.is_dir() and not (p / "trainer_state.json").is_file():
            log(f"removing incomplete {p.name} of an interrupted save")
            shutil.rmtree(p)


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


class Progress:
    """One experiment's progress line, logged (or written to ``stream`` when given) and appended to
    ``<output_dir>/progress.log``."""

    def __init__(self, exp: Experiment, total: int, stream: Any) -> None:
        self.exp, self.total, self.stream = exp, total, stream
        self.done, self.durations, self.t0 = 0, [], time.perf_counter()
        root = tables_dir(exp)
        root.mkdir(parents=True, exist_ok=True)
        self.logfile = root / "progress.log"

    def log(self, message: str) -> None:
        """Print the line (runs done, left, elapsed, ETA and ``message``) and append it, timed, to the log file."""
        line = format_progress(self.done, self.total, time.perf_counter() - self.t0, self.durations, message)
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()
        else:
            logger.info(line)
        with self.logfile.open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.exp.name} {line}\n")
