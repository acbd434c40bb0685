"""The README and the documentation site: their examples run as written, their tables are the registry's and the
config's, the site builds with ``mkdocs build --strict`` and documents every public name, and the README stays a
front door."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import targetsft

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_is_a_front_door():
    """At most 200 lines, no dated or history prose, and every docs link points at a page that exists."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text) and "used to" not in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link


def test_docs_pages_carry_no_dates():
    """The pages state what is true now: no run date (YYYY-MM-DD or YYYY-MM) in any page but the changelog,
    generated sections included (the benchmarks name their machine and command instead)."""
    dated = {
        page.name: re.findall(r"\b20\d\d-\d\d(?:-\d\d)?\b", page.read_text())
        for page in sorted(DOCS.glob("*.md"))
        if page.name != "changelog.md"
    }
    assert not {name: dates for name, dates in dated.items() if dates}


def test_readme_python_example_runs():
    """The README's loss example gives a finite scalar loss with a gradient."""
    import torch

    (block,) = _blocks(README, "python")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["loss"].ndim == 0 and torch.isfinite(namespace["loss"])
    assert namespace["logits"].grad is not None and torch.isfinite(namespace["logits"].grad).all()


def test_library_page_examples_run():
    """Every ```python block of docs/library.md executes in order in one namespace, and its results are what the
    text says: a finite scalar loss, a dense Q that is a distribution at every (supervised) position it was built
    for, and the focal loss's induced γ equal to its closed form (1 − p)² − 2p(1 − p)·log p (above 1 for a small
    p)."""
    import torch

    page = DOCS / "library.md"
    blocks = _blocks(page, "python")
    assert len(blocks) >= 3, "the library page lost its examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
    assert namespace["loss"].ndim == 0 and torch.isfinite(namespace["loss"])
    Q = namespace["Q"]
    assert Q.shape == (1, 4, 49152) and (Q >= 0).all()
    torch.testing.assert_close(Q.sum(-1), torch.ones(1, 4))
    p = torch.softmax(namespace["logits"][0, :8].detach(), -1).gather(-1, namespace["labels"][0, 32:40, None])[:, 0]
    torch.testing.assert_close(namespace["induced"].gamma, (1 - p) ** 2 - 2 * p * (1 - p) * p.log())


@pytest.mark.parametrize("page", [README, DOCS / "integrations.md"], ids=["readme", "integrations"])
def test_trl_example_runs(page, tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    """The TRL snippet, with a tiny student, teacher and dataset standing in for the user's, builds a
    TargetSFTTrainer that trains its 2 steps on this CPU with the fused loss (the lm_head module never runs)."""
    import copy

    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    (block,) = _blocks(page, "py")
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(block, str(page), "exec"), namespace)
    assert not [w for w in caught if "TargetSFTTrainer(" in str(w.message)], "the snippet uses deprecated keywords"
    result = namespace["trainer"].train()
    assert result.global_step == 2 and result.training_loss > 0 and head_calls == []


def test_readme_method_table_matches_registry():
    """The table in the README is exactly ``methods_table()`` (no stale method, γ, π̃ or default); the site's
    Methods page is generated from it."""
    assert targetsft.methods_table() in README.read_text()
    assert "<!-- methods-table -->" in (DOCS / "methods.md").read_text()


def test_license_file_matches_pyproject():
    import tomllib

    root = README.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (root / "LICENSE").read_text()
    assert declared == "Apache-2.0" and "Apache License" in text and "Version 2.0, January 2004" in text


def test_record_formats_are_accepted(tmp_path):
    """The example records of docs/getting-started.md load as written: training records normalise to prompt +
    completion, the generation and multiple-choice lines are read as the set kind the text says."""
    import json

    from targetsft.data.eval_sets import load_eval_set, load_mc_set
    from targetsft.data.sft import to_prompt_completion
    from targetsft.evaluation.suite import set_kind

    training, evaluation = _blocks(DOCS / "getting-started.md", "json")
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


def _public_names() -> list[str]:
    import targetsft.data
    import targetsft.evaluation
    import targetsft.experiments
    import targetsft.functional

    names = [f"targetsft.{n}" for n in targetsft.__all__ if n != "functional"]
    for module in (targetsft.functional, targetsft.data, targetsft.evaluation, targetsft.experiments):
        names += [f"{module.__name__}.{n}" for n in module.__all__ if n not in ("residual", "trust")]
    return names


def test_docs_site_builds_strictly_and_documents_every_public_name(tmp_path):
    """``mkdocs build --strict`` (no broken link, reference or docstring) writes the site; its API page has an
    entry for every name the public packages export, the Methods page the registry's table and the Training page
    every config key."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    missing = []
    for name in _public_names():  # at the package, or at the module it comes from (a package of lazy exports)
        package, _, short = name.rpartition(".")
        if not re.search(rf'id="{re.escape(package)}(\.\w+)?\.{re.escape(short)}"', api):
            missing.append(name)
    assert not missing, f"not in the API reference: {missing}"
    method = (site / "method" / "index.html").read_text()  # formulas rendered to MathML at build time
    assert method.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">') >= 2
    assert '<mover><mrow><mi>&#x003C0;</mi></mrow><mo stretchy="false">&#x0007E;</mo></mover>' in method  # π̃
    assert 'class="arithmatex"' not in method and "\\tilde" not in method
    methods = (site / "methods" / "index.html").read_text()
    assert all(f"<code>{name}</code>" in methods for name in targetsft.METHODS)
    training = (site / "training" / "index.html").read_text()
    from targetsft.training.config import LossConfig

    assert all(f"<code>{f}</code>" in training for f in LossConfig.__dataclass_fields__)
    assert (site / "bench" / "results" / "fused_cpu_qwen.png").is_file() or list(site.glob("bench/results/*.png"))
