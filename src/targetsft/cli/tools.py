"""The commands of the studies and data-preparation tools: ``target-sft induced-targets``
(:func:`targetsft.experiments.induced_targets.write_induced_targets`), ``noise-fit``
(:func:`targetsft.experiments.noise_fit.noise_fit`), ``importance-weights``
(:func:`targetsft.prep.importance_weights.importance_weights`) and ``mark-critical``
(:func:`targetsft.prep.critical_tokens.mark_critical`): each one's options and the call they make."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from targetsft.cli.arguments import add_config_arguments, add_scoring_engine_argument, options_of
from targetsft.prep.critical_tokens import POSITIONS

DATA_CONFIG_HELP = "training config whose data section gives the records (default: gsm-train)"


def add_induced_targets_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft induced-targets`` options to ``p``."""
    p.add_argument("--model", default=None, help="student (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--teacher", required=True, help="teacher model path (same tokenizer)")
    p.add_argument("--teacher-prompt", default="same", choices=["same", "answer_hint"])
    p.add_argument("--data", default="gsm-train", help="training data (as data.train of a training config)")
    p.add_argument("--examples", type=int, default=32, help="training examples (from data seed 0)")
    p.add_argument("--eta", type=float, default=0.5)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--top", type=int, default=5, help="teacher tokens counted as 'teacher's top'")
    p.add_argument("--out", required=True, help="folder for induced_targets.{csv,json} and the plots")
    return p


def run_induced_targets_from_args(args: argparse.Namespace) -> int:
    from targetsft.experiments.induced_targets import write_induced_targets

    names = ("teacher", "model", "teacher_prompt", "data", "examples", "eta", "epsilon", "top")
    study, plots = write_induced_targets(args.out, **options_of(args, *names))
    for path in plots:
        print(f"wrote {path}")
    print(f"{study['tokens']} tokens; see {Path(args.out) / 'induced_targets.csv'}")
    return 0


def add_noise_fit_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft noise-fit`` options to ``p``."""
    p.add_argument("records", nargs="+", help="finished runs' record folders (with run.json), trained with label noise")
    p.add_argument(
        "--label-noise",
        type=float,
        default=None,
        help="score on the examples this label noise corrupts in each run's data (default: the run's own; "
        "a clean run then gives the control: the same examples, learned with their true answers)",
    )
    p.add_argument("--base", action="store_true", help="also score the model each run started from")
    p.add_argument("--teacher", action="store_true", help="also score the teacher each run was trained against")
    p.add_argument("--examples", type=int, default=None, help="the first N corrupted examples of a run (default all)")
    p.add_argument("--out", required=True, help="folder for noise_fit.csv and .json (added to)")
    add_scoring_engine_argument(p, "model (both in float32)")
    return p


def run_noise_fit_from_args(args: argparse.Namespace) -> int:
    from targetsft.experiments.noise_fit import noise_fit

    noise_fit(args.records, args.out, **options_of(args, "label_noise", "base", "teacher", "examples", "engine"))
    return 0


def add_importance_weights_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft importance-weights`` options to ``p``."""
    add_config_arguments(p, DATA_CONFIG_HELP, "key=value overrides of the config")
    p.add_argument("--target", required=True, help="the policy q the trajectories are weighted towards (model)")
    p.add_argument("--reference", default=None, help="π_ref, the policy they came from (default: the config's model)")
    p.add_argument("--out", required=True, help="JSONL to write (records with weight and log_ratio)")
    p.add_argument("--examples", type=int, default=None, help="first N records (default: the config's data size)")
    p.add_argument("--per-token", action="store_true", help="length-normalised log-ratio (geometric mean)")
    p.add_argument("--min-weight", type=float, default=0.0, help="floor of the weights, in [0, 1] (default 0)")
    return p


def run_importance_weights_from_args(args: argparse.Namespace) -> int:
    from targetsft.prep.importance_weights import importance_weights

    cfg = _checked_config(args, target="--target", reference="--reference")
    weights = importance_weights(
        cfg, args.out, **options_of(args, "target", "reference", "examples", "per_token", "min_weight")
    )
    print(
        f"{len(weights)} records, weights {min(weights):.3g}–{max(weights):.3g} "
        f"(mean {sum(weights) / len(weights):.3g}): {args.out}"
    )
    return 0


def add_mark_critical_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft mark-critical`` options to ``p``."""
    add_config_arguments(p, DATA_CONFIG_HELP, "key=value overrides of the config")
    p.add_argument("--model", default=None, help="the model that rolls out (default: the config's model)")
    p.add_argument("--out", required=True, help="JSONL to write (records with token_weights)")
    p.add_argument("--examples", type=int, default=8, help="first N records of the data (default 8)")
    p.add_argument("--alternatives", type=int, default=2, help="alternative tokens tried per position (default 2)")
    p.add_argument("--positions", choices=POSITIONS, default="numbers", help="tokens examined (default: numbers)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    return p


def run_mark_critical_from_args(args: argparse.Namespace) -> int:
    from targetsft.prep.critical_tokens import mark_critical

    cfg = _checked_config(args, model="model")
    names = ("model", "examples", "alternatives", "positions", "max_new_tokens", "batch_size")
    marked = mark_critical(cfg, args.out, **options_of(args, *names))
    examined, critical = sum(m["examined"] for m in marked), sum(m["critical"] for m in marked)
    rollouts = sum(m["rollouts"] for m in marked)
    print(f"{len(marked)} records, {examined} tokens examined, {critical} critical, {rollouts} rollouts: {args.out}")
    return 0


def _checked_config(args: argparse.Namespace, **models: str) -> Any:
    """The config of ``--config`` + overrides with its inputs checked, and each model option (``attribute=flag``)
    checked, before a model loads."""
    from targetsft.runtime.inputs import check_model
    from targetsft.training.config import check_inputs, load_config

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    for attribute, flag in models.items():
        check_model(getattr(args, attribute), flag)
    return cfg
