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
* **Answers**: :func:`targetsft.evaluation.answers.extract_answer` / :func:`targetsft.evaluation.answers.is_correct`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

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


# Cache layers whose ``batch_select_indices`` keeps exactly the selected rows (quantized layers keep a second,
# quantized copy it does not touch; linear-attention / static / indexed layers have none or a different layout).
_SELECTABLE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def forward_params(model: Any) -> set[str]:
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
    params = forward_params(model)
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

    device = model_device(model)
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
    params = forward_params(model)
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
    from tqdm.auto import tqdm

    engine = resolve_engine(engine, model)  # type: ignore[assignment]
    generation_kwargs = dict(generation_kwargs or {})
    if engine == "vllm" and generation_kwargs:
        raise ValueError(f"engine='vllm' takes no generation_kwargs, got {sorted(generation_kwargs)}")
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
    gen_config = _generation_config(temperature, top_p, max_new_tokens, eos_ids, pad_id) if engine == "hf" else None
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    draws = samples if temperature > 0 else 1
    jobs = [(p, s) for p in range(len(ids)) for s in range(draws)]
    order = sorted(range(len(jobs)), key=lambda j: -len(ids[jobs[j][0]]))  # longest first; stable
    results: dict[tuple[int, int], Generation] = {}
    t0 = time.perf_counter()
    steps = row_steps = batches = tokens = 0
    if engine == "vllm":
        gens, steps, row_steps = _run_vllm(
            model,
            tokenizer,
            [ids[p] for p, _ in jobs],
            [request_seed(seed, p, s) for p, s in jobs],
            eos_ids=eos_ids,
            pad_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_on_answer=stop_on_answer,
            cut=cut,
        )
        results.update(zip(jobs, gens, strict=True))
        batches = 1
    else:
        was_training = model.training
        model.eval()
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
