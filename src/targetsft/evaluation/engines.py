"""Batched generation with early stop: two engines, the same greedy outputs.

Generative sets (:data:`targetsft.data.eval_sets.EVAL_SETS` or a ``.jsonl`` file with ``question``/``answer``)
* **Prompt** (:func:`build_prompt`): the tokenizer's chat template with ``add_generation_prompt=True`` on one user
  message, :func:`targetsft.data.gsm.gsm_user_message` (question + the ``#### <number>`` instruction): exactly the
  prompt that training (:mod:`targetsft.data.sft`) puts before the completion. The rendered prompt is tokenized with
  ``add_special_tokens=False`` (the template already holds the special tokens), as in training.
* **Generation** (:func:`generate`): prompts sorted by length into batches (longest first), left padded, KV
  cache; results put back in the input order. Greedy when ``temperature == 0``, else sampling with ``temperature``
  and ``top_p`` (``top_k`` disabled; the model's own generation defaults are not used). Two engines over a
  transformers model, and vLLM (``vllm``: ``model`` is a :class:`~targetsft.runtime.vllm_engine.VLLMEngine`; it
  batches all prompts itself and stops at eos only, the answer stop is replayed on its tokens: :func:`_run_vllm`):

  - ``compact`` (default, :func:`_run_batch_compact`, :mod:`~targetsft.evaluation.compact_loop`): a decode loop over
    the model's forward with a ``DynamicCache`` that **drops finished rows from the batch** (cache, attention mask,
    positions), so a row that loops to ``max_new_tokens`` costs its own row only, not the whole batch's. Sampling
    draws one uniform per (row, step) from a ``torch.Generator`` seeded with ``seed + batch_index``.
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
* **Answers**: :func:`targetsft.evaluation.answers.extract_answer` / :func:`targetsft.evaluation.answers.is_correct`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from targetsft.evaluation.compact_loop import (
    _check_selectable,  # noqa: F401  re-exported
    _compact_decode,
    _compact_processors,
    _compact_unsupported,
    _fork_devices,
    _sample_rows,  # noqa: F401  re-exported
    forward_params,  # noqa: F401  re-exported
)
from targetsft.evaluation.prompts import AnswerStoppingCriteria, FinishReason, cut_at_answer
from targetsft.runtime.vllm_engine import is_vllm

Engine = Literal["compact", "hf", "vllm", "auto"]


ENGINES: tuple[str, ...] = ("compact", "hf", "vllm", "auto")


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


def resolve_engine(engine: str, model: Any) -> str:
    """The engine that runs ``model``: ``auto`` is ``vllm`` for a :class:`~targetsft.runtime.vllm_engine.VLLMEngine`,
    else ``compact``; ``vllm`` needs a VLLMEngine and the others a transformers model."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    vllm = is_vllm(model)
    if engine == "auto":
        return "vllm" if vllm else "compact"
    if vllm != (engine == "vllm"):
        raise TypeError(
            "engine='vllm' needs a targetsft.runtime.vllm_engine.VLLMEngine (built on a model folder; evaluate() and "
            "the experiment harness build it)"
            if engine == "vllm"
            else f"engine={engine!r} runs a transformers model, not a VLLMEngine (use engine='vllm' or 'auto')"
        )
    return engine


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


