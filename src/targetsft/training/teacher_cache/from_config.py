"""The ``target-sft cache-teacher`` job on a training config: build a teacher's top-k cache over the config's
training examples (:func:`cache_teacher`), and how the cached teacher scores their labels
(:func:`teacher_label_stats`, kept beside the cache)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from targetsft.runtime.files import atomic_write_text
from targetsft.runtime.precision import resolve_precision
from targetsft.training.config import TrainConfig
from targetsft.training.dataset import build_dataset, teacher_aligner, teacher_prompt_tokenizer
from targetsft.training.models import load_frozen, matching_tokenizer
from targetsft.training.text_alignment import alignment_note

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from targetsft.training.teacher_cache.read import TeacherCache

LABEL_STATS_FILE = "label_stats.json"  # beside a teacher cache: :func:`teacher_label_stats`


def cache_teacher(
    cfg: TrainConfig,
    out: str | Path,
    *,
    teacher: str | None = None,
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_examples: int = 256,
    device: str | None = None,
    overwrite: bool = False,
    precision: str | None = None,
    engine: str = "transformers",
) -> Path:
    """Build (or resume, or find complete) the top-k cache of ``teacher`` (default ``cfg.teacher.model``) over the
    training examples of ``cfg`` (its data section and ``teacher.prompt``) in ``out``, at ``precision`` (default:
    the config's); train with ``teacher.cache: <out>`` and the same data section to use it. ``engine``:
    ``transformers`` (the teacher's forward under autocast) or ``vllm`` (a :class:`VLLMEngine` on the teacher's
    folder with weights at ``precision``'s dtype; temperature 1 only). Without ``teacher`` and with
    ``teacher.server``, the rows are read from that server (temperature 1 only). A teacher of another tokenizer
    (``teacher.align: text``) reads the text and its rows are stored on the student's ids."""
    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.teacher_cache.build import build_teacher_cache

    served = cfg.teacher.server is not None and not teacher
    teacher = teacher or cfg.teacher.model or (cfg.teacher.server.model if served else None)
    if not teacher:
        raise ValueError("cache_teacher needs a teacher model (argument, teacher.model or teacher.server.model)")
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    aligner = teacher_aligner(cfg, tokenizer, teacher)
    if aligner is not None:
        logger.info(alignment_note(aligner))
    # the teacher section's loading keys; dtype auto keeps float32 weights (the forward runs in autocast at
    # `precision`, and the cache's identity records the weights' dtype, so caches built before stay valid)
    precision = precision or cfg.requested_precision()
    if served:
        model: Any = _served_engine(cfg, k)
    elif engine == "vllm":
        from targetsft.runtime.vllm_engine import VLLMEngine

        dtype = str(resolve_precision(precision, device).dtype).removeprefix("torch.")
        model = VLLMEngine(resolve_model(teacher), dtype=dtype, max_logprobs=max(k, 1))
    elif engine == "transformers":
        checked = tokenizer if aligner is None else None  # a teacher read through the text has its own
        model = load_frozen(teacher, cfg.teacher, torch.float32, checked, "teacher")
    else:
        raise ValueError(f"engine must be 'transformers' or 'vllm', got {engine!r}")
    try:
        prompt_tokenizer = teacher_prompt_tokenizer(cfg, tokenizer, teacher)
        items, counts = build_dataset(cfg, tokenizer, teacher_tokenizer=prompt_tokenizer, aligner=aligner)
        logger.info("examples: %s", counts)
        folder = build_teacher_cache(
            model,
            items,
            out,
            tokenizer=tokenizer,
            k=k,
            temperature=temperature,
            batch_size=batch_size,
            shard_examples=shard_examples,
            teacher_name=teacher,
            device=device,
            overwrite=overwrite,
            precision=precision,
            teacher_tokenizer=None if aligner else matching_tokenizer(resolve_model(teacher), tokenizer, "teacher"),
            aligner=aligner,
        )
    finally:
        if served or engine == "vllm":
            model.close()
    stats = teacher_label_stats(cfg, folder, tokenizer=tokenizer, items=items)
    logger.info(label_stats_line(stats))
    return folder


def _served_engine(cfg: TrainConfig, k: int) -> Any:
    """``teacher.server`` reached and checked, as the cache builder's engine; the served model's config is read from
    ``teacher.server.model``'s files."""
    from transformers import AutoConfig

    from targetsft.runtime.models import resolve_model
    from targetsft.training.served_teacher import ServedEngine, TeacherServer

    settings = cfg.teacher.server
    server = TeacherServer(settings.url, settings.model, timeout=settings.timeout, retries=settings.retries)
    server.max_model_len()  # it serves the model named
    config = AutoConfig.from_pretrained(resolve_model(settings.model))
    logger.info("teacher: %r served at %s", server.model, server.url)
    return ServedEngine(server, max_logprobs=settings.top_k, config=config, workers=settings.workers)


def label_stats_line(stats: dict[str, float]) -> str:
    """The line a run prints about how its cached teacher scores the training labels."""
    return "teacher on the training labels: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items())


def teacher_label_stats(
    cfg: TrainConfig,
    cache: str | Path,
    *,
    tokenizer: Any = None,
    items: list[dict[str, Any]] | None = None,
    opened: TeacherCache | None = None,
) -> dict[str, float]:
    """How the cached teacher scores the training labels of ``cfg`` (top-1 agreement, label in top-k, mean π_T(y);
    see :meth:`~targetsft.training.teacher_cache.TeacherCache.label_stats`), kept in ``<cache>/label_stats.json`` with
    the sha256 of the manifest it was computed for: read from there while the cache is the same, else computed from
    the cache alone (no teacher model; ``opened``, that cache already open, if given) and written."""
    from targetsft.runtime.files import sha256_file
    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.teacher_cache.read import TeacherCache
    from targetsft.training.teacher_cache.storage import MANIFEST_NAME

    path, manifest = Path(cache) / LABEL_STATS_FILE, sha256_file(Path(cache) / MANIFEST_NAME)
    kept = json.loads(path.read_text()) if path.is_file() else {}
    if kept.pop("manifest_sha256", None) == manifest and "topk_entropy" in kept:  # else written before entropy was
        return kept
    tokenizer = tokenizer or load_tokenizer(resolve_model(cfg.model))
    if items is None:
        items, _ = build_dataset(cfg, tokenizer)
    if opened is not None:
        stats = opened.label_stats(items)
    else:
        with contextlib.closing(TeacherCache.open(cache, tokenizer=tokenizer, examples=items, verify=False)) as fresh:
            stats = fresh.label_stats(items)
    atomic_write_text(path, json.dumps({**stats, "manifest_sha256": manifest}, indent=2) + "\n")
    return stats
