"""The training step of the GPU acceptance run (``bench/gpu_check.sh``): tokens/s and peak memory of one student
trained four ways on the same batches, side by side in one run.

``--size gpu``: random weights of Qwen2.5-1.5B's shape (28 layers, H=1536, V=151,936), bf16 autocast, gradient
checkpointing, batches of 8 GSM examples cut at 512 tokens. The teacher has the same body and Qwen2.5-7B's padded
vocabulary (V=152,064 rows), so the same-family alignment runs. ``--size tiny``: the same vocabularies on a
2-layer, H=64 body in float32: the CPU rehearsal of every step.

Modes (each in its own process, so that each peak is its own):
    sft                 ``target-sft train``, the fused SFT loss
    target_sft_online   ``target-sft train``, Target-SFT with the online teacher
    target_sft_cache    ``target-sft train``, Target-SFT from a top-64 teacher cache (built first, timed apart)
    trl_nll             TRL's ``SFTTrainer(loss_type="nll")`` (its chunked loss) on the same tokenized rows

Reported per mode: tokens/s (non-padding tokens over the steps after the warm-up, the device synchronised at each
step's ends), the median step time, peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS) and the final loss.

    python bench/gpu_train_check.py OUT_DIR               # on a GPU
    python bench/gpu_train_check.py OUT_DIR --size tiny   # the CPU rehearsal
    python bench/gpu_train_check.py OUT_DIR --dry-run     # the plan and the model sizes (meta device)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import append_rows

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data" / "sample_train.jsonl"  # no generator needed (the GPU image lacks reasoning-gym)
CARRIED_TOKENIZER = ROOT / ".whl" / "tokenizer"  # bench/gpu_wheels.py; else the embedded model's

MODES = ["sft", "target_sft_online", "target_sft_cache", "trl_nll"]
TEACHER_VOCAB = 152064  # Qwen2.5-7B's lm_head rows (the 1.5B has 151,936): the teacher is padded past the student
TOPK = 64
SIZES = {
    # body, batch, max tokens per example, steps, warm-up steps, precision, gradient checkpointing
    "gpu": dict(hidden=1536, ffn=8960, layers=28, heads=12, kv=2, batch=8, seq=512, steps=20, warm=3, precision="bf16",
                checkpointing=True),
    "tiny": dict(hidden=64, ffn=128, layers=2, heads=4, kv=2, batch=2, seq=128, steps=4, warm=1, precision="fp32",
                 checkpointing=False),
}  # fmt: skip
FIELDS = ["device", "size", "mode", "params_b", "teacher_vocab", "steps", "batch", "seq", "tokens_per_s"]
FIELDS += ["step_s", "peak_mb", "loss", "cache_build_s", "error", "torch", "transformers"]


def qwen_like_config(size: str = "gpu", vocab_size: int = 151936):
    """Qwen2.5-1.5B's shape (``gpu``) or its tiny stand-in, with ``vocab_size`` lm_head rows."""
    from transformers import Qwen2Config

    s = SIZES[size]
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def _params(config) -> int:
    """The parameter count, from a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu {os.cpu_count()} cores"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _overrides(folder: Path, size: str, mode: str) -> list[str]:
    s = SIZES[size]
    out = [
        f"model={folder}/student",
        f"output_dir={folder}/run-{mode}",
        f"precision={s['precision']}",
        f"data.train={DATA}",
        f"data.size={s['steps'] * s['batch']}",
        f"data.max_length={s['seq']}",
        f"train.max_steps={s['steps']}",
        f"train.per_device_train_batch_size={s['batch']}",
        f"train.gradient_checkpointing={str(s['checkpointing']).lower()}",
        f"train.logging_steps={s['steps']}",
        "train.save_steps=1000000",
        "train.report_to=[]",
        "train.include_num_input_tokens_seen=non_padding",
    ]
    if mode == "sft":
        return out + ["loss.method=sft"]
    out.append("loss.method=target_sft")
    if mode == "target_sft_online":
        return out + [f"teacher.model={folder}/teacher"]
    return out + [f"teacher.cache={folder}/cache"]


def _clock():
    """A callback that times each optimizer step (device synchronised at both ends) with the tokens seen so far."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.steps.append((time.perf_counter() - self._t0, int(state.num_input_tokens_seen)))

    return StepClock()