def model_device(model: Any) -> torch.device:
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
    device = model_device(model)
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
    device = model_device(model)
    input_ids, mask = _left_pad(seqs, pad_id, device)
    b, width = input_ids.shape
    crit = AnswerStoppingCriteria(tokenizer, width, eos_token_ids=eos_ids, stop_on_answer=stop_on_answer, batch_size=b)
    user_procs, procs = _compact_processors(logits_processor, temperature, top_p)
    tokens, steps, row_steps = _compact_decode(
        model,
        input_ids,
        mask,
        crit,
        procs,
        grow_seq=bool(user_procs),
        device=device,
        seed=seed,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
    )
    return _generations(tokenizer, crit, tokens[:, :steps], steps, cut), steps, row_steps


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """The vLLM engine's seed of sample ``sample`` of prompt ``prompt`` (a function of the three only, so a draw
    does not depend on what else is in the engine's batch)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt, sample]).generate_state(1)[0])


def _run_vllm(
    engine: Any,
    tokenizer: Any,
    seqs: list[list[int]],
    seeds: list[int],
    *,
    eos_ids: list[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_on_answer: bool,
    cut: bool,
) -> tuple[list[Generation], int, int]:
    """All prompts through :meth:`VLLMEngine.generate` (vLLM batches them itself); returns the generations, the
    longest continuation vLLM generated and the tokens it generated in all.

    vLLM stops at eos only; the answer stop is replayed afterwards over each continuation's tokens by the same
    :class:`AnswerStoppingCriteria` the other engines run, so a row's tokens, ``n_tokens`` and finish reason are
    those the compact loop records for the same tokens (the tokens vLLM generated after the answer are dropped)."""
    done = engine.generate(
        seqs, seeds, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, eos_ids=eos_ids
    )
    steps = max((len(c.token_ids) for c in done), default=0)
    new = torch.full((len(done), steps), pad_id, dtype=torch.long)
    for i, c in enumerate(done):
        new[i, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
    crit = AnswerStoppingCriteria(
        tokenizer, 0, eos_token_ids=eos_ids, stop_on_answer=stop_on_answer, batch_size=len(done)
    )
    lengths = torch.tensor([len(c.token_ids) for c in done], dtype=torch.long)
    for step in range(steps):
        assert crit.done is not None
        rows = ((~crit.done) & (lengths > step)).nonzero().flatten()
        if rows.numel() == 0:
            break
        crit.update(new[rows, : step + 1], rows.tolist())
    for row, n in enumerate(lengths.tolist()):  # rows that ran to max_new_tokens: their own length
        if crit.n_tokens[row] is None:
            crit.n_tokens[row] = n
    return _generations(tokenizer, crit, new, steps, cut), steps, int(lengths.sum())


def _usable_engine(engine: str, model: Any, generation_kwargs: dict[str, Any]) -> str:
    """``engine`` once ``generation_kwargs`` are checked against it; ``hf`` (with a warning) for a model the compact
    loop cannot run."""
    if engine == "vllm" and generation_kwargs:
        raise ValueError(f"engine='vllm' takes no generation_kwargs, got {sorted(generation_kwargs)}")
    if engine == "compact":
        extra = sorted(set(generation_kwargs) - {"logits_processor"})
        if extra:
            raise ValueError(f"engine='compact' takes only logits_processor in generation_kwargs, got {extra}")
        reason = _compact_unsupported(model)
        if reason is not None:
            import warnings

            warnings.warn(f"engine='compact' cannot run this model ({reason}); using model.generate", stacklevel=3)
            return "hf"
    return engine


_BatchRunner = Callable[[list[list[int]], int], tuple[list[Generation], int, int]]


def _batch_runner(
    model: Any,
    tokenizer: Any,
    engine: str,
    generation_kwargs: dict[str, Any],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    stop_on_answer: bool,
    cut: bool,
) -> _BatchRunner:
    """A function of a batch of token-id prompts and its seed that runs it on ``engine`` (``compact`` or ``hf``)."""
    common = {"eos_ids": eos_ids, "pad_id": pad_id, "stop_on_answer": stop_on_answer, "cut": cut}
    if engine == "compact":
        procs = generation_kwargs.get("logits_processor")
        return lambda seqs, seed: _run_batch_compact(
            model,
            tokenizer,
            seqs,
            seed=seed,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            logits_processor=procs,
            **common,
        )
    gen_config = _generation_config(temperature, top_p, max_new_tokens, eos_ids, pad_id)
    return lambda seqs, seed: _run_batch(
        model, tokenizer, seqs, gen_config=gen_config, seed=seed, generation_kwargs=dict(generation_kwargs), **common
    )


def _plan_jobs(ids: list[list[int]], draws: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The (prompt, sample) jobs in input order, and the order they run in: longest prompt first, ties in input
    order."""
    jobs = [(p, s) for p in range(len(ids)) for s in range(draws)]
    return jobs, sorted(range(len(jobs)), key=lambda j: -len(ids[jobs[j][0]]))


