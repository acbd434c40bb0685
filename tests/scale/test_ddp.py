"""Two-process data parallelism (``accelerate launch --multi_gpu --num_processes 2``: gloo on a CPU-only
machine) gives the weights of one process with the same global batch."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = Path(__file__).with_name("ddp_worker.py")
SFT_WORKER = Path(__file__).with_name("sft_worker.py")


def _run(nproc: int, overrides: list[str], cwd: Path, worker: Path = WORKER) -> None:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1"]
    if nproc == 1:
        cmd = [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*cmd, str(worker), *overrides], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method", ["sft", "target_sft"])
def test_two_processes_equal_one(method, tmp_path, tiny_tokenizer, tiny_llama):
    student = tmp_path / "student"
    tiny_llama.save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)
    teacher = tmp_path / "teacher"
    torch.manual_seed(7)
    transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config)).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    common = [
        f"model={student}",
        "data.size=16",
        "data.max_length=1024",
        "train.max_steps=3",
        "train.learning_rate=1e-3",
        "train.warmup_steps=0",
        "train.bf16=false",
        "train.report_to=[]",
        "train.save_steps=100",
        "train.disable_tqdm=true",
        "train.dataloader_drop_last=true",
        f"loss.method={method}",
    ]
    if method == "target_sft":
        common.append(f"teacher.model={teacher}")
    _run(1, [*common, f"output_dir={tmp_path / 'one'}", "train.per_device_train_batch_size=4"], tmp_path)
    _run(2, [*common, f"output_dir={tmp_path / 'two'}", "train.per_device_train_batch_size=2"], tmp_path)
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    start = tiny_llama.state_dict()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-4  # training did change the weights
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("method", ["dft", "target_sft"])
def test_target_sft_trainer_two_processes_equal_one(method, tmp_path, tiny_tokenizer, tiny_llama):
    """TRL's SFTTrainer with the fused loss (TargetSFTTrainer) under DDP: the weights of one process."""
    pytest.importorskip("trl")
    student = tmp_path / "student"
    tiny_llama.save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)
    teacher = []
    if method == "target_sft":
        torch.manual_seed(7)
        transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config)).save_pretrained(tmp_path / "teacher")
        tiny_tokenizer.save_pretrained(tmp_path / "teacher")  # compared with the student's by TargetSFTTrainer
        teacher = [str(tmp_path / "teacher")]
    _run(1, [str(student), str(tmp_path / "one"), "4", method, *teacher], tmp_path, SFT_WORKER)
    _run(2, [str(student), str(tmp_path / "two"), "2", method, *teacher], tmp_path, SFT_WORKER)
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    start = tiny_llama.state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


def test_the_command_line_ends_the_process_group(tmp_path, capsys):
    """A command run in a process group (as under ``accelerate launch``) destroys it before returning: left to the
    interpreter's exit, gloo's threads can abort a finished run (SIGABRT)."""
    import torch.distributed as dist

    from targetsft.cli.main import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["methods", "sft"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "sft" in capsys.readouterr().out
