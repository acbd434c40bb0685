"""Building a teacher cache: one teacher forward per batch, the top-k of every supervised token, a shard at a time
(resumable, atomic, at one precision).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from targetsft.runtime.files import atomic_write_bytes
from targetsft.runtime.precision import Precision, autocast, resolve_precision
from targetsft.runtime.vllm_engine import is_vllm
from targetsft.training.teacher_cache.storage import (
    _SHARD_GLOB,
    _TMP_PREFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    IGNORE_INDEX,
    MANIFEST_NAME,
    CacheMismatchError,
    _build_lock,
    _check_resume,
    _identity_diff,
    _now,
    _read_manifest,
    _remove,
    _scan_examples,
    _session_started,
    _shard_added,
    _teacher_input,
    _TeacherInput,
    _valid_prefix,
    _write_manifest,
    model_fingerprint,
    shard_name,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from targetsft.training.text_alignment import (
    AlignmentStats,
    TextAligner,
    TokenMap,
    log_softmax_at,
    map_in_chunks,
    map_topk_to_student,
    scatter_rows,
)
from targetsft.training.topk_rows import drop_unshared, round_down_fp16, stack_rows
from targetsft.training.vocabulary import VocabAlignment, align_vocabularies, id_to_token

logger = logging.getLogger(__name__)


_SOFTMAX_ELEMS = 1 << 24  # float32 elements per log_softmax chunk (64 MiB)


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.vocab_size)


def _model_device(model: Any) -> torch.device:
    if is_vllm(model):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _model_dtype(model: Any) -> str:
    if is_vllm(model):
        return model.dtype
    param = next(iter(model.parameters()), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "unknown"


def _accepts_logits_to_keep(model: Any) -> bool:
    if is_vllm(model):
        return False
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _topk_rows(logits: Tensor, k: int, temperature: float, shared: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-k of ``log_softmax(logits[:, :shared] / T)`` per row (:func:`log_softmax_at`): ids int32 and log-probs
    float32, on the
    CPU (columns past ``shared``, padding or tokens the student lacks, are dropped before the softmax)."""
    logits = logits[:, :shared]
    step = max(1, _SOFTMAX_ELEMS // max(1, logits.shape[-1]))
    ids, lps = [], []
    for s in range(0, logits.shape[0], step):
        v, i = log_softmax_at(logits[s : s + step], k, temperature)  # the order of the columns is moot
        ids.append(i.to(torch.int32).cpu())
        lps.append(v.float().clamp(max=0.0).cpu())
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(lps)


def _teacher_logits_rows(
    model: Any, batch: list[_TeacherInput], *, pad_id: int, device: torch.device, keep_ok: bool, vocab: int
) -> Tensor:
    """One right-padded forward; the logits rows ``[Σ n_i, V]`` at every example's positions, in batch order."""
    length = max(int(x.input_ids.size) for x in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, : x.input_ids.size] = torch.from_numpy(x.input_ids)
        mask[b, : x.input_ids.size] = 1
    keep = np.unique(np.concatenate([x.positions for x in batch]))
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if keep_ok and keep.size < length:
        kwargs["logits_to_keep"] = torch.from_numpy(keep).to(device)
    logits = model(**kwargs).logits
    if logits.shape[-1] != vocab:
        raise RuntimeError(f"the teacher returned {logits.shape[-1]} logits per token, expected {vocab}")
    if logits.shape[1] == length:
        cols = [x.positions for x in batch]
    elif logits.shape[1] == keep.size:
        cols = [np.searchsorted(keep, x.positions) for x in batch]
    else:
        raise RuntimeError(f"the teacher returned logits of shape {tuple(logits.shape)} for inputs of length {length}")
    b_idx = torch.from_numpy(np.concatenate([np.full(c.size, b) for b, c in enumerate(cols)])).to(logits.device)
    c_idx = torch.from_numpy(np.concatenate(cols)).to(logits.device)
    return logits[b_idx, c_idx]


def _teacher_topk_vllm(engine: Any, batch: list[_TeacherInput], k: int, shared: int) -> tuple[Tensor, Tensor]:
    """The top-k rows of every example's positions from vLLM's prompt log-probs (position ``p`` is the
    distribution of token ``p + 1``), in batch order: ids int32, log-probs float32 (temperature 1).

    vLLM ranks the teacher's whole vocabulary; an id at or past ``shared`` (padding, a token the student lacks)
    is replaced by a copy of the row's last kept entry at log-probability ``-inf`` (no mass; the student completes
    the tail), and the kept log-probabilities are divided by the mass of the shared tokens the row shows."""
    out = engine.prompt_logprobs([x.input_ids.tolist() for x in batch], k)
    rows = [rows[p] for x, rows in zip(batch, out, strict=True) for p in x.positions.tolist()]
    if not rows:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    lps = torch.tensor([r[1] for r in rows], dtype=torch.float32).clamp(max=0.0)
    return drop_unshared(ids, lps, shared)


@dataclass
class _RunSpec:
    model: Any
    k: int
    temperature: float
    batch_size: int
    pad_id: int
    device: torch.device
    keep_ok: bool
    vocab: int
    shared: int
    token_map: TokenMap | None = None  # a teacher read through the text: its rows go to the student's ids
    stats: AlignmentStats = field(default_factory=AlignmentStats)  # the shard's aligned rows and their mapped mass


def _text_rows(spec: _RunSpec, logits: Tensor, batch: list[_TeacherInput]) -> list[tuple[Tensor, Tensor]]:
    """Each example's rows of a teacher read through the text: its aligned rows mapped to the student's ids
    (:func:`~targetsft.training.text_alignment.map_in_chunks`), ``MISSING_ID`` rows where it has none; the shares
    go to ``spec.stats``."""
    step = max(1, _SOFTMAX_ELEMS // max(1, logits.shape[-1]))
    ids, lps, mass = map_in_chunks(
        lambda s, e: logits[s:e], len(logits), spec.token_map, spec.k, spec.temperature, step
    )
    spec.stats.add(torch.from_numpy(np.concatenate([x.rows for x in batch])), mass)
    sizes = [x.positions.size for x in batch]
    out = []
    for x, a, b in zip(batch, ids.cpu().split(sizes), lps.cpu().split(sizes)):
        full_ids, full_lps = scatter_rows(torch.from_numpy(x.rows), a, b)
        out.append((full_ids.to(torch.int32), full_lps.clamp(max=0.0)))
    return out


def _text_rows_vllm(spec: _RunSpec, batch: list[_TeacherInput]) -> list[tuple[Tensor, Tensor]]:
    """:func:`_text_rows` from vLLM's top-``k`` prompt log-probs (one token appended to each sequence, so that its
    last position's row comes back too), mapped to the student's ids by
    :func:`~targetsft.training.text_alignment.map_topk_to_student`; the mass is counted over those ``k``."""
    seqs = [[*x.input_ids.tolist(), int(x.input_ids[-1])] for x in batch]
    out = []
    for x, rows in zip(batch, spec.model.prompt_logprobs(seqs, spec.k), strict=True):
        picked = [rows[p] for p in x.positions.tolist()]  # rows[p]: the distribution after teacher position p
        ids, lps = stack_rows(picked, spec.k)
        a_ids, a_lps, mass = map_topk_to_student(ids, lps, spec.token_map, spec.k)
        spec.stats.add(torch.from_numpy(x.rows), mass)
        full_ids, full_lps = scatter_rows(torch.from_numpy(x.rows), a_ids, a_lps)
        out.append((full_ids.to(torch.int32), full_lps.clamp(max=0.0)))
    return out


def _compute_shard(
    spec: _RunSpec, examples: Sequence[Mapping[str, Any]], start: int, end: int, bar: Any
) -> dict[str, Tensor]:
    """The shard tensors (``ids``, ``logprobs``, ``offsets``) for examples ``[start, end)``.

    Examples are batched by decreasing teacher length (less padding); rows are put back in example order.
    """
    inputs = {i: _teacher_input(i, examples[i], spec.vocab) for i in range(start, end)}
    order = sorted((i for i in inputs if inputs[i].count), key=lambda i: -inputs[i].input_ids.size)
    rows: dict[int, tuple[Tensor, Tensor]] = {}
    for s in range(0, len(order), spec.batch_size):
        idx = order[s : s + spec.batch_size]
        batch = [inputs[i] for i in idx]
        if is_vllm(spec.model) and spec.token_map is not None:
            per_example = _text_rows_vllm(spec, batch)
        elif is_vllm(spec.model):
            per_example = _split(batch, *_teacher_topk_vllm(spec.model, batch, spec.k, spec.shared))
        else:
            logits = _teacher_logits_rows(
                spec.model, batch, pad_id=spec.pad_id, device=spec.device, keep_ok=spec.keep_ok, vocab=spec.vocab
            )
            if spec.token_map is not None:
                per_example = _text_rows(spec, logits, batch)
            else:
                per_example = _split(batch, *_topk_rows(logits, spec.k, spec.temperature, spec.shared))
        for i, (a, b) in zip(idx, per_example, strict=True):
            if bool(torch.isnan(b).any()):
                raise RuntimeError(f"the teacher produced NaN log-probs in example {i}")
            rows[i] = (a, b)
        bar.update(sum(x.count for x in batch))
    k = spec.k if spec.token_map is None else min(spec.k, spec.token_map.student_vocab)
    empty = (torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k))
    parts = [rows.get(i, empty) for i in range(start, end)]
    counts = torch.tensor([0] + [p[0].shape[0] for p in parts], dtype=torch.int64)
    return {
        "ids": torch.cat([p[0] for p in parts]).contiguous(),
        "logprobs": round_down_fp16(torch.cat([p[1] for p in parts])).contiguous(),
        "offsets": counts.cumsum(0),
    }


def _split(batch: list[_TeacherInput], ids: Tensor, lps: Tensor) -> list[tuple[Tensor, Tensor]]:
    """A batch's rows, in batch order, cut into each example's."""
    split = [x.positions.size for x in batch]
    return list(zip(ids.split(split), lps.split(split), strict=True))


def _alignment(tokenizer: Any, teacher_tokenizer: Any, rows: int) -> VocabAlignment:
    """The teacher's vocabulary against the student's tokenizer: checked when ``teacher_tokenizer`` is given; else
    the student's tokens are taken as the teacher's first ids (the caller vouches for the token → id map)."""
    tokens = len(id_to_token(tokenizer))
    if teacher_tokenizer is not None:
        return align_vocabularies(tokenizer, teacher_tokenizer, student_rows=tokens, other_rows=rows)
    if tokens > rows:
        raise ValueError(f"the student's tokenizer has {tokens:,} ids but the teacher only {rows:,} vocabulary rows")
    return VocabAlignment(shared=tokens, student_rows=tokens, other_rows=rows)


def _check_build_args(k: int, temperature: float, batch_size: int, shard_examples: int, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > vocab:
        raise ValueError(f"k={k} is larger than the teacher's vocabulary ({vocab} tokens)")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, v in (("batch_size", batch_size), ("shard_examples", shard_examples)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _checked_vocabulary(
    model: Any,
    tokenizer: Any,
    teacher_tokenizer: Any,
    aligner: TextAligner | None,
    k: int,
    temperature: float,
    batch_size: int,
    shard_examples: int,
) -> tuple[int, VocabAlignment, int]:
    """The teacher's vocabulary rows, its alignment with the student's tokenizer and the ids a row may hold (the
    shared ones); the build's arguments are checked against them."""
    vllm = is_vllm(model)
    vocab = _vocab_size(model)
    alignment = _alignment(tokenizer, teacher_tokenizer if aligner is None else None, vocab)
    shared = alignment.shared if aligner is None else aligner.token_map.student_vocab
    _check_build_args(k, temperature, batch_size, shard_examples, shared)
    if vllm and (temperature != 1.0 or k > model.max_logprobs):
        raise ValueError(
            "a vLLM teacher gives the top-k of log_softmax(logits) at temperature 1 for k <= "
            f"{model.max_logprobs} (its max_logprobs); got temperature={temperature}, k={k}: build this cache "
            "with the transformers teacher"
        )
    return vocab, alignment, shared


def _identity(
    model: Any,
    tokenizer: Any,
    aligner: TextAligner | None,
    teacher_name: str | None,
    vocab: int,
    shared: int,
    k: int,
    temperature: float,
    counts: list[int],
    dfp: str,
) -> dict[str, Any]:
    """The cache's identity: what a build must share with the cache in its folder to resume it."""
    name = teacher_name if teacher_name is not None else str(getattr(model.config, "_name_or_path", "") or "")
    identity = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "teacher_name": name,
        "teacher_config_hash": model_fingerprint(model),
        "teacher_weights_hash": weights_fingerprint(model),
        "teacher_dtype": _model_dtype(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "shared_vocab_size": shared,
        "k": k,
        "temperature": float(temperature),
        "dataset_fingerprint": dfp,
        "num_examples": len(counts),
        "total_tokens": int(sum(counts)),
        "ignore_index": IGNORE_INDEX,
    }
    if aligner is not None:  # only then, so that the identity of a cache of the student's own family is unchanged
        identity.update(align="text", teacher_tokenizer_fingerprint=tokenizer_fingerprint(aligner.teacher))
    return identity


def _prepare_folder(folder: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue from: the existing one (same identity, shards verified) or a fresh one."""
    old = _read_manifest(folder) if not overwrite else None
    if overwrite:
        _remove([folder / MANIFEST_NAME, *folder.glob(_SHARD_GLOB)])
    elif old is None and any(folder.glob(_SHARD_GLOB)):
        raise CacheMismatchError(
            f"{folder} holds shard files but no {MANIFEST_NAME}; pass overwrite=True to replace them"
        )
    if old is not None:
        diff = _identity_diff(old, identity)
        if diff:
            raise CacheMismatchError(
                f"{folder} holds a teacher cache for something else ({'; '.join(diff)}); "
                "use another folder or pass overwrite=True to replace it"
            )
        shards = _valid_prefix(folder, old)
        keep = {s["file"] for s in shards}
        _remove(p for p in folder.glob(_SHARD_GLOB) if p.name not in keep)  # orphans of an interrupted shard
        manifest = dict(old)
        manifest["shards"] = shards
        if shards:
            logger.info("teacher cache %s: resuming after example %d", folder, shards[-1]["end"])
        return manifest
    manifest = dict(identity)
    manifest.update(
        complete=False,
        storage={
            "ids": "int32",
            "logprobs": "float16 (rounded toward -inf)",
            "offsets": "int64",
            "bytes_per_token": identity["k"] * 6,
        },
        shards=[],
        build={"seconds": 0.0, "tokens": 0, "tokens_per_second": None, "sessions": 0, "started_at": _now()},
    )
    return manifest


def build_teacher_cache(
    teacher_model: Any,
    examples: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any,
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_examples: int = 256,
    teacher_name: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
    precision: str = "auto",
    teacher_tokenizer: Any = None,
    aligner: TextAligner | None = None,
) -> Path:
    """Run ``teacher_model`` over ``examples`` and store its top-k log-probs per supervised token in ``out_dir``.

    Args:
        teacher_model: a causal LM with a transformers config whose forward takes ``input_ids``/``attention_mask``
            and returns ``.logits``; run in eval mode under ``torch.no_grad`` (its mode is restored afterwards).
            Or a :class:`~targetsft.runtime.vllm_engine.VLLMEngine`: the rows are then vLLM's prompt log-probs
            (``temperature`` 1 only, ``k`` up to its ``max_logprobs``), the same rows up to float rounding; the
            manifest's ``build.engine`` records which, and a partial cache resumes only with the engine it began with.
        examples: indexable sequence (list, ``datasets.Dataset``) of dicts with ``input_ids`` and ``labels``
            (-100 = no loss, unshifted), optionally ``teacher_input_ids`` + ``teacher_labels`` (see the module doc).
        out_dir: cache folder (created). If it holds a cache with the same identity (teacher name, config and
            weights, tokenizer, dataset, ``k``, temperature, teacher dtype) the build resumes, or does nothing if
            complete; a teacher retrained in place has other weights, so its stale cache is refused. The weights are
            compared only where both builds know them (not a vLLM teacher's, not a cache built before they were
            recorded).
        tokenizer: the tokenizer of the examples, the student's (its fingerprint, pad id and number of tokens are
            used: ids at or past that number, the teacher's padding rows or tokens the student lacks, are never
            stored; the rest is renormalised).
        teacher_tokenizer: the teacher's, to check its token → id map against ``tokenizer``'s
            (:func:`~targetsft.training.vocabulary.align_vocabularies`; special tokens and chat template may differ)
            and record what differs in the manifest's ``teacher_vocabulary``.
        aligner: for a teacher of another tokenizer (``teacher.align: text``): the examples then carry the
            teacher's own ``teacher_input_ids`` and ``teacher_rows``
            (:meth:`~targetsft.training.text_alignment.TextAligner.example`), and the cache stores its rows on the
            student's ids (rows with no teacher boundary hold ids ``-1``), so training from it costs what a cache of
            the student's own family costs. Both tokenizers are part of the identity; the manifest's ``alignment``
            records the token map and the aligned shares.
        k: tokens kept per position (≤ vocabulary size).
        temperature: the cached rows are ``log_softmax(logits / temperature)``; the loss uses them as they are.
        batch_size: examples per teacher forward (right-padded, attention mask).
        shard_examples: examples per shard file (the unit of resume and of checksum verification).
        teacher_name: recorded name of the teacher (default ``config._name_or_path``); part of the identity.
        device: move the teacher there first (default: leave it where it is and feed inputs to its device).
        progress: show a tqdm bar in tokens (with tokens/s).
        overwrite: replace a cache built for something else instead of raising :class:`CacheMismatchError`.
        precision: autocast of the teacher's forward (:func:`targetsft.runtime.precision.resolve_precision` on its
            device; the weights keep their dtype); recorded in the manifest's ``build``. A partial cache resumes only
            at the precision its first shards were built at (a build without the record was float32).

    Returns:
        ``Path(out_dir)``.
    """
    if device is not None and not is_vllm(teacher_model):
        teacher_model.to(device)
    vocab, alignment, shared = _checked_vocabulary(
        teacher_model, tokenizer, teacher_tokenizer, aligner, k, temperature, batch_size, shard_examples
    )
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    counts, dfp = _scan_examples(examples, vocab)
    identity = _identity(teacher_model, tokenizer, aligner, teacher_name, vocab, shared, k, temperature, counts, dfp)
    with _build_lock(folder):
        _remove(folder.glob(_TMP_PREFIX + "*"))  # temp files of a killed build
        manifest = _prepare_folder(folder, identity, overwrite)
        resolved = _teacher_precision(teacher_model, precision)
        if teacher_tokenizer is not None and aligner is None:
            manifest = {**manifest, "teacher_vocabulary": {**alignment.to_dict(), "note": alignment.note("teacher")}}
        spec = _run_spec(teacher_model, manifest, tokenizer, batch_size, None if aligner is None else aligner.token_map)
        _run_shards(spec, examples, folder, manifest, counts, shard_examples, progress, resolved)
    return folder


def _teacher_precision(model: Any, precision: str) -> Precision:
    """The precision of the teacher's forward on its device; a vLLM engine runs at its weights' dtype (no autocast)."""
    return resolve_precision(model.dtype if is_vllm(model) else precision, _model_device(model))


def _run_spec(
    model: Any, manifest: Mapping[str, Any], tokenizer: Any, batch_size: int, token_map: TokenMap | None
) -> _RunSpec:
    """What computing a shard needs: the teacher, the manifest's k, temperature and vocabulary, a valid pad id."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return _RunSpec(
        model=model,
        k=manifest["k"],
        temperature=manifest["temperature"],
        batch_size=batch_size,
        pad_id=pad_id if isinstance(pad_id, int) and 0 <= pad_id < manifest["vocab_size"] else 0,
        device=_model_device(model),
        keep_ok=_accepts_logits_to_keep(model),
        vocab=manifest["vocab_size"],
        shared=manifest.get("shared_vocab_size", manifest["vocab_size"]),
        token_map=token_map,
    )


def _write_shard(folder: Path, index: int, tensors: dict[str, Tensor], start: int, end: int, k: int) -> dict[str, Any]:
    """Write shard ``index`` (examples ``[start, end)``) atomically; its manifest record."""
    from safetensors.torch import save as st_save

    meta = {"format": FORMAT_NAME, "start": str(start), "end": str(end), "k": str(k)}
    data = st_save(tensors, metadata=meta)
    path = folder / shard_name(index)
    atomic_write_bytes(path, data, tmp_prefix=_TMP_PREFIX)
    return {
        "file": path.name,
        "start": start,
        "end": end,
        "tokens": int(tensors["ids"].shape[0]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _build_shards(
    spec: _RunSpec,
    examples: Sequence[Mapping[str, Any]],
    folder: Path,
    manifest: dict[str, Any],
    start: int,
    n: int,
    shard_examples: int,
    bar: Any,
) -> dict[str, Any]:
    """Compute and write the shards of examples ``[start, n)``, the manifest rewritten after each; the last one."""
    while start < n:
        end = min(start + shard_examples, n)
        t0 = time.perf_counter()
        tensors = _compute_shard(spec, examples, start, end, bar)
        shard = _write_shard(folder, len(manifest["shards"]), tensors, start, end, spec.k)
        if spec.token_map is not None:  # this shard's aligned rows and their mapped mass
            shard.update(aligned=int(spec.stats.aligned), aligned_mass=float(spec.stats.mass))
            spec.stats = AlignmentStats()
        manifest = _shard_added(manifest, shard, time.perf_counter() - t0, n, spec.token_map)
        _write_manifest(folder, manifest)
        start = end
    return manifest


def _run_shards(
    spec: _RunSpec,
    examples: Sequence[Mapping[str, Any]],
    folder: Path,
    manifest: dict[str, Any],
    counts: list[int],
    shard_examples: int,
    progress: bool,
    precision: Precision,
) -> None:
    """Build the shards after the last finished one, rewriting the manifest after each; mark it complete."""
    from tqdm.auto import tqdm

    start = manifest["shards"][-1]["end"] if manifest["shards"] else 0
    if start >= len(counts) and manifest.get("complete"):
        return  # nothing to do: same arguments, complete and verified
    engine = getattr(spec.model, "engine_name", "vllm") if is_vllm(spec.model) else "transformers"
    _check_resume(folder, manifest["build"], start, precision.name, engine)
    manifest = _session_started(manifest, str(spec.device), spec.batch_size, precision.name, engine)
    _write_manifest(folder, manifest)
    was_training = bool(getattr(spec.model, "training", False))
    if not is_vllm(spec.model):
        spec.model.eval()
    bar = tqdm(
        total=manifest["total_tokens"],
        initial=sum(counts[:start]),
        unit="tok",
        unit_scale=True,
        desc="teacher top-k",
        disable=not progress,
    )
    try:
        with torch.no_grad(), autocast(precision):
            manifest = _build_shards(spec, examples, folder, manifest, start, len(counts), shard_examples, bar)
        if not manifest["complete"]:  # zero examples: nothing was written in the loop
            _write_manifest(folder, {**manifest, "complete": True})
    finally:
        bar.close()
        if not is_vllm(spec.model):
            spec.model.train(was_training)
