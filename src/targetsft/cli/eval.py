"""``target-sft eval``: a model on several sets (generative or multiple choice), its options and the table it
prints (:func:`targetsft.evaluation.evaluate`)."""

from __future__ import annotations

import argparse
import sys

import torch

from targetsft.evaluation.engines import ENGINES
from targetsft.evaluation.options import ChoiceOptions, DecodeOptions
from targetsft.evaluation.prompts import PROMPT_STYLES
from targetsft.runtime.precision import PRECISIONS


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
    """Add the ``target-sft eval`` options to ``parser`` (then call :func:`run_eval_from_args` on the result): one
    readable sequence, an ``add_argument`` per option."""
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
    """Run :func:`~targetsft.evaluation.suite.evaluate` from parsed :func:`add_eval_arguments` options; 0 on success,
    2 on a usage error."""
    from targetsft.evaluation import suite
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
        report = suite.evaluate(
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
    print(report["table"])
    return 0
