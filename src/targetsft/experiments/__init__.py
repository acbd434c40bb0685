"""The experiment layer: resumable grids of train + eval runs (:mod:`~targetsft.experiments.grid`,
:mod:`~targetsft.experiments.runner`; where each run stands: :mod:`~targetsft.experiments.status`; a student's teacher
run and teacher cache: :mod:`~targetsft.experiments.teacher_runs`; one run rerun against its record, or its recorded
outputs scored again: :mod:`~targetsft.experiments.reproduce`), their statistics, comparisons, tables and plots
(:mod:`~targetsft.experiments.statistics`, :mod:`~targetsft.experiments.comparisons`,
:mod:`~targetsft.experiments.report`, :mod:`~targetsft.experiments.teachers`, :mod:`~targetsft.experiments.plots`),
and the studies built on finished runs (:mod:`~targetsft.experiments.noise_fit`,
:mod:`~targetsft.experiments.induced_targets`). ``target-sft experiment`` is ``targetsft.cli.experiment``. Imports
every layer below it; its grid API is re-exported here."""

from __future__ import annotations

from targetsft.experiments.grid import (
    EvalSpec,
    Experiment,
    ExperimentError,
    Run,
    RunGroup,
    expand_grid,
    experiment_from_dict,
    load_experiment,
    tables_dir,
    teacher_configs,
)
from targetsft.experiments.plots import write_plots
from targetsft.experiments.records import (
    DONE_FILE,
    PROBE_FILE,
    RECORD_VERSION,
    RecordVersionError,
    compact_records,
    migrate_record,
    recorded_precision,
    run_precision,
    training_id,
)
from targetsft.experiments.report import aggregate, check_one_precision, done_records
from targetsft.experiments.runner import run_experiment, run_experiments, run_one
from targetsft.experiments.statistics import (
    mcnemar_exact,
    paired_comparison,
    rank_correlation,
    t_interval,
    t_quantile,
)
from targetsft.experiments.status import format_progress, run_status

__all__ = [
    "DONE_FILE",
    "EvalSpec",
    "Experiment",
    "ExperimentError",
    "PROBE_FILE",
    "RECORD_VERSION",
    "RecordVersionError",
    "Run",
    "RunGroup",
    "aggregate",
    "check_one_precision",
    "compact_records",
    "done_records",
    "expand_grid",
    "experiment_from_dict",
    "format_progress",
    "load_experiment",
    "mcnemar_exact",
    "migrate_record",
    "paired_comparison",
    "rank_correlation",
    "recorded_precision",
    "run_experiment",
    "run_experiments",
    "run_one",
    "run_precision",
    "run_status",
    "training_id",
    "t_interval",
    "t_quantile",
    "tables_dir",
    "teacher_configs",
    "write_plots",
]
