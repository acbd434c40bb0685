"""The committed results: compact (a clone's checkout stays small, the evaluation items gzip-compressed, no teacher
cache), and still scored again from them to the numbers their records hold (the tables regenerating from them:
``test_records.py``)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from targetsft.cli.experiment import add_experiment_arguments, run_experiment_from_args
from targetsft.experiments.reproduce import rescore_record

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT_LIMIT = 25 * 2**20  # what `du -sh` of a fresh clone's checkout (.git left out) may show
BLOCK = 4096  # the file-system block a file's size is rounded up to by du
LARGEST_RESULT = 2**20  # one tracked file under results/


def _tracked() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def test_the_checkout_stays_small():
    """The tracked files, as du counts them (each rounded up to whole blocks, one block per folder), stay under
    :data:`CHECKOUT_LIMIT`; under results/ no file is over :data:`LARGEST_RESULT`, no evaluation items are kept
    plain (``--compact-records`` compresses them) and no teacher cache is tracked (it is restored or rebuilt:
    docs/results.md)."""
    files = _tracked()
    folders = {p.parent for p in files} | {ROOT}
    on_disk = sum(-(-p.stat().st_size // BLOCK) * BLOCK for p in files) + BLOCK * len(folders)
    assert on_disk <= CHECKOUT_LIMIT, f"the checkout takes {on_disk / 2**20:.1f} MiB"
    results = [p.relative_to(ROOT).as_posix() for p in files if p.is_relative_to(ROOT / "results")]
    assert results, "no committed results"
    assert not [r for r in results if (ROOT / r).stat().st_size > LARGEST_RESULT]
    assert not [r for r in results if r.endswith((".generations.jsonl", ".mc.jsonl"))]
    assert not [r for r in results if r.startswith("results/teacher_cache/")]


@pytest.mark.parametrize("record", ["runs_fp32/gem-lr5e-05-s0", "runs/target_sft-eta1-lr5e-05-s0"])
def test_a_committed_run_scores_again_to_its_record(record):
    """A committed run's compressed items score again, without a model, to every metric its record holds, each
    item's outcome as recorded."""
    folder = ROOT / "results" / record
    assert list(folder.glob("eval/*/*.jsonl.gz")) and not list(folder.glob("eval/*/*.jsonl"))
    comparison = rescore_record(folder)
    assert comparison["identical"], comparison
    assert all(s["interval_gap"] < 1e-12 for s in comparison["sets"].values())


def test_the_rescore_command_on_a_committed_grid(monkeypatch, capsys):
    """``target-sft experiment --config experiments/new_methods.yaml --rescore gem-lr5e-05``, as the docs give it."""
    monkeypatch.chdir(ROOT)  # the experiments name their folders relative to the repository
    parser = add_experiment_arguments(argparse.ArgumentParser())
    args = ["--config", "experiments/new_methods.yaml", "--rescore", "gem-lr5e-05"]
    assert run_experiment_from_args(parser.parse_args(args)) == 0
    printed = capsys.readouterr().out
    assert "re-scoring of gem-lr5e-05-s0: identical" in printed and "asdiv: 300/300 items scored as recorded" in printed
