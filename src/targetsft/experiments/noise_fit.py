"""Did a run learn the wrong labels it was trained on? Its preference for the corrupted answers over the true ones.

A run trained with ``data.label_noise`` saw some solutions with a wrong answer
(:func:`targetsft.data.noise.corrupt_records`). For each of those training examples the corrupted and the clean
record are tokenized as in training; after their common token prefix ``c`` the model scores both tails:

    Δ = log p_θ(tail_wrong | c) − log p_θ(tail_true | c)

``Δ > 0``: the model prefers the wrong answer it was shown to the true one (it memorised the noise); ``σ(Δ)`` is
the wrong tail's share of the two. A run trained on clean data, scored on the examples a given noise level
corrupts (``--label-noise``), is the control: the same examples, learned with their true answers.

``target-sft noise-fit`` scores finished runs (and, with ``--base``, the model they started from, with
``--teacher`` the teacher they were trained against, on the same examples) into ``noise_fit.csv`` (one row per
model, run and noise level) and ``noise_fit.json`` (with every example's scores). Scores accumulate in the output
folder: a model already scored on a run is not scored again, and a model's scores are shared by the runs on the
same data (the base model, a common teacher), so runs can be added as they finish.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from targetsft.experiments.records import read_record
from targetsft.runtime.inputs import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "corrupted_pairs",
    "teacher_model",
    "tail_logprobs",
    "noise_fit_summary",
    "noise_fit",
]


def corrupted_pairs(cfg: Any, tokenizer: Any, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """``(pairs, skipped)``: the first ``limit`` corrupted training examples of ``cfg`` (a TrainConfig with
    ``data.label_noise > 0``), each ``{"index", "wrong", "true"}`` with both records tokenized as in training.
    Skipped: examples dropped, or truncated before their end (their answer is cut off)."""
    from targetsft.data.noise import corrupt_records
    from targetsft.data.sft import load_records, to_prompt_completion, tokenize_record

    if not cfg.data.label_noise:
        raise ValueError("the run was trained on clean data (data.label_noise = 0): it has no corrupted examples")
    records = load_records(cfg.data.train, size=cfg.data.size, seed=cfg.data.seed)
    noisy, chosen = corrupt_records(records, cfg.data.label_noise, cfg.data.noise_kind, cfg.data.seed)
    pairs: list[dict[str, Any]] = []
    skipped = 0
    for i in chosen[:limit]:
        wrong, true = (
            tokenize_record(tokenizer, r, cfg.data.max_length, overflow=cfg.data.overflow)
            for r in (noisy[i], to_prompt_completion(records[i], index=i))
        )
        if any(item is None or item["input_ids"][-1] != tokenizer.eos_token_id for item in (wrong, true)):
            skipped += 1
            continue
        pairs.append({"index": i, "wrong": wrong, "true": true})
    return pairs, skipped


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _tail_sum(inner: Any, last: Any, cache: tuple[str, Any], item: dict[str, Any], c: int) -> float:
    """Σ log p(labels[t] | tokens[:t]) over the supervised t ≥ c, continuing a forward pass over ``tokens[:c]``
    (``last``: its last logits; ``cache``: the forward keyword and the key/value cache it filled)."""
    import torch

    from targetsft.training.fused_forward import IGNORE_INDEX

    labels = torch.tensor(item["labels"][c:])
    if labels.numel() == 0:
        return 0.0
    logits = last
    if labels.numel() > 1:  # the tail's own tokens but the last predict its next ones
        key, past = cache[0], copy.deepcopy(cache[1])  # a forward pass extends the cache in place
        tail = torch.tensor([item["input_ids"][c:-1]], device=logits.device)
        logits = torch.cat([logits, inner(input_ids=tail, use_cache=True, **{key: past}).logits[0].float()])
    keep = (labels != IGNORE_INDEX).to(logits.device)
    logp = torch.log_softmax(logits[keep], -1).gather(-1, labels.to(logits.device)[keep][:, None])
    return float(logp.sum())


def _tail_logprobs_vllm(engine: Any, pairs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """:func:`tail_logprobs` from a VLLMEngine's prompt log-probs of the two whole sequences (its prefix cache
    shares the common prefix)."""
    from targetsft.training.fused_forward import IGNORE_INDEX

    items = [p[side] for p in pairs for side in ("wrong", "true")]
    rows = engine.prompt_logprobs([it["input_ids"] for it in items], 0)
    sums = []
    for n, (item, lp) in enumerate(zip(items, rows, strict=True)):
        pair = pairs[n // 2]
        c = _common_prefix(pair["wrong"]["input_ids"], pair["true"]["input_ids"])
        total = 0.0
        for t in range(max(c, 1), len(item["labels"])):
            label = item["labels"][t]
            if label == IGNORE_INDEX:
                continue
            if label != item["input_ids"][t]:
                raise ValueError(f"example {pair.get('index')}: label {t} is not its input token (labels unshifted)")
            total += lp[t - 1][2]
        sums.append(total)
    return [(sums[2 * i], sums[2 * i + 1]) for i in range(len(pairs))]


def tail_logprobs(model: Any, pairs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(log p_θ(tail_wrong | c), log p_θ(tail_true | c))`` per pair: the sums over the supervised tokens after
    the two sequences' common prefix ``c`` (one pass over the prefix, its cache reused for both tails; a
    :class:`~targetsft.runtime.vllm_engine.VLLMEngine`: its prompt log-probs of both sequences)."""
    import torch

    from targetsft.runtime.vllm_engine import is_vllm

    for pair in pairs:
        if _common_prefix(pair["wrong"]["input_ids"], pair["true"]["input_ids"]) == 0:
            raise ValueError(f"example {pair.get('index')}: the two sequences share no prefix")
    if is_vllm(model):
        return _tail_logprobs_vllm(model, pairs)
    from transformers import DynamicCache

    from targetsft.evaluation.engines import forward_params
    from targetsft.training.fused_forward import unwrap

    inner = unwrap(model)
    key = "cache" if "cache" in forward_params(inner) else "past_key_values"
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    out = []
    try:
        with torch.no_grad():
            for pair in pairs:
                wrong, true = pair["wrong"], pair["true"]
                c = _common_prefix(wrong["input_ids"], true["input_ids"])
                cache = (key, DynamicCache(config=inner.config))
                ids = torch.tensor([wrong["input_ids"][:c]], device=device)
                last = inner(input_ids=ids, use_cache=True, **{key: cache[1]}).logits[0, -1:].float()
                out.append((_tail_sum(inner, last, cache, wrong, c), _tail_sum(inner, last, cache, true, c)))
    finally:
        inner.train(was_training)
    return out


