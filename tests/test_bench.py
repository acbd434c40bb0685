"""The GPU acceptance script runs end to end on a CPU machine in ``--dry-run``: it lists its steps and checks what
each needs, without running them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_lists_every_step():
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for n in range(5):
        assert f"== step {n}:" in out
    assert "tests/test_cuda.py" in out and "--shapes qwen llama3_8b" in out and "liger" in out
    assert re.search(r"transformers +found", out)  # the import check ran
    assert "Qwen2 shape, 1.54B parameters each, V=151936" in out  # the student is built (on the meta device)
    assert "tests/test_vllm.py -m vllm" in out and "bench_generate.py" in out  # the vLLM step
    assert "128 prompts × 16 samples, up to 1024 new tokens, on a random Qwen2 shape of 1.54B" in out
