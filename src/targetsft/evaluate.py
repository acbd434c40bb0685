"""Evaluation: batched generation with early stop, GSM-style answer scoring, and multiple-choice log-likelihood.

Generative sets (:data:`targetsft.data.eval_sets.EVAL_SETS` or a ``.jsonl`` file with ``question``/``answer``)
-----------------------------------------------------------------------------------------------------------------
* **Prompt** (:func:`build_prompt`): the tokenizer's chat template with ``add_generation_prompt=True`` on one user
  message, :func:`targetsft.data.gsm.gsm_user_message` (question + the ``#### <number>`` instruction): exactly the
  prompt that training (:mod:`targetsft.data.sft`) puts before the completion. The rendered prompt is tokenized with
  ``add_special_tokens=False`` (the template already holds the special tokens), as in training.
* **Generation** (:func:`generate`): prompts sorted by length into batches (longest first), left padded, KV
  cache; results put back in the input order. Greedy when ``temperature == 0``, else sampling with ``temperature``
  and ``top_p`` (``top_k`` disabled; the model's own generation defaults are not used). Two engines:

  - ``compact`` (default, :func:`_run_batch_compact`): a decode loop over the model's forward with a
    ``DynamicCache`` that **drops finished rows from the batch** (cache, attention mask, positions), so a row that
    loops to ``max_new_tokens`` costs its own row only, not the whole batch's. Sampling draws one uniform per
    (row, step) from a ``torch.Generator`` seeded with ``seed + batch_index``.
  - ``hf``: ``model.generate``; finished rows stay in the batch (padded) until its slowest row ends. Sampling
    runs under ``torch.manual_seed(seed + batch_index)`` inside :func:`torch.random.fork_rng`.

  Greedy outputs are the same with both engines (up to floating-point ties: the batch shrinks in ``compact``).
  Either way results depend only on the inputs, ``batch_size`` and ``seed`` (not on what ran before) and the
  caller's RNG state is untouched.
* **Early stop** (:class:`AnswerStoppingCriteria`): a row is finished once its generated text holds a *complete*
  ``#### <number>`` (the number followed by a character that cannot continue it: ``#### 12`` is not complete, since
  ``#### 125`` may follow; ``#### 12\\n`` or ``#### 12 dollars`` are; ``#### 12.`` waits for the next character,
  ``12.5`` vs ``12.\\n``), or once it emits eos (``<|im_end|>``). The batch stops when every row is finished or at
  ``max_new_tokens``. ``stop_on_answer=False`` stops rows at eos only.
* **Scored text**: the new tokens only, special tokens skipped, cut right after the number of the first complete
  ``#### n`` (:func:`cut_at_answer`; the rest of that line, e.g. a unit, is dropped: an early-stopped row never
  generates it). The cut is applied with or without early stop, so early stop only saves time and changes neither
  the scored text nor the score: rows are computed independently, so a row's tokens up to its answer are the same
  either way (checked on 64 greedy problems by ``bench/bench_generate.py``, which also times the engines).
* **Answers**: :func:`targetsft.answers.extract_answer` / :func:`targetsft.answers.is_correct`.

Metrics (:func:`generation_metrics`)
------------------------------------
With ``k`` samples per problem and ``c_i`` of them correct on problem ``i`` (``n`` problems):

* ``average@k`` = mean over problems of ``c_i / k`` (the paper's Average@k; the expected accuracy of one sample),
* ``pass@k`` = fraction of problems with at least one correct sample, and, for ``k > 1``, the unbiased estimates
  ``pass@j`` for ``j`` in 1, 2, 4, … < k: mean over problems of ``1 - C(k - c_i, j) / C(k, j)`` (Chen et al. 2021;
  ``pass@1`` equals ``average@k``),
* ``greedy`` = accuracy of one greedy answer per problem (a separate greedy pass unless the samples are greedy).

95% intervals are over problems (the samples of one problem are not independent draws of the benchmark):

* per-problem values that are all 0 or 1 (greedy accuracy, pass@k, average@1, multiple-choice accuracy): the
  **Wilson score interval** (:func:`wilson_ci`), which stays inside [0, 1] and does not collapse to a point at 0% or
  100% (the pilot's accuracies sit at 0–12%);
* other per-problem means (``average@k`` for ``k > 1``, unbiased ``pass@j``): the **normal interval**
  (:func:`mean_ci`) ``mean ± z·s/√n`` with ``s`` the sample standard deviation (``n − 1``) and ``z`` the normal
  quantile (1.96 for 95%), clipped to [0, 1]. Closed form, deterministic. A t quantile would widen it by about
  2.5% at n = 50 and 0.4% at n = 300.

Compare two models on the same problems with a paired test on the per-problem results in the JSONL files, not by
checking whether these intervals overlap.

Multiple choice (:data:`targetsft.data.eval_sets.MC_SETS`)
-----------------------------------------------------------
:func:`evaluate_multiple_choice` scores every choice by its log-likelihood as a continuation, without generation:
context ``"Question: {question}\\nAnswer:"`` (:func:`mc_context`), continuation ``" " + choice`` (each tokenized
without special tokens and concatenated, so no BPE merge crosses the boundary). This is the plain-text format of
lm-evaluation-harness' PIQA / CommonsenseQA / OpenBookQA tasks (the way SmolLM2's own scores are measured). No chat
template: these sets measure knowledge retained from pre-training (forgetting), the same prompt must work for a base
and a fine-tuned model, and a chat turn would also score the template's ``<|im_end|>`` layout rather than the
answer. The prediction is the choice with the highest mean log-prob per continuation token (``normalize="mean"``,
length-normalised; default) or the highest sum (``"sum"``); both accuracies are always reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from targetsft.answers import extract_answer, extract_boxed, is_correct, is_correct_boxed
from targetsft.data.gsm import gsm_user_message
from targetsft.files import atomic_write_text
from targetsft.precision import PRECISIONS, environment, resolve_precision

__all__ = [
    "AnswerStoppingCriteria",
    "Generation",
    "GenerationRun",
    "add_eval_arguments",
    "answer_complete",
    "build_prompt",
    "build_prompts",
    "cut_at_answer",
    "evaluate",
    "evaluate_generation",
    "evaluate_multiple_choice",
    "format_table",
    "generate",
    "generate_detailed",
    "generation_metrics",
    "mc_context",
    "mean_ci",
    "pass_at_k",
    "run_eval_from_args",
    "score_continuations",
    "wilson_ci",
]

FinishReason = Literal["answer", "eos", "length"]

# "####", optional spaces / "$" / sign, a number (digit groups joined by "." or ","), then a character that cannot
# continue the number: not a digit, and "." or "," only when followed by a non-digit.
_ANSWER_COMPLETE = re.compile(r"####\s*\$?\s*[-+\u2212]?(?P<num>\d+(?:[.,]\d+)*)(?:[^\d.,]|[.,][^\d])")


# ------------------------------------------------------------------------------------------------------ prompts


BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("gsm", "boxed")


def build_prompt(tokenizer: Any, question: str, style: str = "gsm") -> str:
    """The generation prompt: chat template with ``add_generation_prompt=True`` on one user message, for
    ``style="gsm"`` :func:`~targetsft.data.gsm.gsm_user_message` (the training format: ``#### <number>``), for
    ``"boxed"`` the question + :data:`BOXED_INSTRUCTION` (MATH-style answers, scored by their last ``\\boxed{}``)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; evaluation uses the chat format of training")
    content = gsm_user_message(question) if style == "gsm" else question + BOXED_INSTRUCTION
    msgs = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def build_prompts(tokenizer: Any, questions: Sequence[str], style: str = "gsm") -> list[str]:
    """:func:`build_prompt` for each question."""
    return [build_prompt(tokenizer, q, style) for q in questions]


# ---------------------------------------------------------------------------------------------- answer markers


def answer_complete(text: str) -> bool:
    """Whether ``text`` holds a complete ``#### <number>`` (the number followed by a character that ends it)."""
    return _ANSWER_COMPLETE.search(text) is not None


def cut_at_answer(text: str) -> str:
    """``text`` up to the end of the number of its first complete ``#### <number>`` (unchanged when there is none):
    ``"…#### 12 dollars\\n#### 13"`` → ``"…#### 12"``."""
    m = _ANSWER_COMPLETE.search(text)
    return text if m is None else text[: m.end("num")]


class AnswerStoppingCriteria:
    """Per-sequence stopping criterion for ``model.generate`` (a ``transformers.StoppingCriteria``), also driven row
    by row by the compact decode loop (:meth:`update`).

    A row is finished once its eos (any of ``eos_token_ids``) is generated, or, with ``stop_on_answer``, once the
    decoded new tokens (special tokens skipped) hold a complete ``#### <number>`` (:func:`answer_complete`). Returns
    a BoolTensor of shape ``(batch,)`` that stays True for finished rows. ``n_tokens[i]`` / ``reasons[i]`` record
    how many new tokens row ``i`` had when it finished (its last token included) and why (``"eos"`` or
    ``"answer"``); None while it runs. ``prompt_length`` is the (left-padded) prompt width, so the new tokens are
    ``input_ids[:, prompt_length:]``. ``batch_size``: the number of rows (else taken from the first call). One
    instance serves one ``generate`` call (one batch).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_length: int,
        *,
        eos_token_ids: Sequence[int] = (),
        stop_on_answer: bool = True,
        batch_size: int | None = None,
    ) -> None:
        _register_as_stopping_criteria()
        self.tokenizer = tokenizer
        self.prompt_length = int(prompt_length)
        ids = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self.eos_ids = torch.tensor(sorted(ids), dtype=torch.long)
        self.stop_on_answer = stop_on_answer
        self.done: torch.Tensor | None = None
        self.n_tokens: list[int | None] = []
        self.reasons: list[FinishReason | None] = []
        if batch_size is not None:
            self._start(batch_size)

    def _start(self, batch_size: int) -> None:
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        self.n_tokens, self.reasons = [None] * batch_size, [None] * batch_size

    def _finish(self, row: int, n: int, reason: FinishReason) -> None:
        assert self.done is not None
        self.done[row] = True
        self.n_tokens[row] = n
        self.reasons[row] = reason

    def update(self, new_tokens: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Check rows after a decode step: ``new_tokens[i]`` holds all new tokens so far (same count ``n`` for every
        row) of batch row ``rows[i]`` (default: row ``i``). Marks the rows that finish with this step's token and
        returns, on the CPU, whether each of ``rows`` is finished."""
        new = new_tokens.cpu()
        rows = list(range(new.shape[0])) if rows is None else [int(r) for r in rows]
        if self.done is None:
            self._start(max(rows, default=-1) + 1)
        assert self.done is not None
        idx = torch.tensor(rows, dtype=torch.long)
        n = new.shape[1]
        if n > 0 and rows:
            hit_eos = torch.isin(new[:, -1], self.eos_ids) & ~self.done[idx]
            for i in hit_eos.nonzero().flatten().tolist():
                self._finish(rows[i], n, "eos")
            if self.stop_on_answer:
                active = (~self.done[idx]).nonzero().flatten().tolist()
                if active:
                    texts = self.tokenizer.batch_decode(new[active], skip_special_tokens=True)
                    for i, text in zip(active, texts, strict=True):
                        if answer_complete(text):
                            self._finish(rows[i], n, "answer")
        return self.done[idx].clone()

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.done is None:
            self._start(input_ids.shape[0])
        self.update(input_ids[:, self.prompt_length :])
        assert self.done is not None
        return self.done.clone().to(input_ids.device)


def _register_as_stopping_criteria() -> None:
    """Make :class:`AnswerStoppingCriteria` an (ABC-registered) ``transformers.StoppingCriteria``; done lazily so
    that importing this module does not import transformers (the CLI imports it for its arguments)."""
    try:
        from transformers import StoppingCriteria
    except ImportError:  # pragma: no cover - generation needs transformers anyway
        return
    if not issubclass(AnswerStoppingCriteria, StoppingCriteria):
        StoppingCriteria.register(AnswerStoppingCriteria)


# --------------------------------------------------------------------------------------------------- generation


Engine = Literal["compact", "hf"]
ENGINES: tuple[str, ...] = ("compact", "hf")


@dataclass(frozen=True)
class Generation:
    """One generated answer: the scored ``text`` (cut after its first ``#### n``), the number of new tokens
    generated for it (eos or the answer's last token included), why it ended (``answer``, ``eos``, ``length``) and
    the ``token_ids`` of those new tokens (not compared by ``==``)."""

    text: str
    n_tokens: int
    finish_reason: FinishReason
    token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)


