"""Greedy GSM generation: ``model.generate`` with and without early stop, and the compact decode loop.

On the embedded SmolLM2-135M-Instruct (CPU, weights in ``--precision``, by capability by default) and on any
``--model`` folders (e.g. a fine-tuned ``runs/quickstart/sft/final``), ``--n`` problems of ``gsm-intemplate`` are
generated greedily in batches of ``--batch-size`` (prompts sorted by length, as
:func:`targetsft.evaluation.engines.generate` does) in three modes:

- ``hf-plain``: ``model.generate`` stopping only at eos (``<|im_end|>``) or ``--max-new-tokens``;
- ``hf-early``: the same plus :class:`targetsft.evaluation.prompts.AnswerStoppingCriteria` (a row is finished at a
  complete ``#### n`` or eos), finished rows staying in the batch (padded) until its slowest row ends;
- ``compact``: the library's default engine, the same stopping rule in a decode loop that drops finished rows from
  the batch (KV cache, mask, positions), so a row that loops to the cap costs its own row only;
- ``vllm`` (when vLLM is installed; ``--no-vllm`` leaves it out): a :class:`targetsft.runtime.vllm_engine.VLLMEngine`
  given all prompts at once, after the other modes; its start-up is timed apart.

The modes run batch by batch, in rotating order, so that load from other processes on a shared machine hits all
alike. Reported per mode: wall time, decode steps (forward passes: a batch runs until its slowest row ends),
row-steps (rows summed over the forward passes: the compute spent), generated tokens (each row up to its own end),
accuracy, whether the scored texts agree (every output cut right after its first complete ``#### n`` must equal the
cut ``hf-plain`` output) and whether the compact loop's tokens equal ``hf-early``'s token for token. Results go to
``bench/results/generate.csv`` and to the section between ``<!-- generate:start -->`` and ``<!-- generate:end -->`` of
``docs/benchmarks.md`` (the rest of that file is left alone).

    python bench/bench_generate.py                 # N = 64, batch 32, 256 new tokens (several minutes on 2 cores)
    python bench/bench_generate.py --model default --model runs/quickstart/sft/final   # base + fine-tuned
    python bench/bench_generate.py --n 8 --max-new-tokens 32 --no-doc   # smoke run
    python bench/bench_generate.py --report        # rewrite the docs section from the CSV
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

from docsection import markers, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CSV_PATH = RESULTS / "generate.csv"
START, END = markers("generate")
MODES = ("hf-plain", "hf-early", "compact")  # run batch by batch; "vllm" runs all prompts at once, after them
SETUP = {  # mode: (engine, stop_on_answer)
    "hf-plain": ("hf", False),
    "hf-early": ("hf", True),
    "compact": ("compact", True),
    "vllm": ("vllm", True),
}
NAMES = {
    "hf-plain": "`model.generate`, stop at eos only",
    "hf-early": "`model.generate` + early stop (`#### n` complete, or eos)",
    "compact": "compact loop + early stop (finished rows dropped)",
    "vllm": "vLLM, all prompts at once (stops at eos; the answer stop replayed on its tokens)",
}
FIELDS = [
    "date",
    "model",
    "set",
    "n",
    "batch_size",
    "max_new_tokens",
    "mode",
    "engine",
    "stop_on_answer",
    "wall_s",
    "decode_steps",
    "row_steps",
    "generated_tokens",
    "tokens_per_s",
    "correct",
    "accuracy",
    "correct_uncut",
    "ended_with_answer",
    "hit_cap",
    "cap_after_answer",
    "identical_scored",
    "identical_tokens",
    "speedup",
    "startup_s",
    "threads",
    "load_avg",
    "cpu_capability",
    "precision",
    "torch",
    "transformers",
]


def _batches(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch, as generate() forms them: sorted by token length (longest first), then chunked."""
    lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _model_label(model: str | None, precision: str) -> str:
    if model is None or str(model).lower() in ("default", "smollm2-135m-instruct"):
        return f"SmolLM2-135M-Instruct ({precision}, CPU)"
    return f"{model} ({precision}, CPU)"