def noise_fit_summary(scores: Sequence[tuple[float, float]], confidence: float = 0.95) -> dict[str, float]:
    """Means over examples of ``log p(tail_wrong)``, ``log p(tail_true)``, ``Δ`` (with its normal interval),
    the fraction with ``Δ > 0`` and the mean ``σ(Δ)``."""
    from targetsft.evaluation.metrics import mean_ci

    deltas = [w - t for w, t in scores]
    n = len(deltas)
    mean, lo, hi = mean_ci(deltas, confidence)

    def avg(values: Sequence[float]) -> float:
        return math.fsum(values) / n if n else math.nan

    return {
        "n": n,
        "logp_wrong": avg([w for w, _ in scores]),
        "logp_true": avg([t for _, t in scores]),
        "delta": mean,
        "delta_lo": lo,
        "delta_hi": hi,
        "prefer_wrong": avg([float(d > 0) for d in deltas]),
        "wrong_share": avg([1 / (1 + math.exp(-d)) if d > -700 else 0.0 for d in deltas]),
    }


def teacher_model(cfg: Any) -> str:
    """The model a run's teacher scores came from: ``teacher.model``, where ``@<run id>`` (an experiment's
    reference to an earlier run) is that run's ``final`` model (or ``@<run id>@<step>``: its snapshot) beside the run's
    own folder."""
    from targetsft.experiments.grid import teacher_run_id, teacher_run_model_dir

    model = cfg.teacher.model
    if not model:
        raise InputError("--teacher: the run has no teacher model (none, or only a teacher.cache)")
    if cfg.teacher.prompt != "same":
        raise InputError(f"--teacher: the teacher saw another prompt ({cfg.teacher.prompt!r}) than is scored")
    ref = teacher_run_id(model)
    if ref is None:
        return model
    path = teacher_run_model_dir(Path(cfg.output_dir).parent / ref, model)
    if not path.is_dir():
        raise InputError(f"--teacher: the teacher run's model {path} is gone")
    return str(path)