@dataclass
class GenerationRun:
    """Result of :func:`generate_detailed`: ``outputs[i][j]`` is sample ``j`` of prompt ``i``. ``decode_steps``: sum
    over batches of the forward passes (steps) the batch ran: until its slowest row finishes. ``row_steps``: sum
    over steps of the rows in the forward pass, the compute actually spent: with ``engine="hf"`` every row stays
    until the batch ends (``steps × rows``), with ``engine="compact"`` a row leaves once it is finished (the sum
    of the rows' ``n_tokens``)."""

    outputs: list[list[Generation]]
    seconds: float
    batches: int
    decode_steps: int
    row_steps: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        """New tokens over all distinct generations (greedy samples replicated ``samples`` times count once)."""
        seen: dict[int, Generation] = {}
        for outs in self.outputs:
            for g in outs:
                seen[id(g)] = g
        return sum(g.n_tokens for g in seen.values())


def _check_decoding(
    samples: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int, engine: str = "compact"
) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.update(int(i) for i in cfg_eos)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an eos token")
    return sorted(ids)


def _generation_config(temperature: float, top_p: float, max_new_tokens: int, eos_ids: list[int], pad_id: int) -> Any:
    """A fresh GenerationConfig: greedy or plain temperature/top-p sampling (top_k off), nothing from the model's
    own generation defaults (repetition penalties etc.)."""
    from transformers import GenerationConfig

    kw: dict[str, Any] = {}
    if temperature > 0:
        kw = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    else:
        kw = {"do_sample": False}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=pad_id,
        **kw,
    )


