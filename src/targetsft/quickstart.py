"""``target-sft quickstart``: the main job on the embedded default, start to finish on one CPU machine.

Fine-tunes SmolLM2-135M-Instruct on leak-free GSM-style data (``train`` templates) with ``sft`` and with
``target_sft`` for a few minutes each, evaluates the base model and both fine-tunes on new instances of the
training templates (``gsm-intemplate``, in-distribution) and prints one table. The Target-SFT teacher is the
base model itself with the final answer in its prompt (``teacher.prompt: answer_hint``): a privileged teacher
that needs no training of its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from targetsft.config import config_from_dict
from targetsft.files import atomic_write_text


def _train_config(method: str, out: Path, steps: int, learning_rate: float) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": None,
        "output_dir": str(out / method),
        "data": {"train": "gsm-train", "size": steps * 8, "seed": 0, "max_length": 384},
        "loss": {"method": method, "params": {}},
        "train": {
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": learning_rate,
            "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": min(5, steps),
            "bf16": True,
            "logging_steps": 5,
            "save_steps": steps,
            "save_total_limit": 1,
            "report_to": ["tensorboard"],
            "seed": 0,
        },
    }
    if method == "target_sft":
        cfg["loss"]["params"] = {"eta": 0.5}
        cfg["teacher"] = {"model": "default", "prompt": "answer_hint"}
    return cfg


def run_quickstart(
    out_dir: str = "runs/quickstart",
    *,
    steps: int = 30,
    learning_rate: float = 5e-5,
    eval_set: str = "gsm-intemplate",
    eval_size: int = 50,
    max_new_tokens: int = 200,
) -> dict[str, Any]:
    """Train ``sft`` and ``target_sft``, evaluate base + both (greedy accuracy, 95% interval); returns the rows."""
    from targetsft.evaluate import evaluate_generation
    from targetsft.models import load_model, load_tokenizer, resolve_model
    from targetsft.trainer import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = resolve_model(None)
    models = {"base": base}
    for method in ("sft", "target_sft"):
        t = time.perf_counter()
        summary = train(config_from_dict(_train_config(method, out, steps, learning_rate)))
        models[method] = summary["final_model"]
        print(f"[quickstart] trained {method} in {time.perf_counter() - t:.0f} s", flush=True)
    tokenizer = load_tokenizer(base, padding_side="left")
    rows = []
    for name, path in models.items():
        t = time.perf_counter()
        result = evaluate_generation(
            load_model(path),
            tokenizer,
            eval_set,
            size=eval_size,
            max_new_tokens=max_new_tokens,
            out_dir=out / "eval" / name,
            model_name=name,
        )
        metrics = result["metrics"]
        acc = metrics.get("greedy") or metrics["average@1"]
        rows.append({"model": name, "path": str(path), "accuracy": acc, "seconds": round(time.perf_counter() - t)})
        print(f"[quickstart] evaluated {name} in {time.perf_counter() - t:.0f} s", flush=True)
    total = time.perf_counter() - t0
    table = _table(rows, eval_set, eval_size, steps)
    print("\n" + table + f"\n\ntotal time {total / 60:.1f} min; outputs in {out}")
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "seconds": round(total)}, indent=2))
    atomic_write_text(out / "results.md", table + "\n")
    return {"rows": rows, "seconds": total}


def _table(rows: list[dict[str, Any]], eval_set: str, eval_size: int, steps: int) -> str:
    lines = [
        f"Greedy accuracy on {eval_set} ({eval_size} new instances of the training templates: in-distribution), "
        f"after {steps} steps of batch 8:",
        "",
        "| model | accuracy | 95% interval |",
        "|---|---|---|",
    ]
    for r in rows:
        m = r["accuracy"]
        lines.append(f"| {r['model']} | {100 * m['value']:.1f}% | {100 * m['lo']:.1f}–{100 * m['hi']:.1f}% |")
    return "\n".join(lines)