def _generate_batches(
    model: Any,
    run_batch: _BatchRunner,
    ids: list[list[int]],
    jobs: list[tuple[int, int]],
    order: list[int],
    *,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool,
    t0: float,
) -> tuple[dict[tuple[int, int], Generation], int, int, int]:
    """The jobs in ``order``, ``batch_size`` at a time (batch ``b`` with seed ``seed + b``), the model in eval mode
    meanwhile; returns the generation of each job, the batches, the steps and the row-steps."""
    from tqdm.auto import tqdm

    results: dict[tuple[int, int], Generation] = {}
    steps = row_steps = batches = tokens = 0
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(jobs), desc=desc, unit="seq", disable=not progress, leave=False) as bar:
            for b, start in enumerate(range(0, len(order), batch_size)):
                chunk = [jobs[j] for j in order[start : start + batch_size]]
                with torch.inference_mode():
                    gens, n_steps, n_rows = run_batch([ids[p] for p, _ in chunk], seed + b)
                results.update(zip(chunk, gens, strict=True))
                steps, row_steps = steps + n_steps, row_steps + n_rows
                batches, tokens = batches + 1, tokens + sum(g.n_tokens for g in gens)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        model.train(was_training)
    return results, batches, steps, row_steps


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
    engine: Engine = "auto",
) -> GenerationRun:
    """:func:`generate` with token counts, finish reasons and timing (see :class:`GenerationRun`).

    ``cut``: cut each text right after its first complete ``#### n`` (default; :func:`cut_at_answer`).
    ``engine``: ``"compact"`` runs :func:`_run_batch_compact`, a decode loop that drops finished rows
    from the batch; ``"hf"`` runs ``model.generate``, where finished rows stay (padded) until the batch's slowest
    row ends; ``"vllm"`` runs a :class:`~targetsft.runtime.vllm_engine.VLLMEngine` passed as ``model`` (all
    prompts at once, :func:`_run_vllm`); ``"auto"`` (default) is ``vllm`` for a VLLMEngine, else ``compact``.
    Greedy outputs are the same (up to floating-point ties). Sampled outputs differ between the engines (each is
    deterministic for a seed): ``hf`` samples from the global RNG under ``torch.manual_seed(seed + b)``,
    ``compact`` from its own generator seeded with ``seed + b``, ``vllm`` with one seed per request
    (:func:`request_seed`: a function of ``seed``, the prompt and the sample, not of the batch). A model the
    compact loop cannot run (encoder-decoder, no ``position_ids`` / cache argument, cache layers without row
    selection) falls back to ``hf`` with a warning; ``settings["engine"]`` records the engine used.
    ``generation_kwargs``: extra ``model.generate`` arguments (e.g. ``logits_processor``); the compact engine takes
    ``logits_processor`` only. With ``temperature == 0`` the ``samples`` outputs of a prompt are one greedy
    generation repeated.
    """
    _check_decoding(samples, temperature, top_p, max_new_tokens, batch_size, engine)
    engine = resolve_engine(engine, model)  # type: ignore[assignment]
    generation_kwargs = dict(generation_kwargs or {})
    engine = _usable_engine(engine, model, generation_kwargs)  # type: ignore[assignment]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decoding: dict[str, Any] = {
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "eos_ids": _eos_ids(model, tokenizer),
        "pad_id": pad_id,
        "stop_on_answer": stop_on_answer,
        "cut": cut,
    }
    run_batch = None if engine == "vllm" else _batch_runner(model, tokenizer, engine, generation_kwargs, **decoding)
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    jobs, order = _plan_jobs(ids, samples if temperature > 0 else 1)
    t0 = time.perf_counter()
    if run_batch is None:
        seqs, seeds = [ids[p] for p, _ in jobs], [request_seed(seed, p, s) for p, s in jobs]
        gens, steps, row_steps = _run_vllm(model, tokenizer, seqs, seeds, **decoding)
        results, batches = dict(zip(jobs, gens, strict=True)), 1
    else:
        results, batches, steps, row_steps = _generate_batches(
            model, run_batch, ids, jobs, order, batch_size=batch_size, seed=seed, desc=desc, progress=progress, t0=t0
        )
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


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], **options: Any) -> list[list[str]]:
    """Generate ``samples`` completions for each rendered prompt (see :func:`build_prompt`); ``out[i][j]`` is sample
    ``j`` of prompt ``i``, decoded from the new tokens only (special tokens skipped) and cut right after the first
    complete ``#### n``.

    Greedy when ``temperature == 0`` (the samples are then one generation repeated), else sampling with
    ``temperature`` / ``top_p``. Batches of ``batch_size`` sequences (prompt × sample), left padded, prompts sorted by
    length; batch ``b`` runs under ``torch.manual_seed(seed + b)`` in a forked RNG, so the output is a function of
    the inputs, ``batch_size`` and ``seed``. ``stop_on_answer``: finish a row at its complete ``#### n`` (else only
    at eos / ``max_new_tokens``). ``progress``: a tqdm bar. ``engine``: ``"compact"`` (a decode loop that drops
    finished rows), ``"hf"`` (``model.generate``), ``"vllm"`` (``model`` is a VLLMEngine) or ``"auto"``.
    ``options``: those of :func:`generate_detailed`, which this returns the texts of.
    """
    return [[g.text for g in outs] for outs in generate_detailed(model, tokenizer, prompts, **options).outputs]