def _left_pad(seqs: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def _run_batch(
    model: Any,
    tokenizer: Any,
    seqs: list[list[int]],
    *,
    gen_config: Any,
    eos_ids: list[int],
    pad_id: int,
    seed: int,
    stop_on_answer: bool,
    cut: bool,
    generation_kwargs: dict[str, Any],
) -> tuple[list[Generation], int, int]:
    """``model.generate`` for one batch of token-id prompts; returns the generations (batch order), the steps run
    and the row-steps (steps × rows: finished rows stay in the batch, padded)."""
    device = _model_device(model)
    input_ids, attention_mask = _left_pad(seqs, pad_id, device)
    crit = AnswerStoppingCriteria(tokenizer, input_ids.shape[1], eos_token_ids=eos_ids, stop_on_answer=stop_on_answer)
    from transformers import StoppingCriteriaList

    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=gen_config,
            stopping_criteria=StoppingCriteriaList([crit]),
            **generation_kwargs,
        )
    new = out[:, input_ids.shape[1] :].cpu()
    steps = int(new.shape[1])
    return _generations(tokenizer, crit, new, steps, cut), steps, steps * len(seqs)


def _generations(
    tokenizer: Any, crit: AnswerStoppingCriteria, new: torch.Tensor, steps: int, cut: bool
) -> list[Generation]:
    """The :class:`Generation` of each row from its new tokens ``new[row]`` and the criterion's record (a row that
    never finished ran all ``steps``: ``length``)."""
    gens = []
    for row in range(new.shape[0]):
        n = crit.n_tokens[row] if crit.n_tokens and crit.n_tokens[row] is not None else steps
        reason: FinishReason = crit.reasons[row] if crit.reasons and crit.reasons[row] is not None else "length"
        ids = new[row, :n]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        gens.append(Generation(cut_at_answer(text) if cut else text, int(n), reason, tuple(ids.tolist())))
    return gens