def run_model(args: argparse.Namespace, model_arg: str | None) -> list[dict]:
    import torch
    import transformers

    from targetsft.data.eval_sets import load_eval_set
    from targetsft.evaluation import answer_complete, build_prompts, cut_at_answer, generate_detailed
    from targetsft.evaluation.answers import is_correct
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model
    from targetsft.runtime.precision import resolve_precision

    path = resolve_model(model_arg)
    precision = resolve_precision(args.precision, "cpu")
    model = load_model(path, dtype=precision.dtype)
    tok = load_tokenizer(path, padding_side="left")
    rows = load_eval_set(args.set, args.n)
    prompts = build_prompts(tok, [r["question"] for r in rows])
    gold = [r["answer"] for r in rows]
    # warm-up on a full batch with both engines, so that allocator / kernel warm-up does not fall on a timed mode
    for engine in ("hf", "compact"):
        generate_detailed(model, tok, prompts[: args.batch_size], max_new_tokens=8, progress=False, engine=engine)

    kw = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "progress": False}
    gens: dict[str, list] = {m: [None] * len(rows) for m in MODES}
    wall = dict.fromkeys(MODES, 0.0)
    steps = dict.fromkeys(MODES, 0)
    row_steps = dict.fromkeys(MODES, 0)
    loads = [os.getloadavg()[0]]
    label = _model_label(model_arg, precision.name)
    for b, idx in enumerate(_batches(tok, prompts, args.batch_size)):
        for mode in MODES[b % len(MODES) :] + MODES[: b % len(MODES)]:
            engine, stop = SETUP[mode]
            r = generate_detailed(
                model, tok, [prompts[i] for i in idx], stop_on_answer=stop, cut=stop, engine=engine, **kw
            )
            assert r.settings["engine"] == engine, r.settings
            wall[mode] += r.seconds
            steps[mode] += r.decode_steps
            row_steps[mode] += r.row_steps
            for i, outs in zip(idx, r.outputs, strict=True):
                gens[mode][i] = outs[0]
            loads.append(os.getloadavg()[0])
            print(
                f"{label} batch {b} {mode}: {r.seconds:.1f}s, {r.decode_steps} steps, {r.row_steps} row-steps, "
                f"{r.generated_tokens} tokens, load {loads[-1]:.2f}",
                flush=True,
            )

    startup = None
    if not args.no_vllm:
        startup = _run_vllm(args, path, precision, tok, prompts, kw, gens, wall, steps, row_steps)
    modes = [m for m in SETUP if m in gens]
    scored = {m: [cut_at_answer(g.text) for g in gens[m]] for m in modes}
    common = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": label,
        "set": args.set,
        "n": len(rows),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "load_avg": f"{min(loads):.1f}-{max(loads):.1f}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "precision": precision.name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }

    def same_tokens(a: str, b: str) -> int:
        return sum(x.token_ids == y.token_ids for x, y in zip(gens[a], gens[b], strict=True))

    out = []
    for mode in modes:
        g = gens[mode]
        correct = sum(is_correct(t, y) for t, y in zip(scored[mode], gold, strict=True))
        toks = sum(x.n_tokens for x in g)
        out.append(
            {
                **common,
                "mode": mode,
                "engine": SETUP[mode][0],
                "stop_on_answer": SETUP[mode][1],
                "wall_s": round(wall[mode], 2),
                "decode_steps": steps[mode],
                "row_steps": row_steps[mode],
                "generated_tokens": toks,
                "tokens_per_s": round(toks / wall[mode], 1),
                "correct": correct,
                "accuracy": round(correct / len(rows), 4),
                "correct_uncut": sum(is_correct(x.text, y) for x, y in zip(g, gold, strict=True))
                if mode == "hf-plain"
                else "",
                "ended_with_answer": sum("####" in t for t in scored[mode]),
                "hit_cap": sum(x.finish_reason == "length" for x in g),
                "cap_after_answer": sum(x.finish_reason == "length" and answer_complete(x.text) for x in g),
                "identical_scored": sum(a == b for a, b in zip(scored[mode], scored["hf-plain"], strict=True)),
                "identical_tokens": same_tokens(mode, "hf-early" if mode == "compact" else "compact")
                if mode in ("compact", "vllm")
                else "",
                "speedup": round(wall["hf-plain"] / wall[mode], 3),
                "startup_s": round(startup, 1) if mode == "vllm" and startup is not None else "",
            }
        )
    return out


def _run_vllm(args, path, precision, tok, prompts, kw, gens, wall, steps, row_steps) -> float | None:
    """The ``vllm`` mode: start an engine on ``path`` (timed apart: start-up), warm it up on a short request, then
    generate every prompt in one call; its OpenMP threads are bound to ``--threads`` CPUs. Returns the start-up
    seconds (None when vLLM is not installed: the mode is left out)."""
    from targetsft.evaluation import generate_detailed
    from targetsft.runtime.vllm_engine import VLLMEngine, vllm_unavailable

    reason = vllm_unavailable()
    if reason is not None:
        print(f"vllm mode skipped: {reason}")
        return None
    if args.threads:
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    t0 = time.perf_counter()
    engine = VLLMEngine(path, dtype=str(precision.dtype).removeprefix("torch."))
    startup = time.perf_counter() - t0
    try:
        generate_detailed(engine, tok, prompts[:2], max_new_tokens=8, progress=False)
        r = generate_detailed(engine, tok, prompts, stop_on_answer=True, cut=True, **kw)
    finally:
        engine.close()
    gens["vllm"] = [outs[0] for outs in r.outputs]
    wall["vllm"], steps["vllm"], row_steps["vllm"] = r.seconds, r.decode_steps, r.row_steps
    print(f"vllm: start-up {startup:.1f}s, {r.seconds:.1f}s, {r.generated_tokens} tokens", flush=True)
    return startup


