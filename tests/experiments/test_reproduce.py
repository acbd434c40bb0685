"""``--reproduce``: a finished run trained again from its record and compared with it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from experiment_helpers import tiny_experiment, tiny_files
from targetsft import experiments as X
from targetsft.cli.experiment import add_experiment_arguments, run_experiment_from_args


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The tiny model and its two sets (``tiny_files``), written once for the module."""
    return tiny_files(tmp_path_factory.mktemp("exp"), tiny_llama, tiny_tokenizer)


def test_reproduce_a_run_from_its_record(tiny_setup, tmp_path, capsys, monkeypatch):
    """``--reproduce``: a teacher-student run trained again from its record in a scratch folder, with the
    experiment's own teacher run and cache, gives the same record on the same machine; a record that does not
    match the rerun is reported and fails the command unless within ``--tolerance``; the committed record is only
    read."""
    from targetsft.training import recipe

    model, qa, mc = tiny_setup
    out = tmp_path / "exp"
    raw = tiny_experiment(out, model, qa, mc, baseline=False, teacher_cache_k=4, gamma_probe=0)
    raw.update(records_dir=str(tmp_path / "records"))
    raw["base"]["train"]["max_steps"] = 3
    raw["grid"] = [
        {"name": "teach", "method": "sft", "seeds": [0]},
        {"method": "target_sft", "teacher": {"model": "@teach-s0"}, "seeds": [0]},
    ]
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(raw))
    exp = X.experiment_from_dict(raw)
    X.run_experiment(exp, progress=False)
    committed = tmp_path / "records" / "target_sft-s0"
    before = {p: p.read_bytes() for p in committed.rglob("*") if p.is_file()}
    caches = sorted((out / "teacher_cache").iterdir())
    parser = add_experiment_arguments(argparse.ArgumentParser())
    args = ["--config", str(path), "--reproduce", "target_sft-s0", "--no-progress"]

    calls, real_train = [], recipe.train

    def spy(cfg, **kwargs):
        calls.append((Path(cfg.output_dir), cfg.teacher.cache))
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(recipe, "train", spy)
    assert run_experiment_from_args(parser.parse_args(args)) == 0
    printed = capsys.readouterr().out
    scratch = out / "reproduce" / "target_sft-s0"
    assert calls == [(scratch / "runs" / "target_sft-s0", str(caches[0]))]  # the teacher's cache, not a new one
    assert sorted((out / "teacher_cache").iterdir()) == caches
    comparison = json.loads((scratch / "comparison.json").read_text())
    assert comparison["identical"], printed
    assert comparison["sets"]["qa"]["identical_items"] == comparison["sets"]["qa"]["items"] == 3
    assert comparison["training"]["steps"] == 3 and comparison["training"]["columns"]["loss"]["max_abs"] == 0
    assert "reproduction of target_sft-s0: identical" in printed and "3/3 items with identical outputs" in printed
    import transformers

    assert f"transformers {transformers.__version__}" in printed  # both environments name the stack
    assert {p: p.read_bytes() for p in committed.rglob("*") if p.is_file()} == before

    # a record that the rerun does not match: reported, status 1, status 0 within the tolerance
    done = json.loads((committed / "DONE.json").read_text())
    value = done["sets"]["mc"]["metrics"]["accuracy"]["value"]
    done["sets"]["mc"]["metrics"]["accuracy"]["value"] = value + 0.25
    (committed / "DONE.json").write_text(json.dumps(done))
    lines = (committed / "metrics.csv").read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    first[header.index("loss")] = str(float(first[header.index("loss")]) + 1.0)
    (committed / "metrics.csv").write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    assert run_experiment_from_args(parser.parse_args(args)) == 1  # the finished reproduction, compared again
    printed = capsys.readouterr().out
    assert "reproduction of target_sft-s0: differs" in printed and "|Δ| 0.2500" in printed
    comparison = json.loads((scratch / "comparison.json").read_text())
    assert comparison["training"]["columns"]["loss"]["max_abs"] == pytest.approx(1.0)
    assert comparison["sets"]["qa"]["identical"] and not comparison["sets"]["mc"]["identical"]
    assert run_experiment_from_args(parser.parse_args([*args, "--tolerance", "0.3"])) == 0
    capsys.readouterr()

    # what cannot be reproduced is said
    for run_id, message in (("nope-s0", "has no run 'nope-s0'"), ("teach-s0", "no finished record")):
        if run_id == "teach-s0":
            (tmp_path / "records" / "teach-s0" / "DONE.json").unlink()
        assert run_experiment_from_args(parser.parse_args([*args[:2], "--reproduce", run_id])) == 1
        assert message in capsys.readouterr().err
    assert run_experiment_from_args(parser.parse_args([*args, "--only", "teach"])) == 2
    raw["base"]["train"]["learning_rate"] = 1e-3
    path.write_text(json.dumps(raw))
    assert run_experiment_from_args(parser.parse_args(args)) == 1
    assert "another configuration" in capsys.readouterr().err
