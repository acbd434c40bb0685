"""The paper cell's evaluation load through vLLM at the paper's model size, on a GPU machine with vLLM's CUDA build
(not part of ``bench/gpu_check.sh``: that wheel is far over what a run on the offline GPU machine may carry).

A random-weight model of Qwen2.5-Math-1.5B's shape (:func:`gpu_train_check.qwen_like_config`, bf16) is given
``--prompts`` prompts of 128 random token ids, ``--samples`` samples each at temperature 1, up to
``--max-new-tokens`` new tokens (random weights rarely emit eos, so most run to the cap: a worst case for the
paper's Average@16 on MATH-500, about 500 × 16 × ~1,500 tokens). Reported: vLLM's start-up, generation seconds and
tokens/s, and the compact loop's tokens/s on a small greedy subset of the same prompts (``--compact-prompts``, 256
new tokens) with the two engines' greedy tokens compared there. Rows go to ``bench/results/gpu_vllm.csv`` and the
``gpu_vllm`` section of ``docs/benchmarks.md``.

    python bench/gpu_vllm_check.py                  # on a GPU with vLLM's CUDA build
    python bench/gpu_vllm_check.py --dry-run        # the plan and the model size (meta device), anywhere
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

from docsection import write_csv_section
from gpu_train_check import _params, qwen_like_config
from timing import append_rows

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "gpu_vllm.csv"
FIELDS = ["device", "model", "params_b", "prompts", "samples", "max_new_tokens", "startup_s", "seconds"]
FIELDS += ["tokens", "tokens_per_s", "compact_tokens_per_s", "greedy_equal", "vllm", "torch", "date"]


class _IdTokenizer:
    """The little of a tokenizer the engines use here: ids in, ids decoded as numbers out (no vocabulary needed)."""

    eos_token_id = 151643
    pad_token_id = 151643

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(t) for t in s.split()] for s in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


def run(args: argparse.Namespace) -> dict:
    import torch
    import vllm
    from transformers import AutoModelForCausalLM

    from targetsft.evaluation.engines import generate_detailed
    from targetsft.runtime.vllm_engine import VLLMEngine

    config = qwen_like_config()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151000, (args.prompts, 128), generator=gen).tolist()
    prompts = [" ".join(map(str, row)) for row in ids]
    tok = _IdTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        t0 = time.perf_counter()
        engine = VLLMEngine(tmp, dtype="bfloat16", max_model_len=128 + args.max_new_tokens, enforce_eager=False)
        startup = time.perf_counter() - t0
        try:
            kw = {"stop_on_answer": False, "cut": False, "progress": False}
            run_v = generate_detailed(
                engine, tok, prompts, samples=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens, **kw
            )
            small = prompts[: args.compact_prompts]
            greedy_v = generate_detailed(engine, tok, small, max_new_tokens=256, **kw)
        finally:
            engine.close()
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda()
        greedy_c = generate_detailed(model, tok, small, max_new_tokens=256, engine="compact", batch_size=64, **kw)
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(greedy_v.outputs, greedy_c.outputs, strict=True))
    row = {
        "device": torch.cuda.get_device_name(0),
        "model": "qwen2.5-1.5b-shape, random, bf16",
        "params_b": round(_params(config) / 1e9, 3),
        "prompts": args.prompts,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "startup_s": round(startup, 1),
        "seconds": round(run_v.seconds, 1),
        "tokens": run_v.generated_tokens,
        "tokens_per_s": round(run_v.generated_tokens / run_v.seconds),
        "compact_tokens_per_s": round(greedy_c.generated_tokens / greedy_c.seconds),
        "greedy_equal": f"{same}/{len(small)}",
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    append_rows(CSV_PATH, FIELDS, [row])
    return row


def report() -> None:
    write_csv_section(
        "gpu_vllm",
        (
            "GPU evaluation load (`bench/gpu_vllm_check.py`, on a GPU machine with vLLM's CUDA build; not part of the "
            "acceptance run): vLLM sampling at "
            "temperature 1 on a random-weight Qwen2.5-1.5B-shaped model in bf16 (most rows run to the cap), and the "
            "compact loop's greedy throughput on a subset of the prompts. Engine figures only; no accuracy. bf16 "
            "greedy tokens of two engines may part at near-ties, so `greedy_equal` is a check, not a requirement."
        ),
        CSV_PATH,
        [f for f in FIELDS if f != "date"],  # the CSV keeps each run's date; the page states what is true now
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--compact-prompts", type=int, default=32)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        size = _params(qwen_like_config()) / 1e9
        print(
            f"  vLLM: {args.prompts} prompts × {args.samples} samples, up to {args.max_new_tokens} new tokens, on a "
            f"random Qwen2 shape of {size:.2f}B parameters (bf16); compact: {args.compact_prompts} greedy prompts"
        )
        return
    print(run(args))
    report()


if __name__ == "__main__":
    main()
