"""Greedy GSM generation with and without the early-stop criterion (``#### <number>`` complete, or eos).

On the embedded SmolLM2-135M-Instruct (fp32, CPU), ``--n`` problems of ``gsm-intemplate`` are generated greedily in
batches of ``--batch-size`` (prompts sorted by length, as :func:`targetsft.evaluate.generate` does) in two modes:

- ``plain``: ``model.generate`` stopping only at eos (``<|im_end|>``) or ``--max-new-tokens``;
- ``early``: the same plus :class:`targetsft.evaluate.AnswerStoppingCriteria`.

The two modes run batch by batch, alternately, so that load from other processes on a shared machine hits both
alike. Reported per mode: wall time, decode steps (a batch runs until its slowest row ends), generated tokens (each
row up to its own end), accuracy, and whether the scored texts agree (the plain output cut right after its first
complete ``#### n`` must equal the early-stopped one). Results go to ``bench/results/generate.csv`` and to the section
between ``<!-- generate:start -->`` and ``<!-- generate:end -->`` of ``docs/benchmarks.md`` (the rest of that file
is left alone).

    python bench/bench_generate.py                 # N = 64, batch 32, 256 new tokens (a few minutes on 2 cores)
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
FIELDS = [
    "date",
    "model",
    "set",
    "n",
    "batch_size",
    "max_new_tokens",
    "mode",
    "wall_s",
    "decode_steps",
    "generated_tokens",
    "tokens_per_s",
    "correct",
    "accuracy",
    "correct_uncut",
    "ended_with_answer",
    "hit_cap",
    "cap_after_answer",
    "identical_scored",
    "speedup",
    "threads",
    "load_avg",
    "torch",
    "transformers",
]


def _batches(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch, as generate() forms them: sorted by token length (longest first), then chunked."""
    lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    import transformers

    from targetsft.answers import is_correct
    from targetsft.data.eval_sets import load_eval_set
    from targetsft.evaluate import answer_complete, build_prompts, cut_at_answer, generate_detailed
    from targetsft.models import load_model, load_tokenizer, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_model(path, dtype=torch.float32)
    tok = load_tokenizer(path, padding_side="left")
    rows = load_eval_set(args.set, args.n)
    prompts = build_prompts(tok, [r["question"] for r in rows])
    gold = [r["answer"] for r in rows]
    # warm-up on a full batch, so that allocator / kernel warm-up does not fall on the first timed mode
    generate_detailed(model, tok, prompts[: args.batch_size], max_new_tokens=8, progress=False)

    kw = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "progress": False}
    texts = {"plain": [""] * len(rows), "early": [""] * len(rows)}
    gens: dict[str, list] = {"plain": [None] * len(rows), "early": [None] * len(rows)}
    wall = {"plain": 0.0, "early": 0.0}
    steps = {"plain": 0, "early": 0}
    load0 = os.getloadavg()[0]
    for b, idx in enumerate(_batches(tok, prompts, args.batch_size)):
        for mode in ("plain", "early") if b % 2 == 0 else ("early", "plain"):
            r = generate_detailed(
                model, tok, [prompts[i] for i in idx], stop_on_answer=mode == "early", cut=mode == "early", **kw
            )
            wall[mode] += r.seconds
            steps[mode] += r.decode_steps
            for i, outs in zip(idx, r.outputs, strict=True):
                gens[mode][i] = outs[0]
                texts[mode][i] = outs[0].text
            print(
                f"batch {b} {mode}: {r.seconds:.1f}s, {r.decode_steps} steps, {r.generated_tokens} tokens", flush=True
            )
    load1 = os.getloadavg()[0]

    cut_plain = [cut_at_answer(t) for t in texts["plain"]]
    identical = sum(a == b for a, b in zip(cut_plain, texts["early"], strict=True))
    common = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "SmolLM2-135M-Instruct (fp32, CPU)" if args.model is None else str(args.model),
        "set": args.set,
        "n": len(rows),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "load_avg": f"{load0:.1f}-{load1:.1f}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    out = []
    for mode in ("plain", "early"):
        scored = cut_plain if mode == "plain" else texts["early"]
        correct = sum(is_correct(t, g) for t, g in zip(scored, gold, strict=True))
        toks = sum(g.n_tokens for g in gens[mode])
        out.append(
            {
                **common,
                "mode": mode,
                "wall_s": round(wall[mode], 2),
                "decode_steps": steps[mode],
                "generated_tokens": toks,
                "tokens_per_s": round(toks / wall[mode], 1),
                "correct": correct,
                "accuracy": round(correct / len(rows), 4),
                "correct_uncut": sum(is_correct(t, g) for t, g in zip(texts["plain"], gold, strict=True))
                if mode == "plain"
                else "",
                "ended_with_answer": sum("####" in t for t in scored),
                "hit_cap": sum(g.finish_reason == "length" for g in gens[mode]),
                "cap_after_answer": sum(g.finish_reason == "length" and answer_complete(g.text) for g in gens[mode]),
                "identical_scored": identical,
                "speedup": round(wall["plain"] / wall["early"], 3) if mode == "early" else 1.0,
            }
        )
    return out


