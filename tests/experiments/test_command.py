"""``target-sft experiment``: the dry run, ``--only``, errors, ``--aggregate-only`` and ``--update-results``."""

from __future__ import annotations

import argparse
import copy
import json

from experiment_helpers import ROOT, fake_run, raw_grid
from targetsft import experiments as X
from targetsft.cli.experiment import add_experiment_arguments, run_experiment_from_args


def test_cli_dry_run_only_and_errors(tmp_path, capsys):
    parser = add_experiment_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(ROOT / "experiments" / "smoke.yaml"), "--dry-run"])
    assert run_experiment_from_args(args) == 0
    out = capsys.readouterr().out
    assert "3 runs" in out and "sft-lr5e-05-s0" in out and "target_sft-eta0.5-lr5e-05-s0" in out and "new" in out
    args = parser.parse_args(["--config", str(ROOT / "experiments" / "smoke.yaml"), "--dry-run", "--only", "target"])
    assert run_experiment_from_args(args) == 0
    out = capsys.readouterr().out
    assert "1 runs" in out and "target_sft-eta0.5" in out and "sft-lr5e-05-s0" not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**copy.deepcopy(raw_grid()), "seed": 1}))
    assert run_experiment_from_args(parser.parse_args(["--config", str(bad)])) == 2
    assert "unknown key 'seed' in the experiment" in capsys.readouterr().err
    both = ["--config", str(ROOT / "experiments" / "smoke.yaml"), "--config", str(ROOT / "experiments" / "main.yaml")]
    assert run_experiment_from_args(parser.parse_args([*both, "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "experiment smoke: 3 runs" in out and "experiment main: 14 runs" in out
    assert "tables in runs/experiments/main" in out
    # --update-results names the committed tables; an experiment without results_dir is refused before anything runs
    assert run_experiment_from_args(parser.parse_args([*both[2:], "--dry-run", "--update-results"])) == 0
    assert "tables in results/main" in capsys.readouterr().out
    for extra in (["--update-results"], ["--aggregate-only", "--update-results"]):
        assert run_experiment_from_args(parser.parse_args([*both, *extra])) == 2
        err = capsys.readouterr().err
        assert "--update-results: experiment 'smoke' has no results_dir" in err and "runs/experiments/smoke" in err


def test_cli_aggregate_only_writes_output_dir_unless_update_results(tmp_path, capsys):
    raw = {
        "name": "cli",
        "output_dir": str(tmp_path / "out"),
        "results_dir": str(tmp_path / "results"),
        "runs_dir": str(tmp_path / "runs"),
        "grid": [{"method": "sft", "seeds": [0, 1]}],
        "eval": [{"name": "toy", "set": "toy.jsonl"}, {"name": "mcq", "set": "mcq.jsonl"}],
    }
    exp = X.experiment_from_dict(raw)
    for s in range(2):
        fake_run(exp, tmp_path / "runs", f"sft-s{s}", "sft", "sft", s, [1, s, 0], [1, 0])
    config = tmp_path / "cli.yaml"
    config.write_text(json.dumps(raw))
    parser = add_experiment_arguments(argparse.ArgumentParser())
    assert run_experiment_from_args(parser.parse_args(["--config", str(config), "--aggregate-only"])) == 0
    assert (tmp_path / "out" / "results.md").is_file() and not (tmp_path / "results").exists()
    assert "## toy" in capsys.readouterr().out
    args = parser.parse_args(["--config", str(config), "--aggregate-only", "--update-results"])
    assert run_experiment_from_args(args) == 0
    assert (tmp_path / "results" / "results.md").read_text() == (tmp_path / "out" / "results.md").read_text()
    assert f"tables and plots in {tmp_path / 'results'}" in capsys.readouterr().err
