"""``target-sft quickstart``: the main job on the embedded default, start to finish on one CPU machine.

Fine-tunes SmolLM2-135M-Instruct with ``sft`` and with ``target_sft`` for 16 steps of batch 8 on leak-free
GSM-style data (``train`` templates) in which a fifth of the solutions end in a **wrong** final answer (on
purpose: ``data.label_noise``), then measures what 16 steps can move, with paired intervals over problems:

* the per-token NLL of reference solutions of 50 new in-template problems and 50 problems of the held-out
  templates (how much more likely each model finds correct worked solutions than the base model);
* on the corrupted training examples, ``log p(wrong ending | common prefix)``: how much of the noise it learned
  (as :mod:`targetsft.experiments.noise_fit` does);
* the mean label trust γ and target mass Q(label) over training (the loss's own statistics).

Greedy accuracy after 16 steps moves by a problem or two in fifty and is left to the experiment harness. The
Target-SFT teacher is the base model itself with the final answer in its prompt (``teacher.prompt:
answer_hint``): a privileged teacher that needs no training of its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from targetsft.runtime.files import atomic_write_text
from targetsft.training.config import config_from_dict

METHODS = ("sft", "target_sft")


def _train_config(method: str, out: Path, steps: int, learning_rate: float, label_noise: float) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": None,
        "precision": "auto",
        "output_dir": str(out / method),
        "data": {"train": "gsm-train", "size": steps * 8, "seed": 0, "max_length": 384, "label_noise": label_noise},
        "loss": {"method": method, "params": {}},
        "train": {
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": learning_rate,
            "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": min(5, steps),
            "logging_steps": 1,
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


def reference_nll(model: Any, items: Sequence[dict[str, Any]]) -> list[float]:
    """Per example, the mean NLL per supervised token: ``−(1/n) Σ_t log p_θ(y_t | y_<t)``."""
    from targetsft.training.scoring import label_logprobs

    return [-math.fsum(lp) / len(lp) for lp in label_logprobs(model, items)]


def _in_chunks(score: Any, model: Any, seqs: Sequence[Any], bar: Any, size: int = 8) -> list[Any]:
    """``score(model, seqs)`` (one value per sequence) a few sequences at a time, advancing the progress ``bar``."""
    out: list[Any] = []
    for start in range(0, len(seqs), size):
        chunk = seqs[start : start + size]
        out += score(model, chunk)
        bar.update(len(chunk))
    return out


def run_quickstart(
    out_dir: str = "runs/quickstart",
    *,
    steps: int = 16,
    learning_rate: float = 5e-5,
    label_noise: float = 0.2,
    probe_size: int = 50,
) -> dict[str, Any]:
    """Train ``sft`` and ``target_sft``, score base + both (reference NLL, wrong-answer fit); returns the rows."""
    from tqdm.auto import tqdm

    from targetsft.data.gsm import HELDOUT_NEW_SEEDS, INTEMPLATE_SEEDS, generate_gsm
    from targetsft.data.sft import tokenize_record
    from targetsft.experiments.noise_fit import corrupted_pairs, tail_logprobs
    from targetsft.experiments.report import training_means
    from targetsft.experiments.statistics import t_interval
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model
    from targetsft.runtime.precision import environment
    from targetsft.training.recipe import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = resolve_model(None)
    models, configs, seconds = {"base": base}, {}, {}
    for method in METHODS:
        t = time.perf_counter()
        configs[method] = config_from_dict(_train_config(method, out, steps, learning_rate, label_noise))
        summary = train(configs[method], keep_checkpoints=False)  # final models only: no optimizer state
        models[method] = summary["final_model"]
        seconds[method] = round(time.perf_counter() - t)
        print(f"[quickstart] trained {method} in {seconds[method]} s", flush=True)
    t = time.perf_counter()
    tokenizer = load_tokenizer(base)
    probes = {
        "in-template": generate_gsm("train", probe_size, INTEMPLATE_SEEDS.start),
        "held-out templates": generate_gsm("eval", probe_size, HELDOUT_NEW_SEEDS.start),
    }
    items = {name: [tokenize_record(tokenizer, r, 1 << 30) for r in recs] for name, recs in probes.items()}
    pairs, _ = corrupted_pairs(configs["sft"], tokenizer)
    scores: dict[str, dict[str, list[float]]] = {}
    total = len(models) * (sum(len(its) for its in items.values()) + len(pairs))
    with tqdm(total=total, desc="[quickstart] scoring", unit="seq") as bar:
        for name, path in models.items():
            bar.set_postfix_str(name)
            model = load_model(path)
            scores[name] = {probe: _in_chunks(reference_nll, model, its, bar) for probe, its in items.items()}
            scores[name]["wrong"] = [w for w, _ in _in_chunks(tail_logprobs, model, pairs, bar)]
            del model
    seconds["scoring"] = round(time.perf_counter() - t)
    rows = []
    for name in models:
        row: dict[str, Any] = {"model": name, "path": str(models[name])}
        for key, values in scores[name].items():
            diff = [a - b for a, b in zip(values, scores["base"][key])]
            row[key] = {"mean": math.fsum(values) / len(values), "n": len(values)}
            if name != "base":
                mean, lo, hi = t_interval(diff)
                row[key].update(diff=mean, lo=lo, hi=hi)
        if name != "base":
            means = training_means(Path(configs[name].output_dir) / "metrics.csv")
            if means is not None:
                row["training"] = {k: means[k] for k in ("gamma", "q_label", "p_label")}
        rows.append(row)
    total = time.perf_counter() - t0
    seconds["total"] = round(total)
    env = environment(configs["sft"].resolved_precision())
    table = format_table(rows, steps, label_noise, len(pairs), env)
    print("\n" + table + f"\n\ntotal time {total / 60:.1f} min; outputs in {out}")
    result = {"rows": rows, "seconds": seconds, "environment": env}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "results.md", table + "\n")
    return result


def _cell(cell: dict[str, Any], digits: int = 3) -> str:
    if "diff" not in cell:
        return f"{cell['mean']:.{digits}f}"
    return (
        f"{cell['mean']:.{digits}f} ({cell['diff']:+.{digits}f} [{cell['lo']:+.{digits}f}, {cell['hi']:+.{digits}f}])"
    )


def format_table(
    rows: Sequence[dict[str, Any]], steps: int, label_noise: float, n_wrong: int, env: dict[str, Any]
) -> str:
    """The quickstart's markdown table: each score with its paired difference from the base model."""
    probe = rows[0]["in-template"]["n"]
    lines = [
        f"After {steps} steps of batch 8 on GSM-style solutions, {100 * label_noise:.0f}% of them ending in a wrong "
        f"answer (precision {env['precision']}, CPU {env['cpu_capability']}). Each cell: the model's mean, then "
        "(its difference from base [95% t-interval over the same problems]).",
        "",
        f"| model | NLL/token, {probe} in-template solutions | NLL/token, {probe} held-out-template solutions | "
        f"log p(wrong ending), {n_wrong} corrupted training examples | γ in training | Q(label) in training |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        tr = r.get("training")
        stats = [f"{tr['gamma']:.3f}", f"{tr['q_label']:.3f}"] if tr else ["—", "—"]
        cells = [_cell(r["in-template"]), _cell(r["held-out templates"]), _cell(r["wrong"], 2), *stats]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Lower NLL: the model finds correct worked solutions more likely (it does not say it solves more problems). "
        "A higher log p(wrong ending): it learned the wrong answers it was shown. γ = 1 and Q(label) = 1 for SFT "
        "by definition; Target-SFT trusts each label by the model's own p(y) and gives the rest to the teacher.",
    ]
    return "\n".join(lines)
