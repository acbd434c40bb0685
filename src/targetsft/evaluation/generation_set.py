"""``evaluate_generation``: generate a set's answers (:mod:`~targetsft.evaluation.engines`), score them
(:mod:`~targetsft.evaluation.answers`), and write the per-problem JSONL and the summary with its metrics
(:mod:`~targetsft.evaluation.metrics`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from targetsft.evaluation.answers import extract_answer, extract_boxed, is_correct, is_correct_boxed
from targetsft.evaluation.engines import Generation, GenerationRun, generate_detailed
from targetsft.evaluation.metrics import generation_metrics
from targetsft.evaluation.options import DecodeOptions
from targetsft.evaluation.prompts import build_prompts
from targetsft.runtime.files import atomic_write_text


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def set_label(name: str) -> str:
    """A file-name-safe label: the set name, or a file's stem."""
    label = Path(name).stem if name.lower().endswith(".jsonl") else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "set"


def _model_name(model: Any) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("transformers", "targetsft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _scored_generation(g: Generation, gold: str, style: str = "gsm") -> dict[str, Any]:
    """One generation as a JSONL field: text, extracted answer, correctness, token count, finish reason."""
    boxed = style == "boxed"
    return {
        "text": g.text,
        "extracted": extract_boxed(g.text) if boxed else extract_answer(g.text),
        "correct": bool(is_correct_boxed(g.text, gold) if boxed else is_correct(g.text, gold)),
        "n_tokens": g.n_tokens,
        "finish_reason": g.finish_reason,
    }


def _problem_records(
    rows: Sequence[dict[str, Any]], run: GenerationRun, greedy_run: GenerationRun | None, style: str = "gsm"
) -> list[dict[str, Any]]:
    """Per-problem JSONL records: id, question, gold, samples (scored), greedy (scored, or None)."""
    return [
        {
            "id": r["id"],
            "question": r["question"],
            "gold": r["answer"],
            "samples": [_scored_generation(g, r["answer"], style) for g in run.outputs[i]],
            "greedy": _scored_generation(greedy_run.outputs[i][0], r["answer"], style) if greedy_run else None,
        }
        for i, r in enumerate(rows)
    ]


def _write_outputs(out_dir: str | os.PathLike, label: str, items_name: str, items: str, summary: dict) -> None:
    """Write ``<label>.<items_name>`` and ``<label>.summary.json`` atomically into ``out_dir`` (the summary last,
    with both paths under ``summary["files"]``)."""
    out = Path(out_dir)
    summary["files"] = {"items": str(out / f"{label}.{items_name}"), "summary": str(out / f"{label}.summary.json")}
    atomic_write_text(out / f"{label}.{items_name}", items)
    atomic_write_text(out / f"{label}.summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


def _run_stats(run: GenerationRun) -> dict[str, Any]:
    """Output statistics of a generation pass (distinct generations only)."""
    gens = list({id(g): g for outs in run.outputs for g in outs}.values())
    n = max(len(gens), 1)
    reasons = {r: sum(g.finish_reason == r for g in gens) / n for r in ("answer", "eos", "length")}
    return {
        "sequences": len(gens),
        "generated_tokens": run.generated_tokens,
        "mean_new_tokens": run.generated_tokens / n,
        "has_answer_marker": sum("####" in g.text for g in gens) / n,
        "finish": reasons,  # fractions: "length" = ran to max_new_tokens
        "seconds": run.seconds,
        "decode_steps": run.decode_steps,
        "row_steps": run.row_steps,
        "batches": run.batches,
        "engine": run.settings.get("engine"),
    }


def _generation_passes(
    model: Any, tokenizer: Any, prompts: list[str], decode: DecodeOptions, label: str, progress: bool
) -> tuple[GenerationRun, GenerationRun | None, float]:
    """The sampling pass and, with ``decode.greedy`` at a temperature > 0, a greedy pass over ``prompts``; returns
    both runs and the seconds they took together."""
    temperature = decode.sampling_temperature
    boxed = decode.prompt == "boxed"
    common = {
        "max_new_tokens": decode.max_new_tokens,
        "batch_size": decode.batch_size,
        "seed": decode.seed,
        "stop_on_answer": decode.stop_on_answer and not boxed,
        "cut": not boxed,
        "progress": progress,
        "engine": decode.engine,
    }
    t0 = time.perf_counter()
    run = generate_detailed(
        model,
        tokenizer,
        prompts,
        samples=decode.samples,
        temperature=temperature,
        top_p=decode.top_p,
        desc=label,
        **common,
    )
    greedy_run = None
    if decode.greedy and temperature > 0:
        greedy_run = generate_detailed(
            model, tokenizer, prompts, samples=1, temperature=0.0, desc=f"{label} greedy", **common
        )
    return run, greedy_run, time.perf_counter() - t0


def _decoding_settings(decode: DecodeOptions, run: GenerationRun, greedy_run: GenerationRun | None) -> dict[str, Any]:
    """The summary's ``decoding`` field: the settings the passes ran with, the engine used and the prompt format."""
    temperature = decode.sampling_temperature
    boxed = decode.prompt == "boxed"
    return {
        "samples": decode.samples,
        "temperature": temperature,
        "top_p": decode.top_p if temperature > 0 else None,
        "top_k": None,
        "max_new_tokens": decode.max_new_tokens,
        "batch_size": decode.batch_size,
        "seed": decode.seed,
        "stop_on_answer": decode.stop_on_answer and not boxed,
        "engine": run.settings.get("engine", decode.engine),
        "greedy_pass": greedy_run is not None,
        "prompt": "chat template, add_generation_prompt=True, user message = "
        + ("gsm_user_message(question)" if not boxed else "question + BOXED_INSTRUCTION"),
    }


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    dataset_name_or_path: str,
    *,
    decode: DecodeOptions | None = None,
    size: int | str | None = None,
    data_seed: int | None = None,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    confidence: float = 0.95,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Generate answers for a GSM-style set and score them; returns the summary dict (also written to ``out_dir``).

    ``dataset_name_or_path``: a name of :data:`~targetsft.data.eval_sets.EVAL_SETS` or a ``.jsonl`` file with
    ``question``/``answer``; ``size`` / ``data_seed`` go to :func:`~targetsft.data.eval_sets.load_eval_set`
    (``data_seed`` = the first seed of a generated set, or a random subset of a fixed one; None = the defaults).
    ``decode``: how answers are generated (:class:`~targetsft.evaluation.options.DecodeOptions`); ``options``:
    fields of it to change (``samples=4``, ...). With ``prompt="boxed"`` (MATH-style: the answer is the last
    ``\\boxed{}``, compared with ``math_verify``) generation runs to eos, never cut.

    ``out_dir``: write ``<set>.generations.jsonl`` (one line per problem: id, question, gold, samples: [{text,
    extracted, correct, n_tokens, finish_reason}], greedy: {...} or null) and ``<set>.summary.json`` (set, n,
    metrics with intervals, model, decoding settings, seconds, tokens/s, output statistics), each written atomically.
    """
    from targetsft.data.eval_sets import load_eval_set

    decode = (decode or DecodeOptions()).with_(**options)
    rows = load_eval_set(dataset_name_or_path, size, data_seed)
    prompts = build_prompts(tokenizer, [r["question"] for r in rows], decode.prompt)
    label = set_label(dataset_name_or_path)
    run, greedy_run, seconds = _generation_passes(model, tokenizer, prompts, decode, label, progress)

    greedy = decode.greedy
    records = _problem_records(rows, run, (greedy_run or run) if greedy else None, decode.prompt)
    metrics = generation_metrics(
        [[s["correct"] for s in rec["samples"]] for rec in records],
        [rec["greedy"]["correct"] for rec in records] if greedy else None,
        confidence,
    )
    tokens = run.generated_tokens + (greedy_run.generated_tokens if greedy_run else 0)
    summary: dict[str, Any] = {
        "set": dataset_name_or_path,
        "kind": "generation",
        "n": len(rows),
        "k": decode.samples,
        "metrics": metrics,
        "confidence": confidence,
        "model": model_name or _model_name(model),
        "data": {"size": size, "data_seed": data_seed},
        "decoding": _decoding_settings(decode, run, greedy_run),
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "stats": {"samples": _run_stats(run)} | ({"greedy": _run_stats(greedy_run)} if greedy_run else {}),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_dir is not None:
        _write_outputs(out_dir, label, "generations.jsonl", _jsonl(records), summary)
    return summary