def _trl_nll(cfg, clock) -> float:
    """TRL's SFTTrainer (``loss_type="nll"``) on the rows ``target-sft train`` builds from ``cfg``; the final loss."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from targetsft.runtime.models import load_tokenizer
    from targetsft.training.dataset import build_dataset, split_records

    tokenizer = load_tokenizer(cfg.model)
    items, _ = build_dataset(cfg, tokenizer, split_records(cfg), None)
    rows = [
        {"input_ids": list(x["input_ids"]), "completion_mask": [int(t != -100) for t in x["labels"]]} for x in items
    ]
    args = cfg.training_arguments()
    for key in ("remove_unused_columns", "save_total_limit"):
        args.pop(key, None)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype="float32")
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**args, loss_type="nll", max_length=None),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    return float(trainer.train().training_loss)


def worker(folder: Path, size: str, mode: str) -> dict:
    """One mode in this process: train, then its figures."""
    import torch

    from targetsft.training.config import load_config
    from targetsft.training.recipe import train

    cfg = load_config(None, _overrides(folder, size, mode))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = _clock()
    if mode == "trl_nll":
        loss = _trl_nll(cfg, clock)
    else:
        summary = train(cfg, callbacks=[clock], keep_checkpoints=False)
        loss = float(summary["metrics"]["train_loss"])
    warm = SIZES[size]["warm"]
    timed = clock.steps[warm:]
    tokens = clock.steps[-1][1] - clock.steps[warm - 1][1]
    seconds = sum(dt for dt, _ in timed)
    if not math.isfinite(loss):
        raise SystemExit(f"{mode}: the loss is not finite ({loss})")
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "step_s": round(statistics.median(dt for dt, _ in timed), 4),
        "peak_mb": round(_peak_mb(), 1),
        "loss": round(loss, 4),
    }


def _run(cmd: list[str]) -> tuple[dict | None, str]:
    """Run a worker process, its output passed through; (the JSON of its last line, or None; the error line)."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = proc.stdout.strip().splitlines()
    sys.stdout.write("".join(f"    {line}\n" for line in lines[-8:]))
    if proc.returncode == 0 and lines and lines[-1].startswith("{"):
        return json.loads(lines[-1]), ""
    return None, (lines[-1][:300] if lines else f"exit code {proc.returncode}")


def make_models(folder: Path, size: str) -> None:
    """Student (seed 0) and teacher (seed 1, ``TEACHER_VOCAB`` rows) with the SmolLM2 tokenizer (carried in
    ``.whl/tokenizer``, else the embedded model's), whose ids all lie below both vocabularies; built on the GPU where
    there is one, saved in bf16 (gpu) or float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from targetsft.runtime.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(CARRIED_TOKENIZER if CARRIED_TOKENIZER.is_dir() else resolve_model(None))
    dtype = torch.bfloat16 if size == "gpu" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, seed, vocab in (("student", 0, 151936), ("teacher", 1, TEACHER_VOCAB)):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(qwen_like_config(size, vocab), dtype=dtype)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        del model


def run(out: Path, size: str, modes: list[str]) -> list[dict]:
    """Every mode, one process each; rows appended to ``out/train.csv`` as they come."""
    import torch
    import transformers

    from targetsft.cli import main as cli

    s = SIZES[size]
    base = {
        "device": _device(),
        "size": size,
        "params_b": round(_params(qwen_like_config(size)) / 1e9, 4),
        "teacher_vocab": TEACHER_VOCAB,
        "steps": s["steps"],
        "batch": s["batch"],
        "seq": s["seq"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_models(folder, size)
        cache_s = ""
        if "target_sft_cache" in modes:
            t0 = time.perf_counter()
            args = ["cache-teacher", *_overrides(folder, size, "target_sft_cache"), "--teacher", f"{folder}/teacher"]
            rc = cli(args + ["--k", str(TOPK), "--batch-size", str(s["batch"])])
            if rc != 0:
                raise SystemExit(f"cache-teacher exited {rc}")
            cache_s = round(time.perf_counter() - t0, 1)
        for mode in modes:
            print(f"  -- {mode}", flush=True)
            res, err = _run([sys.executable, __file__, str(out), "--size", size, "--worker", mode, "--dir", tmp])
            row = {**base, "mode": mode, **(res or {}), "error": err}
            row["cache_build_s"] = cache_s if mode == "target_sft_cache" else ""
            append_rows(out / "train.csv", FIELDS, [row])
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder for train.csv")
    ap.add_argument("--size", choices=list(SIZES), default="gpu")
    ap.add_argument("--modes", nargs="*", choices=MODES, default=MODES)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.dir, args.size, args.worker)))
        return
    if args.dry_run:
        student, teacher = qwen_like_config(args.size), qwen_like_config(args.size, TEACHER_VOCAB)
        s = SIZES[args.size]
        print(
            f"  student: Qwen2 shape, {_params(student) / 1e9:.2f}B parameters, V={student.vocab_size}; teacher: "
            f"{_params(teacher) / 1e9:.2f}B, V={teacher.vocab_size}; {s['steps']} steps of {s['batch']} × ≤{s['seq']} "
            f"tokens, {s['precision']}; modes: {' '.join(args.modes)}"
        )
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.out, args.size, args.modes)
    failed = [r["mode"] for r in rows if r["error"]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see {args.out / 'train.csv'})")


if __name__ == "__main__":
    main()
