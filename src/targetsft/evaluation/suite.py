"""``evaluate``: a model on several sets (generative or multiple choice) in one call, and ``target-sft eval``.

The evaluation layer in order: :mod:`~targetsft.evaluation.prompts`, :mod:`~targetsft.evaluation.engines`,
:mod:`~targetsft.evaluation.metrics`, :mod:`~targetsft.evaluation.generation_set`,
:mod:`~targetsft.evaluation.multiple_choice`, and this entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from targetsft.evaluation.engines import ENGINES
from targetsft.evaluation.generation_set import evaluate_generation, set_label
from targetsft.evaluation.multiple_choice import evaluate_multiple_choice
from targetsft.evaluation.options import ChoiceOptions, DecodeOptions
from targetsft.evaluation.prompts import PROMPT_STYLES
from targetsft.runtime.files import atomic_write_text
from targetsft.runtime.precision import PRECISIONS, environment, resolve_precision


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
    print_table: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Load a model (``None``/``"default"`` = the embedded SmolLM2-135M-Instruct) and evaluate it on ``sets``
    (generation sets via :func:`evaluate_generation`, multiple-choice sets via :func:`evaluate_multiple_choice`).

    Returns ``{"model", "results": [summary per set], "table"}``; prints the table when ``print_table``. With
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
            if print_table and progress:
                print(format_table([res]), file=sys.stderr)
    finally:
        close_model(model)
    table = format_table(results)
    dtype = str(resolved.dtype).removeprefix("torch.")
    report = {"model": path, "dtype": dtype, "device": str(dev), "engine": engine}
    report["environment"] = environment(resolved)
    report.update(results=results, table=table)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "summary.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if print_table:
        print(table)
    return report


def _size_arg(value: str) -> int | str:
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be an integer or 'all', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"size must be >= 0, got {n}")
    return n


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``target-sft eval`` options to ``parser`` (then call :func:`run_eval_from_args` on the result)."""
    from targetsft.data.eval_sets import EVAL_SETS, MC_SETS

    sets = ", ".join(list(EVAL_SETS) + list(MC_SETS))
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--data",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME",
        help=f"sets to evaluate: {sets}, or .jsonl files (question/answer or question/choices/"
        "answer_index); repeatable",
    )
    parser.add_argument(
        "--size",
        type=_size_arg,
        default=None,
        help="items per set (default: the set's default; 'all' for every item of a fixed set)",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="first seed of a generated set, or a random subset of a fixed one (default: none)",
    )
    parser.add_argument("--samples", type=int, default=1, help="samples per problem k for Average@k / pass@k")
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default: 0 = greedy for --samples 1, else 1.0)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per generation batch")
    parser.add_argument("--mc-batch-size", type=int, default=16, help="sequences per multiple-choice forward pass")
    parser.add_argument(
        "--mc-normalize",
        choices=("mean", "sum"),
        default="mean",
        help="multiple-choice prediction by mean (default) or summed log-prob of the choice tokens",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--no-greedy", dest="greedy", action="store_false", help="skip the separate greedy pass when sampling"
    )
    parser.add_argument(
        "--no-early-stop",
        dest="stop_on_answer",
        action="store_false",
        help="stop only at eos / max-new-tokens, not at a complete '#### n'",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="compact",
        help="decode loop: 'compact' drops finished rows from the batch (default), 'hf' runs model.generate, "
        "'vllm' runs vLLM (also for multiple-choice scoring), 'auto' picks vLLM where it runs the model, else compact",
    )
    parser.add_argument(
        "--prompt",
        choices=PROMPT_STYLES,
        default="gsm",
        help="generation prompt and scoring: 'gsm' ('#### <number>', default) or 'boxed' (MATH-style \\boxed{})",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="write generations and summaries here")
    parser.add_argument(
        "--precision",
        choices=(*PRECISIONS, "float32", "bfloat16", "float16"),
        default="auto",
        help="weights' dtype: auto (bf16 where the device runs it natively, else fp32; default), bf16, fp16, fp32",
    )
    parser.add_argument("--dtype", dest="precision", choices=("float32", "bfloat16", "float16"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; on a busy shared machine 1 can be far "
        "faster than an oversubscribed 2)",
    )
    return parser


def run_eval_from_args(args: argparse.Namespace) -> int:
    """Run :func:`evaluate` from parsed :func:`add_eval_arguments` options; 0 on success, 2 on a usage error."""
    from targetsft.runtime.inputs import check_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        check_model(args.model)
        decode = DecodeOptions(
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            greedy=args.greedy,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            stop_on_answer=args.stop_on_answer,
            seed=args.seed,
            prompt=getattr(args, "prompt", "gsm"),
            engine=getattr(args, "engine", "compact"),
        )
        evaluate(
            args.model,
            args.data,
            decode=decode,
            choice=ChoiceOptions(batch_size=args.mc_batch_size, normalize=args.mc_normalize),
            size=args.size,
            data_seed=args.data_seed,
            out_dir=args.out,
            precision=args.precision,
            device=args.device,
            progress=args.progress,
        )
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"target-sft eval: error: {e}", file=sys.stderr)
        return 2
    return 0