def write_csv(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = CSV_PATH.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, CSV_PATH)
    print(f"wrote {CSV_PATH.relative_to(ROOT)}")


def _speed_line(plain: dict, early: dict) -> str:
    line = (
        f"- Wall time plain / early stop: **{early['speedup']:.2f}×** ({plain['decode_steps']} → "
        f"{early['decode_steps']} decode steps, {plain['generated_tokens']} → {early['generated_tokens']} generated "
        "tokens)."
    )
    if plain["decode_steps"] == early["decode_steps"]:
        line += (
            " Both modes ran the same decode steps over the same batches, so the difference is timing noise: "
            "**no real speed-up** here."
        )
    return line


def section(rows: list[dict]) -> str:
    """The markdown section (markers included) for ``docs/benchmarks.md``."""
    plain, early = rows
    n, threads = plain["n"], plain["threads"]
    lines = [
        START,
        "## Generation early stop",
        "",
        f"`bench/bench_generate.py`, {plain['date']}: {plain['model']}, greedy, {n} problems of `{plain['set']}`, "
        f"batch {plain['batch_size']}, at most {plain['max_new_tokens']} new tokens, left padding, KV cache "
        f"(`model.generate`), {threads} torch thread{'s' if threads != 1 else ''} on {platform.machine()} "
        f"({os.cpu_count()} cores; load average {plain['load_avg']} during the run, the machine is shared), "
        f"torch {plain['torch']}, transformers {plain['transformers']}. The two modes ran batch by batch, "
        "alternately.",
        "",
        "| mode | wall time | decode steps | generated tokens | tokens/s | greedy accuracy | ended with `####` "
        "| hit the cap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"plain": "plain (stop at eos only)", "early": "early stop (`#### n` complete, or eos)"}
    for r in rows:
        lines.append(
            f"| {names[r['mode']]} | {r['wall_s']:.1f} s | {r['decode_steps']} | {r['generated_tokens']} "
            f"| {r['tokens_per_s']:.0f} | {r['correct']}/{n} ({100 * r['accuracy']:.1f}%) "
            f"| {r['ended_with_answer']}/{n} | {r['hit_cap']}/{n} |"
        )
    lines += [
        "",
        _speed_line(plain, early),
        f"- Scored texts identical in {early['identical_scored']}/{n} problems: the plain output cut right after its "
        "first complete `#### n` (what `targetsft.evaluate` always scores) equals the early-stopped output, so the "
        "accuracy is the same. Scoring the plain output uncut (the last `####` decides) gives "
        f"{plain['correct_uncut']}/{n}.",
        f"- Of the {plain['hit_cap']} plain rows that ran to the cap, {plain['cap_after_answer']} had already "
        "written a complete `#### n`: those are the loops early stop can cut; the others looped without ever "
        "writing one.",
        "- Finished rows stay in the batch (padded) and a batch runs until its slowest row ends, so early stop saves "
        "time only when *every* row of a batch has ended before the cap. With this base model no batch did. "
        "Fine-tuned models end in `####` 90–100% of the time with ≈5% of rows capped (pilot): early stop helps them "
        "only as far as those capped rows loop *after* their answer. A lower `max_new_tokens` (reference solutions "
        "average ≈109 tokens) or dropping finished rows from the batch would save time on loops of either kind. "
        "Tokens/s counts each row's own tokens (up to its eos or answer) over wall time.",
        f"- {threads} torch thread{'s' if threads != 1 else ''}: on this shared 2-core machine, 2 threads next to "
        "another busy process ran 15–25× slower than 1 in a probe (OpenMP oversubscription), so absolute speeds "
        "here are single-thread figures; the pilot's 140–160 tokens/s were measured with 2 threads.",
        "",
        "Reproduce: `python bench/bench_generate.py`; `--report` rewrites this section from "
        "`bench/results/generate.csv`.",
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
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, 2 threads next to another busy process ran "
        "15-25x slower than 1 in a probe; 0 = torch's default)",
    )
    p.add_argument("--no-doc", action="store_true", help="do not write the CSV or docs/benchmarks.md")
    p.add_argument("--report", action="store_true", help="only rewrite the docs section from the CSV")
    args = p.parse_args()
    if args.report:
        write_doc(section(read_csv()))
        return
    rows = run(args)
    for r in rows:
        print({k: r[k] for k in ("mode", "wall_s", "decode_steps", "generated_tokens", "correct", "speedup")})
    if not args.no_doc:
        write_csv(rows)
        write_doc(section(rows))


if __name__ == "__main__":
    main()
