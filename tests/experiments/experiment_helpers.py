"""What the experiment tests share: a small grid as a dict, the tiny model's files and experiment, and finished runs
written by hand."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from conftest import save_model
from targetsft import experiments as X
from targetsft.training.scoring import probe_histogram

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
T2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # t_{0.975, 2} in closed form: P(|T| ≤ t) = t/√(2 + t²) for df = 2


def raw_grid(**changes) -> dict:
    raw = {
        "name": "t",
        "output_dir": "out",
        "base": {"data": {"size": 8}, "teacher": {"model": "x", "prompt": "answer_hint"}, "train": {"max_steps": 2}},
        "grid": [
            {"method": "sft", "train": {"learning_rate": [1.0e-5, 5.0e-5]}, "seeds": [0, 1]},
            {
                "method": "target_sft",
                "params": {"eta": [0.25, 0.5], "temperature": 2.0},
                "train": {"learning_rate": 1.0e-4, "warmup_steps": [0, 5]},
                "seeds": [1],
            },
            {"name": "ls", "method": "label_smoothing", "params": {"epsilon": 0.1}, "train": {"report_to": [[]]}},
        ],
        "eval": [{"set": "gsm-intemplate", "size": 4}, {"set": "piqa", "size": 4}],
        "baseline": True,
    }
    raw.update(changes)
    return raw


def tiny_files(root: Path, tiny_llama, tiny_tokenizer) -> tuple[Path, Path, Path]:
    """The tiny model as a folder, a 3-problem generation set and a 3-item multiple-choice set."""
    model = save_model(root / "model", tiny_llama, tiny_tokenizer)
    qa = root / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"question": f"Tom has {i} apples. How many?", "answer": str(i)}) + "\n" for i in (3, 5, 7))
    )
    mc = root / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": q, "choices": ["yes", "no"], "answer_index": i}) + "\n"
            for q, i in (("Is it red?", 0), ("Is it big?", 1), ("Is it old?", 0))
        )
    )
    return model, qa, mc


def tiny_experiment(out: Path, model: Path, qa: Path, mc: Path, **changes) -> dict:
    raw = {
        "name": "tiny",
        "output_dir": str(out),
        "baseline": True,
        "base": {
            "model": str(model),
            "data": {"train": "gsm-train", "size": 8, "max_length": 1024},
            "train": {
                "max_steps": 4,
                "per_device_train_batch_size": 4,
                "learning_rate": 3e-3,
                "warmup_steps": 0,
                "logging_steps": 1,
                "save_steps": 2,
                "save_total_limit": 1,
                "bf16": False,
                "report_to": [],
                "disable_tqdm": True,
            },
        },
        "grid": [{"method": "sft", "seeds": [0]}, {"method": "dft", "seeds": [0]}],
        "eval": [
            {"name": "qa", "set": str(qa), "max_new_tokens": 4, "batch_size": 4},
            {"name": "mc", "set": str(mc), "batch_size": 4},
        ],
    }
    raw.update(changes)
    return raw


def fake_run(
    exp: X.Experiment,
    runs: Path,
    rid: str,
    cid: str,
    method: str,
    seed,
    gen: list[int],
    mc: list[int],
    probe: dict[int, list[float]] | None = None,
    learning_rate: float = 1e-5,
) -> None:
    """A finished run of ``exp`` (its sets ``toy`` and ``mcq``) written by hand: DONE.json plus the per-problem files
    the comparisons read, and ``probe`` ({step: p_θ(y) values}) as its gamma_probe.jsonl."""
    folder = runs / rid
    (folder / "eval" / "toy").mkdir(parents=True)
    (folder / "eval" / "mcq").mkdir(parents=True)
    if probe:
        rows = [{"step": k, **probe_histogram(v)} for k, v in probe.items()]
        (folder / X.PROBE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen_rows = [
        {"id": f"q{i}", "samples": [{"correct": bool(c)}], "greedy": {"correct": bool(c)}} for i, c in enumerate(gen)
    ]
    mc_rows = [{"id": f"m{i}", "answer_index": 0, "pred_mean": 1 - c, "pred_sum": 0} for i, c in enumerate(mc)]
    (folder / "eval" / "toy" / "toy.generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    (folder / "eval" / "mcq" / "mcq.mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows))

    def metric(values):
        return {"value": sum(values) / len(values), "lo": 0.0, "hi": 1.0, "n": len(values), "ci": "wilson"}

    specs = {spec.label: dataclasses.asdict(spec) for spec in exp.eval}

    record = {
        "run": rid,
        "config_id": cid,
        "method": method,
        "group": method,
        "params": {},
        "learning_rate": learning_rate,
        "seed": seed,
        "train": None,
        "sets": {
            "toy": {
                "kind": "generation",
                "spec": specs["toy"],
                "items": "eval/toy/toy.generations.jsonl",
                "metrics": {"average@1": metric(gen), "greedy": metric(gen)},
            },
            "mcq": {
                "kind": "multiple_choice",
                "spec": specs["mcq"],
                "items": "eval/mcq/mcq.mc.jsonl",
                "metrics": {"accuracy": metric(mc)},
            },
        },
    }
    (folder / "DONE.json").write_text(json.dumps(record))