# Cache layers whose ``batch_select_indices`` keeps exactly the selected rows (quantized layers keep a second,
# quantized copy it does not touch; linear-attention / static / indexed layers have none or a different layout).
_SELECTABLE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _forward_params(model: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins / odd wrappers
        return set()


def _compact_cache(model: Any) -> Any:
    """A fresh ``DynamicCache`` for ``model`` (layer types from its config, as ``generate`` builds it); raises
    ``NotImplementedError`` when a layer cannot drop rows (see :data:`_SELECTABLE_LAYERS`)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    _check_selectable(cache)
    return cache


def _check_selectable(cache: Any) -> None:
    bad = sorted({type(layer).__name__ for layer in cache.layers} - set(_SELECTABLE_LAYERS))
    if bad:
        raise NotImplementedError(f"cache layers {bad} have no row selection")


def _select_rows(cache: Any, keep: torch.Tensor) -> None:
    """Keep only the batch rows ``keep`` of every cache layer (indices moved to each layer's device, for models
    spread over devices)."""
    for layer in cache.layers:
        dev = getattr(layer, "device", None)
        layer.batch_select_indices(keep.to(dev) if isinstance(dev, torch.device) else keep)


def _compact_unsupported(model: Any) -> str | None:
    """Why the compact loop cannot run ``model`` (None when it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    params = _forward_params(model)
    if "position_ids" not in params or not {"cache", "past_key_values"} & params:
        return "its forward takes no position_ids / cache"
    try:
        _compact_cache(model)
    except (NotImplementedError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"DynamicCache: {e}"
    return None


def _sample_rows(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from ``softmax(scores[i])`` by inverse CDF with the uniform ``u[i]`` in [0, 1):
    the first token whose cumulative probability exceeds ``u[i]`` × total. A token of probability 0 (a ``-inf``
    score) is never drawn."""
    cdf = torch.softmax(scores, dim=-1).cumsum(-1)
    total = cdf[:, -1:]
    # u * total rounds to total at worst; stay strictly below it so that a token of nonzero probability is hit
    x = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


def _fork_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _run_batch_compact(
    model: Any,
    tokenizer: Any,
    seqs: list[list[int]],
    *,
    eos_ids: list[int],
    pad_id: int,
    seed: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_on_answer: bool,
    cut: bool,
    logits_processor: Any = None,
) -> tuple[list[Generation], int, int]:
    """The compact decode loop for one batch of token-id prompts: returns the generations (batch order), the
    steps (forward passes) run and the row-steps (rows summed over the forward passes).

    Prefill of the left-padded batch, then one token per step with a ``DynamicCache``, explicit ``position_ids``
    (``cumsum(mask) - 1``, then + 1 per step) and the growing attention mask. After each step the rows that
    finished (:class:`AnswerStoppingCriteria`: eos, or a complete ``#### n`` with ``stop_on_answer``) leave the
    batch: their rows are dropped from the cache (``batch_select_indices``), the mask, the positions and the
    token buffers, so a row that loops to ``max_new_tokens`` costs its own row only. Greedy (argmax of the
    float32 logits, as ``generate``) or sampling: ``logits_processor`` (``generate``'s ``logits_processor``
    argument; it sees the prompt + new tokens of the remaining rows), then temperature and top-p (transformers'
    warpers, in ``generate``'s order), then a draw by inverse CDF from one uniform per (row, step) of a
    ``torch.Generator`` seeded with ``seed``: a row's draws do not depend on which rows are still in the batch.
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    device = _model_device(model)
    input_ids, mask = _left_pad(seqs, pad_id, device)
    b, width = input_ids.shape
    crit = AnswerStoppingCriteria(tokenizer, width, eos_token_ids=eos_ids, stop_on_answer=stop_on_answer, batch_size=b)
    user_procs = LogitsProcessorList(logits_processor or [])
    procs = LogitsProcessorList(user_procs)
    if temperature > 0:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(temperature)))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    params = _forward_params(model)
    cache = _compact_cache(model)
    fwd: dict[str, Any] = {"use_cache": True, ("cache" if "cache" in params else "past_key_values"): cache}
    if "logits_to_keep" in params:
        fwd["logits_to_keep"] = 1
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long)  # new tokens of every row (CPU)
    rows = torch.arange(b)  # batch row of each row still running
    rows_dev = rows.to(device)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cur, seq = input_ids, input_ids  # this step's input; prompt + new tokens of the running rows (processors)
    steps = row_steps = 0
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)  # for processors that draw from the global RNG
        for step in range(max_new_tokens):
            out = model(input_ids=cur, attention_mask=mask, position_ids=pos, **fwd)
            logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
            del out
            steps, row_steps = steps + 1, row_steps + cur.shape[0]
            if step == 0:
                _check_selectable(cache)  # layers a model adds lazily
            scores = procs(seq, logits) if procs else logits
            if temperature > 0:
                u = torch.rand(b, generator=gen, device=device)  # one per batch row, also for finished rows
                nxt = _sample_rows(scores, u[rows_dev])
            else:
                nxt = scores.argmax(dim=-1)
            tokens[rows, step] = nxt.cpu()
            done = crit.update(tokens[rows, : step + 1], rows.tolist())
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if bool(done.any()):  # drop the finished rows
                keep = (~done).nonzero().flatten()
                keep_dev = keep.to(device)
                _select_rows(cache, keep_dev)
                mask, pos, nxt, seq = mask[keep_dev], pos[keep_dev], nxt[keep_dev], seq[keep_dev]
                rows, rows_dev = rows[keep], rows_dev[keep_dev]
            cur = nxt[:, None]
            if user_procs:
                seq = torch.cat([seq, cur], dim=1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            pos = pos[:, -1:] + 1
    return _generations(tokenizer, crit, tokens[:, :steps], steps, cut), steps, row_steps


def generate_detailed(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    stop_on_answer: bool = True,
    cut: bool = True,
    progress: bool = True,
    desc: str = "generate",
    generation_kwargs: dict[str, Any] | None = None,
    engine: Engine = "compact",
) -> GenerationRun:
    """:func:`generate` with token counts, finish reasons and timing (see :class:`GenerationRun`).

    ``cut``: cut each text right after its first complete ``#### n`` (default; :func:`cut_at_answer`).
    ``engine``: ``"compact"`` (default) runs :func:`_run_batch_compact`, a decode loop that drops finished rows
    from the batch; ``"hf"`` runs ``model.generate``, where finished rows stay (padded) until the batch's slowest
    row ends. Greedy outputs are the same. Sampled outputs differ between the engines (each is deterministic for
    a seed): ``hf`` samples from the global RNG under ``torch.manual_seed(seed + b)``, ``compact`` from its own
    generator seeded with ``seed + b``. A model the compact loop cannot run (encoder-decoder, no
    ``position_ids`` / cache argument, cache layers without row selection) falls back to ``hf`` with a warning;
    ``settings["engine"]`` records the engine used.
    ``generation_kwargs``: extra ``model.generate`` arguments (e.g. ``logits_processor``); the compact engine takes
    ``logits_processor`` only. With ``temperature == 0`` the ``samples`` outputs of a prompt are one greedy
    generation repeated.
    """
    _check_decoding(samples, temperature, top_p, max_new_tokens, batch_size, engine)
    from tqdm.auto import tqdm

    generation_kwargs = dict(generation_kwargs or {})
    if engine == "compact":
        extra = sorted(set(generation_kwargs) - {"logits_processor"})
        if extra:
            raise ValueError(f"engine='compact' takes only logits_processor in generation_kwargs, got {extra}")
        reason = _compact_unsupported(model)
        if reason is not None:
            import warnings

            warnings.warn(f"engine='compact' cannot run this model ({reason}); using model.generate", stacklevel=2)
            engine = "hf"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    gen_config = _generation_config(temperature, top_p, max_new_tokens, eos_ids, pad_id)
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    draws = samples if temperature > 0 else 1
    jobs = [(p, s) for p in range(len(ids)) for s in range(draws)]
    order = sorted(range(len(jobs)), key=lambda j: -len(ids[jobs[j][0]]))  # longest first; stable
    results: dict[tuple[int, int], Generation] = {}
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    steps = row_steps = batches = tokens = 0
    try:
        with tqdm(total=len(jobs), desc=desc, unit="seq", disable=not progress, leave=False) as bar:
            for b, start in enumerate(range(0, len(order), batch_size)):
                chunk = [jobs[j] for j in order[start : start + batch_size]]
                seqs = [ids[p] for p, _ in chunk]
                common = {"eos_ids": eos_ids, "pad_id": pad_id, "seed": seed + b, "stop_on_answer": stop_on_answer}
                with torch.inference_mode():
                    if engine == "compact":
                        gens, n_steps, n_rows = _run_batch_compact(
                            model,
                            tokenizer,
                            seqs,
                            temperature=temperature,
                            top_p=top_p,
                            max_new_tokens=max_new_tokens,
                            cut=cut,
                            logits_processor=generation_kwargs.get("logits_processor"),
                            **common,
                        )
                    else:
                        gens, n_steps, n_rows = _run_batch(
                            model,
                            tokenizer,
                            seqs,
                            gen_config=gen_config,
                            cut=cut,
                            generation_kwargs=dict(generation_kwargs),
                            **common,
                        )
                results.update(zip(chunk, gens, strict=True))
                steps, row_steps = steps + n_steps, row_steps + n_rows
                batches, tokens = batches + 1, tokens + sum(g.n_tokens for g in gens)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        model.train(was_training)
    outputs = [[results[(p, s if temperature > 0 else 0)] for s in range(samples)] for p in range(len(ids))]
    settings = {
        "samples": samples,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else None,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "stop_on_answer": stop_on_answer,
        "engine": engine,
    }
    return GenerationRun(outputs, time.perf_counter() - t0, batches, steps, row_steps, settings)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    stop_on_answer: bool = True,
    progress: bool = True,
    engine: Engine = "compact",
) -> list[list[str]]:
    """Generate ``samples`` completions for each rendered prompt (see :func:`build_prompt`); ``out[i][j]`` is sample
    ``j`` of prompt ``i``, decoded from the new tokens only (special tokens skipped) and cut right after the first
    complete ``#### n``.

    Greedy when ``temperature == 0`` (the samples are then one generation repeated), else sampling with
    ``temperature`` / ``top_p``. Batches of ``batch_size`` sequences (prompt × sample), left padded, prompts sorted by
    length; batch ``b`` runs under ``torch.manual_seed(seed + b)`` in a forked RNG, so the output is a function of
    the inputs, ``batch_size`` and ``seed``. ``stop_on_answer``: finish a row at its complete ``#### n`` (else only
    at eos / ``max_new_tokens``). ``progress``: a tqdm bar. ``engine``: ``"compact"`` (a decode loop that drops
    finished rows) or ``"hf"`` (``model.generate``); see :func:`generate_detailed`.
    """
    run = generate_detailed(
        model,
        tokenizer,
        prompts,
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        stop_on_answer=stop_on_answer,
        progress=progress,
        engine=engine,
    )
    return [[g.text for g in outs] for outs in run.outputs]


# ------------------------------------------------------------------------------------------------------ metrics


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its normal-approximation interval ``mean ± z·s/√n`` (``s``: sample standard
    deviation with ``n − 1``; ``z``: the two-sided normal quantile, 1.959964 for 95%). Not clipped.
    ``n == 0``: all NaN; ``n == 1``: NaN bounds."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return mean_interval(values, lambda n: z)


def mean_interval(values: Iterable[float], quantile: Callable[[int], float]) -> tuple[float, float, float]:
    """``(mean, mean − half, mean + half)`` with ``half = quantile(n)·s/√n`` (``s``: sample standard deviation with
    ``n − 1``); ``n == 0``: all NaN; ``n == 1``: NaN bounds. Shared by the normal and the t intervals."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = math.fsum(vals) / n
    if n == 1:
        return m, math.nan, math.nan
    s = math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (n - 1))
    half = quantile(n) * s / math.sqrt(n)
    return m, m - half, m + half


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """Proportion ``successes / n`` and its Wilson score interval (all NaN when ``n == 0``)."""
    if n == 0:
        return math.nan, math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return p, lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 − C(n − c, k) / C(n, k)`` (k ≤ n)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _metric(values: Sequence[float], confidence: float) -> dict[str, Any]:
    """Mean of per-problem values with a 95% interval: Wilson when all are 0/1, else normal clipped to [0, 1]."""
    vals = [float(v) for v in values]
    if all(v in (0.0, 1.0) for v in vals):
        m, lo, hi = wilson_ci(int(sum(vals)), len(vals), confidence)
        method = "wilson"
    else:
        m, lo, hi = mean_ci(vals, confidence)
        lo, hi, method = max(0.0, lo), min(1.0, hi), "normal"
    return {"value": _num(m), "lo": _num(lo), "hi": _num(hi), "n": len(vals), "ci": method}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def generation_metrics(
    correct: Sequence[Sequence[bool]],
    greedy_correct: Sequence[bool] | None = None,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Metrics from per-problem correctness: ``correct[i]`` = the k sample results of problem ``i`` (same k for
    all), ``greedy_correct[i]`` = its greedy result. Keys: ``average@k``, ``pass@k``, ``pass@j`` (unbiased, j = 1,
    2, 4, … < k, only for k > 1) and ``greedy``; each ``{value, lo, hi, n, ci}`` (see the module docstring)."""
    out: dict[str, dict[str, Any]] = {}
    if correct:
        ks = {len(c) for c in correct}
        if len(ks) != 1 or 0 in ks:
            raise ValueError(f"every problem needs the same number k >= 1 of samples, got {sorted(ks)}")
        k = ks.pop()
        out[f"average@{k}"] = _metric([sum(map(bool, c)) / k for c in correct], confidence)
        out[f"pass@{k}"] = _metric([float(any(c)) for c in correct], confidence)
        j = 1
        while j < k:
            out[f"pass@{j}"] = _metric([pass_at_k(k, sum(map(bool, c)), j) for c in correct], confidence)
            j *= 2
    if greedy_correct is not None:
        out["greedy"] = _metric([float(bool(c)) for c in greedy_correct], confidence)
    return out


# ----------------------------------------------------------------------------------------------------- file I/O


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _set_label(name: str) -> str:
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


# ------------------------------------------------------------------------------------------ generative sets


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


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    dataset_name_or_path: str,
    *,
    size: int | str | None = None,
    seed: int = 0,
    data_seed: int | None = None,
    samples: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    greedy: bool = True,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    stop_on_answer: bool = True,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    confidence: float = 0.95,
    progress: bool = True,
    engine: Engine = "compact",
    prompt: str = "gsm",
) -> dict[str, Any]:
    """Generate answers for a GSM-style set and score them; returns the summary dict (also written to ``out_dir``).

    ``dataset_name_or_path``: a name of :data:`~targetsft.data.eval_sets.EVAL_SETS` or a ``.jsonl`` file with
    ``question``/``answer``; ``size`` / ``data_seed`` go to :func:`~targetsft.data.eval_sets.load_eval_set`
    (``data_seed`` = the first seed of a generated set, or a random subset of a fixed one; None = the defaults).
    ``seed``: the sampling seed (:func:`generate`). ``samples`` = k samples per problem at ``temperature``
    (None: 0 = greedy when ``samples == 1``, else 1.0; ``samples > 1`` with temperature 0 is an error).
    ``greedy``: also report greedy accuracy, with its own greedy pass when the samples are not greedy.
    ``engine``: the decode loop, see :func:`generate_detailed`. ``prompt``: ``"gsm"`` (``#### <number>``; stops at
    a complete answer with ``stop_on_answer``) or ``"boxed"`` (MATH-style: the answer is the last ``\\boxed{}``,
    compared with ``math_verify``; generation runs to eos, never cut).

    ``out_dir``: write ``<set>.generations.jsonl`` (one line per problem: id, question, gold, samples: [{text,
    extracted, correct, n_tokens, finish_reason}], greedy: {...} or null) and ``<set>.summary.json`` (set, n,
    metrics with intervals, model, decoding settings, seconds, tokens/s, output statistics), each written atomically.
    """
    from targetsft.data.eval_sets import load_eval_set

    if temperature is None:
        temperature = 0.0 if samples == 1 else 1.0
    if samples > 1 and temperature == 0:
        raise ValueError("samples > 1 with temperature 0 would give k identical greedy samples; set temperature > 0")
    rows = load_eval_set(dataset_name_or_path, size, data_seed)
    prompts = build_prompts(tokenizer, [r["question"] for r in rows], prompt)
    boxed = prompt == "boxed"
    common = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "stop_on_answer": stop_on_answer and not boxed,
        "cut": not boxed,
        "progress": progress,
        "engine": engine,
    }
    label = _set_label(dataset_name_or_path)
    t0 = time.perf_counter()
    run = generate_detailed(
        model, tokenizer, prompts, samples=samples, temperature=temperature, top_p=top_p, desc=label, **common
    )
    greedy_run = None
    if greedy and temperature > 0:
        greedy_run = generate_detailed(
            model, tokenizer, prompts, samples=1, temperature=0.0, desc=f"{label} greedy", **common
        )
    seconds = time.perf_counter() - t0

    records = _problem_records(rows, run, (greedy_run or run) if greedy else None, prompt)
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
        "k": samples,
        "metrics": metrics,
        "confidence": confidence,
        "model": model_name or _model_name(model),
        "data": {"size": size, "data_seed": data_seed},
        "decoding": {
            "samples": samples,
            "temperature": temperature,
            "top_p": top_p if temperature > 0 else None,
            "top_k": None,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "seed": seed,
            "stop_on_answer": common["stop_on_answer"],
            "engine": run.settings.get("engine", engine),
            "greedy_pass": greedy_run is not None,
            "prompt": "chat template, add_generation_prompt=True, user message = "
            + ("gsm_user_message(question)" if not boxed else "question + BOXED_INSTRUCTION"),
        },
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


