"""``evaluate``: a model on several sets (generative or multiple choice) in one call (what ``target-sft eval`` runs).

The evaluation layer in order: :mod:`~targetsft.evaluation.prompts`, :mod:`~targetsft.evaluation.engines`,
:mod:`~targetsft.evaluation.metrics`, :mod:`~targetsft.evaluation.generation_set`,
:mod:`~targetsft.evaluation.multiple_choice`, and this entry point.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from targetsft.evaluation.engines import ENGINES
from targetsft.evaluation.generation_set import evaluate_generation, set_label
from targetsft.evaluation.multiple_choice import evaluate_multiple_choice
from targetsft.evaluation.options import ChoiceOptions, DecodeOptions
from targetsft.runtime.files import atomic_write_text
from targetsft.runtime.precision import environment, resolve_precision

logger = logging.getLogger(__name__)


def set_kind(name: str) -> Literal["generation", "multiple_choice"]:
    """``generation`` for EVAL_SETS and question/answer files, ``multiple_choice`` for MC_SETS and files whose first
    record has ``choices``."""
    from targetsft.data.eval_sets import EVAL_SETS, MC_SETS

    if name in EVAL_SETS:
        return "generation"
    if name in MC_SETS:
        return "multiple_choice"
    p = Path(name)
    if p.suffix.lower() == ".jsonl":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        with open(p, encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), None)
        return "multiple_choice" if first and "choices" in json.loads(first) else "generation"
    raise ValueError(
        f"unknown evaluation set {name!r}: choose from generation sets {sorted(EVAL_SETS)}, multiple-choice sets "
        f"{sorted(MC_SETS)}, or a .jsonl file"
    )


def _fmt_metric(m: dict[str, Any]) -> str:
    if m.get("value") is None:
        return "n/a"
    lo, hi = m.get("lo"), m.get("hi")
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
    return f"{100 * m['value']:.1f}%{ci}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A compact plain-text table: one line per (set, metric): value in % with its 95% interval, n, seconds."""
    rows = [("set", "metric", "value [95% CI]", "n", "time")]
    for r in results:
        for name, m in r["metrics"].items():
            rows.append((set_label(r["set"]), name, _fmt_metric(m), str(r["n"]), f"{r['seconds']:.0f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def open_model(path: str, engine: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, str]:
    """The model folder ``path`` ready for ``engine``: a started :class:`~targetsft.runtime.vllm_engine.VLLMEngine`
    for ``vllm`` (and for ``auto`` where vLLM runs it), else the transformers model on ``device``; and the engine
    that will run it."""
    from targetsft.runtime.models import load_model
    from targetsft.runtime.vllm_engine import start_engine

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    vllm = start_engine(path, engine, dtype=str(dtype).removeprefix("torch."))
    if vllm is not None:
        return vllm, "vllm"
    return load_model(path, dtype=dtype).to(device), "compact" if engine == "auto" else engine


def close_model(model: Any) -> None:
    """Stop a VLLMEngine's process (a transformers model is left to the garbage collector)."""
    close = getattr(model, "close", None)
    if callable(close):
        close()


def evaluate_set(
    model: Any,
    tokenizer: Any,
    name: str,
    *,
    kind: str | None = None,
    decode: DecodeOptions | None = None,
    choice: ChoiceOptions | None = None,
    size: int | str | None = None,
    data_seed: int | None = None,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a loaded model on one set, generative (:func:`evaluate_generation` with ``decode``) or multiple
    choice (:func:`evaluate_multiple_choice` with ``choice``), by ``kind`` (default: :func:`set_kind`); its summary."""
    common = {"size": size, "data_seed": data_seed, "out_dir": out_dir, "model_name": model_name, "progress": progress}
    if (kind or set_kind(name)) == "generation":
        return evaluate_generation(model, tokenizer, name, decode=decode, **common)
    choice = choice or ChoiceOptions()
    return evaluate_multiple_choice(
        model, tokenizer, name, batch_size=choice.batch_size, normalize=choice.normalize, **common
    )


def evaluate(
    model_path: str | os.PathLike | None,
    sets: Sequence[str],
    *,
    decode: DecodeOptions | None = None,
    choice: ChoiceOptions | None = None,
    size: int | str | None = None,
    data_seed: int | None = None,
    out_dir: str | os.PathLike | None = None,
    precision: str = "auto",
    device: str | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Load a model (``None``/``"default"`` = the embedded SmolLM2-135M-Instruct) and evaluate it on ``sets``
    (generation sets via :func:`evaluate_generation`, multiple-choice sets via :func:`evaluate_multiple_choice`).

    Returns ``{"model", "results": [summary per set], "table"}``; each set's row is logged as it finishes when
    ``progress``. With
    ``out_dir``, each set writes its files there (see the two functions) plus an overall ``summary.json``.
    ``precision``: the weights' dtype, by :func:`targetsft.runtime.precision.resolve_precision` (``auto``: bf16 where
    the device runs it natively, else float32; ``bfloat16``/``float32`` spellings are accepted); recorded in the
    summary with the machine's :func:`~targetsft.runtime.precision.environment`. ``decode``: how generative sets are
    decoded (:class:`~targetsft.evaluation.options.DecodeOptions`, engine ``compact`` unless given), ``choice``: how
    multiple-choice sets are scored; ``options``: fields of ``decode`` to change. The engine: ``compact``, ``hf``,
    ``vllm`` (one engine started for all the sets; multiple-choice sets are scored by its prompt log-probs) or
    ``auto`` (vLLM where it is installed and starts on the model, else compact); the report names the one that ran.
    """
    from targetsft.runtime.models import load_tokenizer, resolve_model

    kinds = {s: set_kind(s) for s in sets}  # fail on a bad name before loading the model
    path = resolve_model(model_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_precision(precision, dev)
    tokenizer = load_tokenizer(path, padding_side="left")
    decode = (decode or DecodeOptions(engine="compact")).with_(**options)
    model, engine = open_model(path, decode.engine, resolved.dtype, dev)
    decode = decode.with_(engine=engine)
    results = []
    try:
        for s in sets:
            res = evaluate_set(
                model,
                tokenizer,
                s,
                kind=kinds[s],
                decode=decode,
                choice=choice,
                size=size,
                data_seed=data_seed,
                out_dir=out_dir,
                model_name=path,
                progress=progress,
            )
            results.append(res)
            if progress:
                logger.info(format_table([res]))
    finally:
        close_model(model)
    table = format_table(results)
    dtype = str(resolved.dtype).removeprefix("torch.")
    report = {"model": path, "dtype": dtype, "device": str(dev), "engine": engine}
    report["environment"] = environment(resolved)
    report.update(results=results, table=table)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "summary.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report