def write_csv(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = CSV_PATH.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, CSV_PATH)
    print(f"wrote {CSV_PATH.relative_to(ROOT)}")


def _model_block(rows: list[dict]) -> list[str]:
    """Table and findings for one model's three rows."""
    by = {r["mode"]: r for r in rows}
    plain, early, comp, vllm = by["hf-plain"], by["hf-early"], by["compact"], by.get("vllm")
    n = plain["n"]
    threads = plain["threads"]
    lines = [
        f"### {plain['model']}",
        "",
        f"{n} problems, {threads} torch thread{'s' if threads != 1 else ''}, load average "
        f"{plain['load_avg']} during the run (1-minute, sampled after every batch; this process counts ≈1).",
        "",
        "| mode | wall time | speed-up | decode steps | row-steps | generated tokens | tokens/s | greedy accuracy "
        "| ended with `####` | hit the cap |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (plain, early, comp, vllm):
        if r is None:
            continue
        lines.append(
            f"| {NAMES[r['mode']]} | {r['wall_s']:.1f} s | {r['speedup']:.2f}× | {r['decode_steps']} "
            f"| {r['row_steps']} | {r['generated_tokens']} | {r['tokens_per_s']:.0f} "
            f"| {r['correct']}/{n} ({100 * r['accuracy']:.1f}%) | {r['ended_with_answer']}/{n} | {r['hit_cap']}/{n} |"
        )
    same_acc = plain["correct"] == early["correct"] == comp["correct"]
    lines += [
        "",
        f"- Speed-up over `hf-plain`: early stop in `model.generate` **{early['speedup']:.2f}×** "
        f"({plain['decode_steps']} → {early['decode_steps']} decode steps, row-steps {plain['row_steps']} → "
        f"{early['row_steps']}); compact loop **{comp['speedup']:.2f}×** (row-steps {comp['row_steps']}, "
        f"{comp['row_steps'] / max(plain['row_steps'], 1):.0%} of `hf-plain`'s; compact / `hf-early` "
        f"{early['wall_s'] / comp['wall_s']:.2f}×).",
        f"- Greedy accuracy {'equal in all three modes' if same_acc else '**differs between modes**'} "
        f"({plain['correct']}, {early['correct']}, {comp['correct']} of {n}); scored texts equal to `hf-plain`'s "
        f"(cut after the first complete `#### n`) in {early['identical_scored']}/{n} (`hf-early`) and "
        f"{comp['identical_scored']}/{n} (compact) problems; compact tokens equal to `hf-early`'s token for token "
        f"in {comp['identical_tokens']}/{n}. `hf-plain` scored uncut (the last `####` decides): "
        f"{plain['correct_uncut']}/{n}.",
        f"- Of the {plain['hit_cap']} `hf-plain` rows that ran to the cap, {plain['cap_after_answer']} had already "
        f"written a complete `#### n` (loops early stop can cut); {comp['hit_cap']} rows still ran to the cap with "
        "early stop: in `model.generate` each holds its whole batch, in the compact loop only its own row.",
    ]
    if vllm is not None:
        lines.append(
            f"- vLLM (`--engine vllm`): {vllm['wall_s']:.1f} s for all {n} prompts after a start-up of "
            f"{vllm['startup_s']:.1f} s (engine process, weights, KV cache; eager mode on CPU), "
            f"{comp['wall_s'] / vllm['wall_s']:.2f}× the compact loop's speed without the start-up and "
            f"{comp['wall_s'] / (vllm['wall_s'] + vllm['startup_s']):.2f}× with it; greedy accuracy "
            f"{vllm['correct']}/{n}; tokens equal to the compact loop's token for token in "
            f"{vllm['identical_tokens']}/{n}, scored texts equal to `hf-plain`'s in {vllm['identical_scored']}/{n}. "
            "Its decode steps are its longest continuation and its row-steps all the tokens it generated, "
            "including those after a complete answer (it stops at eos only)."
        )
    if plain["row_steps"] == early["row_steps"]:
        lines.append(
            f"- `hf-plain` and `hf-early` did the same work (same row-steps), so their wall-time ratio "
            f"({early['speedup']:.2f}×) is this run's timing noise (load average {plain['load_avg']}); the wall-time "
            "speed-ups above are only as good as that. Row-steps are the load-independent measure: the compact loop "
            f"spent {1 - comp['row_steps'] / max(plain['row_steps'], 1):.0%} fewer than `model.generate`."
        )
    lines.append("")
    return lines


def section(rows: list[dict]) -> str:
    """The markdown section (markers included) for ``docs/benchmarks.md``."""
    first = rows[0]
    threads = first["threads"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        START,
        "## Generation: early stop and the compact decode loop",
        "",
        f"`bench/bench_generate.py`: greedy, {first['n']} problems of `{first['set']}`, batch "
        f"{first['batch_size']}, at most {first['max_new_tokens']} new tokens, left padding, KV cache, fp32, "
        f"{threads} torch thread{'s' if threads != 1 else ''} on {platform.machine()} ({os.cpu_count()} cores, "
        f"shared machine, CPU capability {first['cpu_capability']}), torch {first['torch']}, transformers "
        f"{first['transformers']}. Three modes run batch by batch in rotating order, and vLLM after them where it is "
        "installed (its OpenMP threads bound to as many CPUs as the torch threads): `hf-plain` = `model.generate` "
        "stopping at eos only; `hf-early` = the same plus "
        "the early-stop criterion (a row is finished at a complete `#### n` or eos), finished rows staying in the "
        "batch (padded) until its slowest row ends; compact = `targetsft.evaluation.engines`'s default engine, the "
        "same "
        "criterion in a decode loop that drops finished rows from the KV cache and the batch. Decode steps = "
        "forward passes; row-steps = rows summed over the forward passes (the compute spent).",
        "",
    ]
    for m in models:
        lines += _model_block([r for r in rows if r["model"] == m])
    lines += [
        "Notes:",
        "",
        "- Why `hf-early` gains little: in `model.generate` a batch runs until its slowest row ends, and one row "
        'that loops to the cap (column "hit the cap"; 1–5% of a fine-tuned model\'s outputs in the pilot) keeps '
        "every finished row of its batch in the forward passes, so early stop saves steps only when *every* row of "
        "a batch ends early. The compact loop drops a row once it is finished (eos, or a complete `#### n`), so a "
        "looping row costs its own row only; what remains is one forward pass per step for the last rows of a "
        "batch, and a small-batch step costs more per row than a full one (the weights are read once per step "
        "whatever the batch), so wall time falls less than row-steps.",
        "- Tokens/s counts each row's own tokens (up to its eos or answer) over wall time.",
        f"- {threads} torch thread{'s' if threads != 1 else ''}: on this shared 2-core machine, 2 threads next to "
        "another busy process ran 15–25× slower than 1 in a probe (OpenMP oversubscription), so absolute speeds "
        "here are single-thread figures.",
        "",
        "Reproduce: `python bench/bench_generate.py` (add `--model default --model runs/quickstart/sft/final` for "
        "a fine-tuned model too); `--report` rewrites this section from `bench/results/generate.csv`.",
        END,
    ]
    return "\n".join(lines)


def read_csv() -> list[dict]:
    """The rows of ``bench/results/generate.csv``, numbers parsed."""
    with open(CSV_PATH, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k, v in r.items():
            for cast in (int, float):
                try:
                    r[k] = cast(v)
                    break
                except (TypeError, ValueError):
                    pass
    return rows


def write_doc(text: str) -> None:
    """Replace this benchmark's section of ``docs/benchmarks.md``."""
    body = text.removeprefix(START).removesuffix(END)
    write_section("generate", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--set", default="gsm-intemplate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model folder, repeatable ('default' = the embedded SmolLM2-135M-Instruct, also the default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, 2 threads next to another busy process ran "
        "15-25x slower than 1 in a probe; 0 = torch's default)",
    )
    p.add_argument("--precision", default="auto", help="weights' dtype (targetsft.runtime.precision; default auto)")
    p.add_argument("--no-vllm", action="store_true", help="leave out the vllm mode (run when vLLM is installed)")
    p.add_argument("--no-doc", action="store_true", help="do not write the CSV or docs/benchmarks.md")
    p.add_argument("--report", action="store_true", help="only rewrite the docs section from the CSV")
    args = p.parse_args()
    if args.report:
        write_doc(section(read_csv()))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for m in args.model or [None]:
        rows += run_model(args, None if m is None or m.lower() == "default" else m)
    for r in rows:
        print({k: r[k] for k in ("model", "mode", "wall_s", "decode_steps", "row_steps", "correct", "speedup")})
    if not args.no_doc:
        write_csv(rows)
        write_doc(section(rows))


if __name__ == "__main__":
    main()