# ------------------------------------------------------------------------------------------- multiple choice


def mc_context(question: str) -> str:
    """The multiple-choice context: ``"Question: {question}\\nAnswer:"``; each choice is scored as ``" " + choice``."""
    return f"Question: {question.strip()}\nAnswer:"


def score_continuations(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "score",
) -> list[tuple[float, int]]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens)`` for each ``(context,
    continuation)``. Context and continuation are tokenized separately without special tokens and concatenated;
    batches of ``batch_size`` sequences sorted by length, right padded; one forward pass per batch."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ctx = tokenizer([c for c, _ in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    cont = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    for i, (c, k) in enumerate(zip(ctx, cont, strict=True)):
        if not c or not k:
            raise ValueError(f"pair {i}: context and continuation must both be non-empty after tokenization")
    seqs = [list(c) + list(k) for c, k in zip(ctx, cont, strict=True)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _model_device(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(seqs), desc=desc, disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, : len(seqs[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for r, i in enumerate(idx):
                    c, n = len(ctx[i]), len(cont[i])
                    lp = torch.log_softmax(logits[r, c - 1 : c + n - 1].float(), dim=-1)
                    tgt = torch.tensor(cont[i], device=lp.device)
                    out[i] = (float(lp.gather(-1, tgt[:, None]).sum()), n)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


def evaluate_multiple_choice(
    model: Any,
    tokenizer: Any,
    set_name: str,
    *,
    size: int | str | None = None,
    data_seed: int | None = None,
    batch_size: int = 16,
    normalize: Literal["mean", "sum"] = "mean",
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    confidence: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Log-likelihood multiple-choice accuracy on a set of :data:`~targetsft.data.eval_sets.MC_SETS` (or a
    ``.jsonl`` with question/choices/answer_index); no generation.

    Each choice is scored as the continuation ``" " + choice`` of :func:`mc_context` (see the module docstring).
    ``normalize``: predict by the mean log-prob per continuation token (``"mean"``, default) or by the sum
    (``"sum"``). The summary has ``metrics.accuracy`` (by ``normalize``), ``accuracy_mean`` and ``accuracy_sum``,
    each with a Wilson interval. ``out_dir``: also ``<set>.mc.jsonl`` (per item: id, answer_index, pred_mean,
    pred_sum, logprob_sum, n_tokens per choice) and ``<set>.summary.json``, written atomically.
    """
    from targetsft.data.eval_sets import load_mc_set

    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    items = load_mc_set(set_name, size, data_seed)
    pairs = [(mc_context(it["question"]), " " + str(ch).strip()) for it in items for ch in it["choices"]]
    t0 = time.perf_counter()
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, progress=progress, desc=set_name)
    seconds = time.perf_counter() - t0
    records, pos = [], 0
    for it in items:
        sc = scores[pos : pos + len(it["choices"])]
        pos += len(it["choices"])
        sums = [s for s, _ in sc]
        means = [s / n for s, n in sc]
        records.append(
            {
                "id": it["id"],
                "answer_index": it["answer_index"],
                "pred_mean": max(range(len(means)), key=means.__getitem__),
                "pred_sum": max(range(len(sums)), key=sums.__getitem__),
                "logprob_sum": sums,
                "n_tokens": [n for _, n in sc],
            }
        )
    acc_mean = _metric([float(r["pred_mean"] == r["answer_index"]) for r in records], confidence)
    acc_sum = _metric([float(r["pred_sum"] == r["answer_index"]) for r in records], confidence)
    summary: dict[str, Any] = {
        "set": set_name,
        "kind": "multiple_choice",
        "n": len(items),
        "metrics": {
            "accuracy": acc_mean if normalize == "mean" else acc_sum,
            "accuracy_mean": acc_mean,
            "accuracy_sum": acc_sum,
        },
        "normalize": normalize,
        "confidence": confidence,
        "format": {"context": "Question: {question}\\nAnswer:", "continuation": " {choice}"},
        "model": model_name or _model_name(model),
        "data": {"size": size, "data_seed": data_seed},
        "batch_size": batch_size,
        "seconds": seconds,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_dir is not None:
        _write_outputs(out_dir, _set_label(set_name), "mc.jsonl", _jsonl(records), summary)
    return summary


# ------------------------------------------------------------------------------------------------- all sets


def _set_kind(name: str) -> Literal["generation", "multiple_choice"]:
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
            rows.append((_set_label(r["set"]), name, _fmt_metric(m), str(r["n"]), f"{r['seconds']:.0f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate(
    model_path: str | os.PathLike | None,
    sets: Sequence[str],
    *,
    size: int | str | None = None,
    data_seed: int | None = None,
    samples: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    greedy: bool = True,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    stop_on_answer: bool = True,
    engine: Engine = "compact",
    prompt: str = "gsm",
    mc_batch_size: int = 16,
    mc_normalize: Literal["mean", "sum"] = "mean",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    precision: str = "auto",
    device: str | None = None,
    progress: bool = True,
    print_table: bool = True,
) -> dict[str, Any]:
    """Load a model (``None``/``"default"`` = the embedded SmolLM2-135M-Instruct) and evaluate it on ``sets``
    (generation sets via :func:`evaluate_generation`, multiple-choice sets via :func:`evaluate_multiple_choice`).

    Returns ``{"model", "results": [summary per set], "table"}``; prints the table when ``print_table``. With
    ``out_dir``, each set writes its files there (see the two functions) plus an overall ``summary.json``.
    ``precision``: the weights' dtype, by :func:`targetsft.precision.resolve_precision` (``auto``: bf16 where the
    device runs it natively, else float32; ``bfloat16``/``float32`` spellings are accepted); recorded in the
    summary with the machine's :func:`~targetsft.precision.environment`.
    """
    from targetsft.models import load_model, load_tokenizer, resolve_model

    kinds = {s: _set_kind(s) for s in sets}  # fail on a bad name before loading the model
    path = resolve_model(model_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_precision(precision, dev)
    model = load_model(path, dtype=resolved.dtype).to(dev)
    tokenizer = load_tokenizer(path, padding_side="left")
    results = []
    for s in sets:
        if kinds[s] == "generation":
            res = evaluate_generation(
                model,
                tokenizer,
                s,
                size=size,
                seed=seed,
                data_seed=data_seed,
                samples=samples,
                temperature=temperature,
                top_p=top_p,
                greedy=greedy,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                stop_on_answer=stop_on_answer,
                out_dir=out_dir,
                model_name=path,
                progress=progress,
                engine=engine,
                prompt=prompt,
            )
        else:
            res = evaluate_multiple_choice(
                model,
                tokenizer,
                s,
                size=size,
                data_seed=data_seed,
                batch_size=mc_batch_size,
                normalize=mc_normalize,
                out_dir=out_dir,
                model_name=path,
                progress=progress,
            )
        results.append(res)
        if print_table and progress:
            print(format_table([res]), file=sys.stderr)
    table = format_table(results)
    dtype = str(resolved.dtype).removeprefix("torch.")
    report = {"model": path, "dtype": dtype, "device": str(dev), "environment": environment(resolved)}
    report.update(results=results, table=table)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "summary.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if print_table:
        print(table)
    return report


# ------------------------------------------------------------------------------------------------------- CLI


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
        help="decode loop: 'compact' drops finished rows from the batch (default), 'hf' runs model.generate",
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
    from targetsft.preflight import check_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        check_model(args.model)
        evaluate(
            args.model,
            args.data,
            size=args.size,
            data_seed=args.data_seed,
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            greedy=args.greedy,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            stop_on_answer=args.stop_on_answer,
            engine=getattr(args, "engine", "compact"),
            prompt=getattr(args, "prompt", "gsm"),
            mc_batch_size=args.mc_batch_size,
            mc_normalize=args.mc_normalize,
            seed=args.seed,
            out_dir=args.out,
            precision=args.precision,
            device=args.device,
            progress=args.progress,
        )
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"target-sft eval: error: {e}", file=sys.stderr)
        return 2
    return 0
