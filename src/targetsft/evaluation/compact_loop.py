"""The compact engine's decode loop (``engine="compact"`` of :func:`targetsft.evaluation.engines.generate_detailed`):
a left-padded batch decoded over the model's forward with a ``DynamicCache``, the finished rows dropped from the
cache, the attention mask and the positions after each step."""

from __future__ import annotations

from typing import Any

import torch

from targetsft.evaluation.prompts import AnswerStoppingCriteria

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


def _compact_processors(logits_processor: Any, temperature: float, top_p: float) -> tuple[Any, Any]:
    """The caller's logits processors, and those followed by temperature and top-p (transformers' warpers, in
    ``generate``'s order) when sampling."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    user_procs = LogitsProcessorList(logits_processor or [])
    procs = LogitsProcessorList(user_procs)
    if temperature > 0:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(temperature)))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return user_procs, procs


def _compact_forward_kwargs(model: Any) -> tuple[Any, dict[str, Any]]:
    """A fresh cache, and the forward's arguments besides the inputs: the cache under the name the forward takes,
    ``logits_to_keep=1`` where it takes one."""
    params = forward_params(model)
    cache = _compact_cache(model)
    fwd: dict[str, Any] = {"use_cache": True, ("cache" if "cache" in params else "past_key_values"): cache}
    if "logits_to_keep" in params:
        fwd["logits_to_keep"] = 1
    return cache, fwd


def _compact_decode(
    model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    crit: AnswerStoppingCriteria,
    procs: Any,
    *,
    grow_seq: bool,
    device: torch.device,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    pad_id: int,
) -> tuple[torch.Tensor, int, int]:
    """Prefill and decode one left-padded batch, dropping finished rows after each step; returns the new tokens of
    every batch row (``pad_id`` after its end, CPU), the steps run and the row-steps."""
    cache, fwd = _compact_forward_kwargs(model)
    b = input_ids.shape[0]
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
            if grow_seq:
                seq = torch.cat([seq, cur], dim=1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            pos = pos[:, -1:] + 1
    return tokens, steps, row_steps
