"""A whole training step of ``TargetSFTTrainer``, eager against ``torch_compile=True``, in float32 and bf16 autocast.

The embedded SmolLM2-135M-Instruct trains ``sft`` on GSM-style prompt/completion records (``gsm-train``) through TRL's
data path; each of the four runs (precision × compile) times its optimizer steps with a callback, after warm-up steps
that include the compilation. With ``torch_compile=True`` the transformer body runs as compiled graphs and the fused
loss eagerly (one graph break, by design). Rows go to ``bench/results/compile_step.csv`` with the CPU capability, and
the ``compile_step`` section of ``docs/benchmarks.md`` is written from them. Run it alone on the machine.

    python bench/bench_compile_step.py              # about 10 min on a 2-core AVX512 CPU
    python bench/bench_compile_step.py --report     # rewrite the docs section from the CSV
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

from docsection import write_section
from timing import append_rows

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "compile_step.csv"
FIELDS = [
    "date",
    "cpu_capability",
    "native_bf16",
    "threads",
    "torch",
    "precision",
    "compiled",
    "batch_size",
    "tokens_per_step",
    "warmup_steps",
    "timed_steps",
    "first_step_s",
    "median_step_s",
    "speedup_vs_eager",
]


def _run(precision: str, compiled: bool, batch_size: int, warmup: int, timed: int) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from targetsft.data.gsm import gsm_user_message
    from targetsft.data.sft import load_records
    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.trl_trainer import TargetSFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    path = resolve_model(None)
    tokenizer = load_tokenizer(path)
    records = load_records("gsm-train", size=batch_size * (warmup + timed), seed=0)
    rows = [{"prompt": gsm_user_message(r["question"]), "completion": " " + r["solution"]} for r in records]
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(
            out,
            report_to=[],
            use_cpu=True,
            bf16=precision == "bf16",
            torch_compile=compiled,
            max_length=512,
            max_steps=warmup + timed,
            per_device_train_batch_size=batch_size,
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=warmup + timed,
            seed=0,
        )
        trainer = TargetSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) / len(rows) * batch_size
        trainer.train()
    steps = timer.times[warmup:]
    return {
        "precision": precision,
        "compiled": compiled,
        "batch_size": batch_size,
        "tokens_per_step": round(tokens),
        "warmup_steps": warmup,
        "timed_steps": len(steps),
        "first_step_s": round(timer.times[0], 2),
        "median_step_s": round(statistics.median(steps), 3),
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the docs section from the CSV")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precisions", default="fp32,bf16")
    opts = parser.parse_args()
    if not opts.report:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        common = {
            "date": stamp,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        for precision in opts.precisions.split(","):
            pair = []
            for compiled in (False, True):
                row = {**common, **_run(precision, compiled, opts.batch_size, opts.warmup, opts.steps)}
                pair.append(row)
                print(row, flush=True)
            for row in pair:
                row["speedup_vs_eager"] = round(pair[0]["median_step_s"] / row["median_step_s"], 3)
            append_rows(CSV_PATH, FIELDS, pair)
    report()


def report() -> None:
    with CSV_PATH.open() as f:
        rows = list(csv.DictReader(f))
    latest = rows[-1]["date"][:10] if rows else ""
    rows = [r for r in rows if r["date"][:10] == latest]
    lines = [
        "## A training step, eager and compiled",
        "",
        "Generated by `python bench/bench_compile_step.py`: `TargetSFTTrainer` (`sft`) on the embedded "
        "SmolLM2-135M-Instruct, GSM-style records through TRL's data path, the median of the timed optimizer steps "
        "after the warm-up steps (which include compilation; the first step's time is given apart). Compiled: "
        "`torch_compile=True`, the transformer body as compiled graphs, the fused loss eager.",
        "",
        "| CPU | native bf16 | threads | precision | compiled | batch | tokens/step | first step s | median step s "
        "| vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cpu_capability']} | {r['native_bf16']} | {r['threads']} | {r['precision']} | {r['compiled']} | "
            f"{r['batch_size']} | {r['tokens_per_step']} | {r['first_step_s']} | {r['median_step_s']} | "
            f"{float(r['speedup_vs_eager']):.2f}× |"
        )
    write_section("compile_step", "\n".join(lines))


if __name__ == "__main__":
    main()