def noise_fit(
    records: Sequence[str | Path],
    out: str | Path,
    *,
    label_noise: float | None = None,
    base: bool = False,
    teacher: bool = False,
    examples: int | None = None,
    engine: str = "transformers",
) -> list[dict[str, Any]]:
    """Score finished runs (their record folders, with ``run.json``) on their corrupted training examples into
    ``out``'s ``noise_fit.csv`` and ``noise_fit.json`` (added to: a model already scored on a run is not scored
    again); ``label_noise``: score on the examples this noise level corrupts (default: each run's own); ``base`` /
    ``teacher``: also the model each run started from / its teacher; ``examples``: the first N corrupted examples of
    a run (default all); ``engine``: ``transformers`` or ``vllm``. Returns the rows of ``noise_fit.csv``."""
    from targetsft.runtime.files import atomic_write_csv, atomic_write_text
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model
    from targetsft.runtime.vllm_engine import VLLMEngine
    from targetsft.training.config import config_from_dict

    if label_noise is not None and not 0 < label_noise <= 1:
        raise InputError(f"--label-noise must be in (0, 1], got {label_noise}")
    runs = []
    for folder in map(Path, records):
        if not (folder / "run.json").is_file():
            raise InputError(f"{folder} has no run.json (not a run record)")
        raw = read_record(folder / "run.json")
        cfg = config_from_dict(raw["config"])
        final = Path(cfg.output_dir) / "final"
        if not final.is_dir():
            raise InputError(f"run {raw['run']}: its model {final} is gone")
        if label_noise is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_noise=label_noise))
        runs.append((raw["run"], cfg, final))
    out = Path(out)
    state = _read_state(out / "noise_fit.json", examples)
    for run_id, cfg, final in runs:
        # each model as configured (not resolved: no machine's install path goes into the output)
        wanted = [(run_id, str(final))] + ([("base", cfg.model)] if base else [])
        wanted += [("teacher", teacher_model(cfg))] if teacher else []
        noise = cfg.data.label_noise
        todo = [(name, model) for name, model in wanted if f"{name}@{run_id}@{noise}" not in state["examples"]]
        if not todo:
            logger.info("%s: already scored in %s", run_id, out)
            continue
        tokenizer = load_tokenizer(resolve_model(cfg.model))
        pairs, skipped = corrupted_pairs(cfg, tokenizer, examples)
        for name, model in todo:
            # a model's scores are shared by every run on the same data (the same corrupted examples)
            source = json.dumps([model, cfg.model, dataclasses.asdict(cfg.data)], default=str)
            same = [k for k, v in state["data"].items() if v == source]
            if same:
                scores = [(e["logp_wrong"], e["logp_true"]) for e in state["examples"][same[0]]]
            elif engine == "vllm":
                with VLLMEngine(resolve_model(model)) as vllm:
                    scores = tail_logprobs(vllm, pairs)
            else:
                scores = tail_logprobs(load_model(resolve_model(model)), pairs)
            key = f"{name}@{run_id}@{noise}"
            row = {"model": name, "run": run_id, "label_noise": noise, "skipped": skipped}
            state["rows"] = [r for r in state["rows"] if f"{r['model']}@{r['run']}@{r['label_noise']}" != key]
            state["rows"].append(row | noise_fit_summary(scores))
            state["data"][key] = source
            state["examples"][key] = [
                {"index": p["index"], "logp_wrong": w, "logp_true": t} for p, (w, t) in zip(pairs, scores, strict=True)
            ]
            # written after every model: an interrupted call keeps what it scored
            atomic_write_text(out / "noise_fit.json", json.dumps(state, indent=1) + "\n")
            atomic_write_csv(out / "noise_fit.csv", state["rows"])
            r = state["rows"][-1]
            logger.info(
                f"{name} on {run_id}'s examples at label noise {noise}: n {r['n']}, Δ {r['delta']:+.2f} "
                f"[{r['delta_lo']:+.2f}, {r['delta_hi']:+.2f}], prefers the wrong answer on {r['prefer_wrong']:.1%}"
            )
    logger.info("wrote %s", out / "noise_fit.csv")
    return state["rows"]


def _read_state(path: Path, examples: int | None) -> dict[str, Any]:
    """What an earlier call wrote to ``path`` (kept and added to), or a new state; the ``--examples`` must match."""
    if not path.is_file():
        return {"examples_limit": examples, "rows": [], "data": {}, "examples": {}}
    state = json.loads(path.read_text())
    if state.get("examples_limit") != examples:
        raise InputError(
            f"{path} was written with --examples {state.get('examples_limit')}, not {examples}: "
            "use the same number or another --out"
        )
    return state
