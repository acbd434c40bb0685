"""``--reproduce``: a finished run trained again from its record and compared with it."""

from __future__ import annotations

import argparse
import gzip
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


def _rescore_record(record: Path, spec: dict, mc_spec: dict) -> None:
    """A finished record written by hand: a generation set (one item right, one wrong) and a multiple-choice set."""
    from targetsft.evaluation import generation_metrics
    from targetsft.evaluation.rescore import rescore_choices

    gen = [
        {"id": "q0", "gold": "3", "samples": [{"text": "#### 3", "correct": True}], "greedy": None},
        {"id": "q1", "gold": "5", "samples": [{"text": "so 4", "correct": False}], "greedy": None},
    ]
    mc = [
        {"id": "m0", "answer_index": 1, "pred_mean": 1, "pred_sum": 0, "logprob_sum": [-3.0, -4.0], "n_tokens": [1, 2]}
    ]
    sets = {
        "qa": (spec, "generation", gen, "qa.generations.jsonl", generation_metrics([[True], [False]])),
        "mc": (mc_spec, "multiple_choice", mc, "mc.mc.jsonl", rescore_choices(mc)[0]),
    }
    done = {"record_version": X.RECORD_VERSION, "run": record.name, "sets": {}}
    for label, (s, kind, rows, name, metrics) in sets.items():
        folder = record / "eval" / label
        folder.mkdir(parents=True)
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = {"spec": s, "kind": kind, "n": len(rows), "metrics": metrics, "items": name, "model": None}
        (folder / "result.json").write_text(json.dumps({"record_version": X.RECORD_VERSION, **result}))
        done["sets"][label] = {**result, "items": f"eval/{label}/{name}"}
    (record / "DONE.json").write_text(json.dumps(done))


def test_rescore_scores_the_recorded_outputs_again(tmp_path, capsys):
    """``--rescore PATTERN``: the finished runs' recorded outputs scored again without a model, before and after
    ``--compact-records`` stores them compressed; an item recorded with an outcome its text does not give is named,
    and a metric that differs from its record fails the command unless within ``--tolerance``."""
    import dataclasses

    raw = {
        "name": "r",
        "output_dir": str(tmp_path / "out"),
        "records_dir": str(tmp_path / "records"),
        "base": {"data": {"size": 8}, "train": {"max_steps": 2}},
        "grid": [{"method": "sft", "seeds": [0, 1]}],
        "eval": [{"name": "qa", "set": str(tmp_path / "qa.jsonl"), "greedy": False}, {"name": "mc", "set": "piqa"}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(raw))
    exp = X.experiment_from_dict(raw)
    specs = [dataclasses.asdict(s) for s in exp.eval]
    record = tmp_path / "records" / "sft-s0"  # sft-s1 is not finished: not re-scored
    _rescore_record(record, *specs)
    parser = add_experiment_arguments(argparse.ArgumentParser())
    args = ["--config", str(path), "--rescore", "*"]
    assert run_experiment_from_args(parser.parse_args(args)) == 0
    printed = capsys.readouterr().out
    assert "re-scoring of sft-s0: identical" in printed and "sft-s1" not in printed
    assert "qa: 2/2 items scored as recorded" in printed and "mc: 1/1 items scored as recorded" in printed

    assert run_experiment_from_args(parser.parse_args(["--config", str(path), "--compact-records"])) == 0
    assert "r: 2 items file(s) compressed" in capsys.readouterr().err
    items = record / "eval" / "qa" / "qa.generations.jsonl"
    assert not items.exists() and items.with_name(items.name + ".gz").is_file()
    assert run_experiment_from_args(parser.parse_args(args)) == 0
    assert capsys.readouterr().out == printed

    gen = [json.loads(line) for line in gzip.decompress(items.with_name(items.name + ".gz").read_bytes()).splitlines()]
    gen[1]["samples"][0]["correct"] = True  # "so 4" for 5, recorded as right
    items.write_text("".join(json.dumps(r) + "\n" for r in gen))  # a plain file beside the .gz is the one read
    assert run_experiment_from_args(parser.parse_args(args)) == 0  # the metrics, from the texts, agree
    printed = capsys.readouterr().out
    assert "re-scoring of sft-s0: differs" in printed and "1/2 items scored as recorded" in printed
    assert "changed: q1" in printed
    done = json.loads((record / "DONE.json").read_text())
    done["sets"]["qa"]["metrics"]["average@1"]["value"] = 1.0
    (record / "DONE.json").write_text(json.dumps(done))
    assert run_experiment_from_args(parser.parse_args(args)) == 1
    assert "average@1    recorded 1.0000  rescored 0.5000  |Δ| 0.5000" in capsys.readouterr().out
    assert run_experiment_from_args(parser.parse_args([*args, "--tolerance", "0.5"])) == 0
    capsys.readouterr()
    assert run_experiment_from_args(parser.parse_args([*args[:3], "nope"])) == 1
    assert "no finished run matching 'nope'" in capsys.readouterr().err
    assert run_experiment_from_args(parser.parse_args([*args, "--only", "sft"])) == 2
