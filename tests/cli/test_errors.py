"""Every user-input error of the console script is one line on stderr and exit status 2, found before any model
is loaded; ``--debug`` keeps the traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("target-sft")
pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is installed by setup.sh")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(SCRIPT.parent), "HOME": str(cwd)}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_llama, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "bad.jsonl").write_text(
        json.dumps({"prompt": "1 + 1?", "completion": "#### 2"}) + '\n{"prompt": "2 + 2?", "compl\n'
    )
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes(json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n\xed\xa0\n")
    (root / "junk.parquet").write_bytes(bytes(range(256)) * 8)
    (root / "record").mkdir()
    tiny_llama.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    return root


def test_malformed_training_data_before_the_model_loads(folder):
    out = folder / "out-bad-data"
    proc = run("train", "--config", "configs-none.yaml", cwd=folder)
    one_line_error(proc, "configs-none.yaml")
    proc = run("train", "model=model", f"output_dir={out}", "data.train=bad.jsonl", cwd=folder)
    one_line_error(proc, "target-sft train: error:", "bad.jsonl: line 2: invalid JSON")
    assert not out.exists(), "the trainer started before the input was checked"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["eval", "--model", "/nonexistent/model", "--data", "asdiv"], ["/nonexistent/model", "no such model folder"]),
        (["train", "model=/nonexistent/model"], ["model '/nonexistent/model': no such model folder"]),
        (["train", "model=./record"], ["no config.json"]),
        (["train", "model=model", "data.train=missing.jsonl"], ["data 'missing.jsonl': no such file"]),
        (["train", "model=model", "data.eval=held.jsonl"], ["data 'held.jsonl': no such file"]),
        (["train", "model=model", "data.eval=2"], ["data.eval must be a file, a dataset name or a fraction"]),
        (["train", "model=model", "loss.method=kd", "teacher.cache=nocache"], ["teacher cache 'nocache'"]),
        (["train", "model=model", "loss.method=kd", "teacher.model=../gone/teacher"], ["teacher.model"]),
        (["train", "loss.method=nope"], ["config error", "nope"]),
        (["train", "train.max_step=3"], ["did you mean 'max_steps'"]),
        (["train", "precision=fp8"], ["precision must be one of"]),
        (["cache-teacher", "model=model", "--teacher", "/no/teacher", "--out", "c"], ["teacher '/no/teacher'"]),
        (["noise-fit", "record", "--out", "nf"], ["has no run.json"]),
        (["experiment", "--config", "none.yaml"], ["none.yaml"]),
        (["train", "model=model", "data.train=empty.jsonl"], ["data 'empty.jsonl': no records"]),
        (["train", "model=model", "data.train=latin1.jsonl"], ["latin1.jsonl: line 2: not UTF-8 text"]),
        (["train", "model=model", "data.train=junk.parquet"], ["junk.parquet"]),
        (["train", "model=model", "train.learning_rate=abc"], ["train.learning_rate must be a number, got 'abc'"]),
        (["train", "model=model", "train.max_steps=2.5"], ["train.max_steps must be an integer, got 2.5"]),
        (["train", "model=model", "train.bf16=maybe"], ["train.bf16 must be true or false"]),
        (["train", "--resume", "model=model", "output_dir=fresh"], ["--resume: no checkpoint-N folder", "'fresh'"]),
        (["cache-teacher", "model=model", "--teacher", "model", "--out", "c", "--k", "0"], ["--k must be at least 1"]),
    ],
)
def test_each_input_error_is_one_line_and_status_2(folder, args, needles):
    one_line_error(run(*args, cwd=folder), *needles)


def test_debug_keeps_the_traceback(folder):
    proc = run("train", "--debug", "model=/nonexistent/model", cwd=folder)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "no such model folder" in proc.stderr
