"""The GPU acceptance run (``bench/gpu_check.sh``) without a GPU: its dry run, its wheels folder, its summary's
arithmetic, and its CPU rehearsal end to end in a venv with the GPU image's transformers
(``bench/gpu_rehearsal.sh``)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402
import gpu_wheels  # noqa: E402


def _bash(*args: str, timeout: int, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {"PYTHON": python, "PROJECT_PYTHON": sys.executable, "PATH": os.environ["PATH"]}
    env["HOME"] = os.environ.get("HOME", "/tmp")
    return subprocess.run(["bash", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_lists_every_step_and_what_it_finds(tmp_path):
    proc = _bash(str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for n in range(5):
        assert f"== step {n}:" in out
    assert "tests/scale/test_cuda.py" in out and "--shapes qwen llama3_8b --n 8192" in out and "--dtype bf16" in out
    assert "liger" in out and "cce" in out and "trl" in out
    assert re.search(r"transformers +found", out)  # the import check ran
    assert "cuda               NOT AVAILABLE" in out
    assert "student: Qwen2 shape, 1.54B parameters, V=151936; teacher: 1.54B, V=152064" in out  # meta device
    assert not (tmp_path / "out" / "environment.json").exists()  # a dry run writes nothing


def test_gpu_check_needs_an_output_folder_and_a_gpu(tmp_path):
    proc = _bash(str(ROOT / "bench" / "gpu_check.sh"), timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    if not __import__("torch").cuda.is_available():
        proc = _bash(str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), timeout=300)
        assert proc.returncode == 2 and "no CUDA device here" in proc.stderr


def test_wheels_check_finds_a_missing_wheel_and_an_oversized_folder(tmp_path):
    (tmp_path / "requirements.txt").write_text("trl==1.0\ndatasets==5.0\n")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    (tmp_path / "trl-1.0-py3-none-any.whl").write_bytes(b"x")
    assert gpu_wheels.check(tmp_path) == ["no wheel for datasets==5.0"]
    with (tmp_path / "datasets-5.0-py3-none-any.whl").open("wb") as f:
        f.truncate(65 * 2**20)  # sparse: 65 MiB of apparent size
    problems = gpu_wheels.check(tmp_path)
    assert len(problems) == 1 and "over the 64 MiB" in problems[0]
    assert gpu_wheels.check(tmp_path / "absent")[0].endswith("run python bench/gpu_wheels.py")


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_ratios_are_those_of_the_rows(tmp_path):
    base = {"shape": "qwen", "n": "8192", "h": "1536", "v": "151936", "dtype": "bf16", "error": ""}
    fused = [
        {**base, "impl": "naive", "time_s": "2.0", "peak_mb": "4000"},
        {**base, "impl": "trl", "time_s": "0.5", "peak_mb": "500"},
        {**base, "impl": "liger", "time_s": "", "peak_mb": "", "error": "ImportError: triton"},
        {**base, "impl": "fused_sft", "time_s": "1.0", "peak_mb": "250"},
    ]
    _write(tmp_path / "fused.csv", fused)
    common = {"size": "gpu", "params_b": "1.54", "teacher_vocab": "152064", "steps": "20", "batch": "8", "seq": "512"}
    train = [
        {**common, "mode": "sft", "tokens_per_s": "3000", "step_s": "0.4", "peak_mb": "30000", "loss": "11.9"},
        {**common, "mode": "trl_nll", "tokens_per_s": "2000", "step_s": "0.6", "peak_mb": "40000", "loss": "11.9"},
    ]
    _write(tmp_path / "train.csv", [{**r, "error": "", "cache_build_s": ""} for r in train])
    (tmp_path / "environment.json").write_text(json.dumps({"device": "H100", "torch": "2.11.0", "carried": []}))
    text = gpu_summary.summary(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| fused_sft |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # time / naive, / torch_lce, / trl, / liger, / cce, then memory in the same order, then the row's own figures
    assert cells[1:6] == ["0.50", "–", "2.00", "–", "–"] and cells[6:11] == ["0.06", "–", "0.50", "–", "–"]
    assert "liger did not run: `ImportError: triton`" in text
    assert "| sft | 3000 | 1.50 | 0.4 | 30000 | 0.75 | 11.9 |" in text
    assert text.startswith("# GPU acceptance run") and "Machine: device H100, torch 2.11.0." in text


def test_cpu_rehearsal_of_the_gpu_run(tmp_path):
    """``bash bench/gpu_rehearsal.sh``: every step of the acceptance run on tiny shapes on the CPU, in a venv with the
    GPU image's transformers (5.17.0) and without TRL, datasets, Liger and CCE, which come from ``.whl/`` (built
    here, under 64 MiB). Builds .venv-gpu/ on first use (a minute; needs the package index setup.sh uses)."""
    out = tmp_path / "out"
    proc = _bash(str(ROOT / "bench" / "gpu_rehearsal.sh"), str(out), timeout=1200, python="python3.11")
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert gpu_wheels.check() == [] and gpu_wheels.size_mib() < gpu_wheels.LIMIT_MIB
    env = json.loads((out / "environment.json").read_text())
    assert env["transformers"] == "5.17.0"
    assert {c.split("==")[0] for c in env["carried"]} >= {"trl", "datasets"}  # installed from .whl/ by the run
    summary = (out / "summary.md").read_text()
    assert re.search(r"CUDA tests \(`tests/scale/test_cuda.py`\): 1\d passed, 0 failed", summary)
    fused = {r["impl"]: r for r in csv.DictReader((out / "fused.csv").open())}
    for impl in ("naive", "trl", "fused_sft", "fused_dft", "fused_target_sft_top64"):
        assert not fused[impl]["error"] and float(fused[impl]["time_s"]) > 0, fused[impl]
    train = {r["mode"]: r for r in csv.DictReader((out / "train.csv").open())}
    assert set(train) == {"sft", "target_sft_online", "target_sft_cache", "trl_nll"}
    for mode, row in train.items():
        assert not row["error"] and float(row["tokens_per_s"]) > 0 and float(row["loss"]) > 0, (mode, row)
    assert float(train["target_sft_cache"]["cache_build_s"]) > 0
