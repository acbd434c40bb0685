"""The README's examples run as written, and its method table is the registry's."""

import re
from pathlib import Path

import pytest

import targetsft

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    """Every ```python block of the README executes in order in one namespace, and its results are what the text
    says: a finite scalar loss, a dense Q that is a distribution at every (supervised) position it was built for,
    and the focal loss's induced γ equal to its closed form (1 − p)² − 2p(1 − p)·log p (above 1 for a small p)."""
    import torch

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["loss"].ndim == 0 and torch.isfinite(namespace["loss"])
    Q = namespace["Q"]
    assert Q.shape == (1, 4, 49152) and (Q >= 0).all()
    torch.testing.assert_close(Q.sum(-1), torch.ones(1, 4))
    p = torch.softmax(namespace["logits"][0, :8].detach(), -1).gather(-1, namespace["labels"][0, 32:40, None])[:, 0]
    torch.testing.assert_close(namespace["induced"].gamma, (1 - p) ** 2 - 2 * p * (1 - p) * p.log())


def test_readme_trl_example_runs(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    """The TRL snippet, with a tiny student, teacher and dataset standing in for the user's, builds a
    TargetSFTTrainer that trains its 2 steps on this CPU with the fused loss (the lm_head module never runs)."""
    import copy

    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    (block,) = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    tiny_llama.save_pretrained(tmp_path / "teacher")  # loaded from a folder, as a user's teacher is: its tokenizer
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")  # is found beside it and compared with the student's
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"} for i in range(8)]
    namespace = {
        "model": copy.deepcopy(tiny_llama),
        "teacher_model": AutoModelForCausalLM.from_pretrained(tmp_path / "teacher"),
        "tokenizer": tiny_tokenizer,
        "dataset": Dataset.from_list(rows),
    }
    head_calls = []
    namespace["model"].lm_head.register_forward_hook(lambda module, args, out: head_calls.append(out.shape))
    exec(compile(block, str(README), "exec"), namespace)
    result = namespace["trainer"].train()
    assert result.global_step == 2 and result.training_loss > 0 and head_calls == []


def test_readme_method_table_matches_registry():
    """The table in the README is exactly ``methods_table()`` (no stale method, γ, π̃ or default)."""
    assert targetsft.methods_table() in README.read_text()


def test_license_file_matches_pyproject():
    import tomllib

    root = README.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (root / "LICENSE").read_text()
    assert declared == "Apache-2.0" and "Apache License" in text and "Version 2.0, January 2004" in text


def test_readme_record_formats_are_accepted(tmp_path):
    """The README's example records load as written: training records normalise to prompt + completion, the
    generation and multiple-choice lines are read as the set kind the text says."""
    import json

    from targetsft.data.eval_sets import load_eval_set, load_mc_set
    from targetsft.data.sft import to_prompt_completion
    from targetsft.evaluation.suite import set_kind

    training, evaluation = re.findall(r"```json\n(.*?)```", README.read_text(), flags=re.S)
    for line in training.splitlines():
        pc = to_prompt_completion(json.loads(line))
        assert pc["completion"].endswith("#### 42")
    generation, choice = evaluation.splitlines()
    (tmp_path / "gen.jsonl").write_text(generation + "\n")
    (tmp_path / "mc.jsonl").write_text(choice + "\n")
    assert set_kind(str(tmp_path / "gen.jsonl")) == "generation"
    assert set_kind(str(tmp_path / "mc.jsonl")) == "multiple_choice"
    assert load_eval_set(str(tmp_path / "gen.jsonl"))[0]["answer"] == "36"
    assert load_mc_set(str(tmp_path / "mc.jsonl"))[0]["answer_index"] == 1
