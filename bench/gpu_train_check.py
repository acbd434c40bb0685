"""Step 3 of ``bench/gpu_check.sh``: a short bf16 run of ``target-sft train`` at the paper's student size.

The student and teacher have random weights and Qwen2.5-1.5B's shape (28 layers, H=1536, 12 heads with 2 KV heads,
FFN 8960, V=151936). The teacher has another seed, and both use the embedded SmolLM2 tokenizer, whose ids all fall
inside V. The run trains Target-SFT on 512-token GSM examples with the online teacher. Its steps/s, samples/s and
``torch.cuda.max_memory_allocated`` are appended to ``bench/results/gpu_check.csv`` and tabulated in the
``gpu_check`` section of ``docs/benchmarks.md``. The weights are random, so no accuracy is measured: the check is
for the engine (speed, memory, that bf16 training runs and its loss stays finite).

    python bench/gpu_train_check.py --steps 20
    python bench/gpu_train_check.py --dry-run     # build the config only (no weights), print the size
"""

from __future__ import annotations

import argparse
import datetime
import math
import tempfile
from pathlib import Path

from docsection import write_csv_section
from timing import append_rows

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "gpu_check.csv"
FIELDS = ["device", "model", "params_b", "steps", "batch", "seq", "steps_per_s", "samples_per_s", "peak_gb", "loss"]
FIELDS += ["torch", "date"]


def qwen_like_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def _params(config) -> int:
    """The parameter count, from a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def run(steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.config import load_config
    from targetsft.training.trainer import train

    config = qwen_like_config()
    tokenizer = load_tokenizer(resolve_model(None))
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in (("student", 0), ("teacher", 1)):
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(f"{tmp}/{name}")
            tokenizer.save_pretrained(f"{tmp}/{name}")
        batch, seq = 8, 512
        overrides = [
            f"model={tmp}/student",
            f"output_dir={tmp}/run",
            f"teacher.model={tmp}/teacher",
            "loss.method=target_sft",
            "precision=bf16",
            f"data.size={steps * batch}",
            f"data.max_length={seq}",
            f"train.max_steps={steps}",
            f"train.per_device_train_batch_size={batch}",
            "train.gradient_checkpointing=true",
            "train.report_to=[]",
            "train.save_strategy=no",
        ]
        torch.cuda.reset_peak_memory_stats()
        summary = train(load_config(None, overrides), keep_checkpoints=False)
    metrics = summary["metrics"]
    row = {
        "device": torch.cuda.get_device_name(0),
        "model": "qwen2.5-1.5b-shape, random",
        "params_b": round(_params(config) / 1e9, 3),
        "steps": summary["steps"],
        "batch": batch,
        "seq": seq,
        "steps_per_s": metrics.get("train_steps_per_second"),
        "samples_per_s": metrics.get("train_samples_per_second"),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "loss": metrics.get("train_loss"),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if not math.isfinite(float(row["loss"])):
        raise SystemExit(f"the loss is not finite: {row}")
    append_rows(CSV_PATH, FIELDS, [row])
    return row


def report() -> None:
    write_csv_section(
        "gpu_check",
        (
            "GPU acceptance run (`bash bench/gpu_check.sh`, step 3): `target-sft train`, Target-SFT with an online "
            "teacher, bf16, random weights of Qwen2.5-1.5B's shape (student and teacher), gradient checkpointing on. "
            "Engine figures only; no accuracy."
        ),
        CSV_PATH,
        FIELDS,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        config = qwen_like_config()
        size = _params(config) / 1e9
        print(f"  student and teacher: Qwen2 shape, {size:.2f}B parameters each, V={config.vocab_size}")
        return
    print(run(args.steps))
    report()


if __name__ == "__main__":
    main()
