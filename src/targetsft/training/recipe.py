"""``TargetTrainer`` (``transformers.Trainer`` with the fused target loss of
:class:`~targetsft.training.loss_mixin.FusedLossMixin`) and the ``target-sft train`` recipe, :func:`train`:
setup (data, student, teacher and reference, trainer), train, save (final model, card, summary).

The parts it puts together live beside it: the callbacks (:mod:`~targetsft.training.callbacks`), the models
(:mod:`~targetsft.training.models`), the model card (:mod:`~targetsft.training.model_card`) and the teacher cache
job (:mod:`~targetsft.training.teacher_cache.from_config`). What a method needs beyond its loss (a teacher, a frozen
reference or a snapshot of the student, π_old) is read from its :class:`~targetsft.losses.methods.MethodSpec`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from targetsft.losses.methods import MethodSpec, get_method
from targetsft.losses.target import STAT_NAMES
from targetsft.runtime.files import atomic_write_text
from targetsft.runtime.precision import Precision, environment
from targetsft.training.callbacks import (
    CsvMetricsCallback,
    ModelSnapshots,
    PolicySnapshot,
    log_instead_of_printing,
    snapshot_dir,
)
from targetsft.training.config import TrainConfig
from targetsft.training.dataset import (
    Collator,
    build_dataset,
    build_eval_dataset,
    data_notes,
    split_records,
    teacher_aligner,
    teacher_prompt_tokenizer,
)
from targetsft.training.loss_func import check_frozen_model, shared_vocab_size
from targetsft.training.loss_mixin import FusedLossMixin
from targetsft.training.model_card import model_card
from targetsft.training.models import frozen_copy, load_frozen, sharded, whole_model, with_lora
from targetsft.training.routed_teacher import RoutedTeacher, route_counts, routes_line
from targetsft.training.served_teacher import ServedTeacher, TeacherServer
from targetsft.training.teacher_cache import (
    LABEL_STATS_FILE,
    TeacherCache,
    cache_teacher,
    label_stats_line,
    teacher_label_stats,
)
from targetsft.training.text_alignment import TextAligner, alignment_note, require_aligned_share
from targetsft.training.vocabulary import VocabAlignment

logger = logging.getLogger(__name__)

# the recipe and the parts of a training run that callers import from here
__all__ = [
    "LABEL_STATS_FILE",
    "CsvMetricsCallback",
    "ModelSnapshots",
    "PolicySnapshot",
    "TargetTrainer",
    "cache_teacher",
    "load_frozen",
    "sharded",
    "snapshot_dir",
    "teacher_label_stats",
    "train",
]


class TargetTrainer(FusedLossMixin, Trainer):
    """A ``transformers.Trainer`` whose loss is ``targetsft.fused_target_loss`` of a registered method (or a
    ``Target``); the keyword arguments are :class:`~targetsft.training.loss_mixin.FusedLossMixin` 's."""


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    keep_checkpoints: bool = True,
) -> dict[str, Any]:
    """Run ``target-sft train``: load, tokenize, train with :class:`TargetTrainer`, save the final model and card.

    ``keep_checkpoints=False`` deletes the ``checkpoint-N`` folders (weights and optimizer state) once the final
    model is saved. Returns a summary (paths, counts, final metrics, the notes on where the data was cut).
    """
    spec = get_method(cfg.loss.method)
    precision, env = _setup_run(cfg)
    data = _setup_data(cfg)
    args = TrainingArguments(**cfg.training_arguments(precision))
    notes = _announce_data(cfg, data, args)
    served = _connect_teacher_server(cfg, data) if cfg.teacher.server is not None else None  # before any model
    routed = {t.name: _connect_teacher_server(cfg, data, t.server) for t in cfg.teachers if t.server is not None}
    set_seed(args.seed)  # what the model's creation draws (LoRA's initial A) is the same on every launch
    student = _setup_model(cfg, data)
    frozen = _setup_teacher_and_reference(cfg, spec, student, data, precision, served, routed)
    model = with_lora(student, cfg) if cfg.lora is not None else student  # a frozen copy is of the initial student
    trainer = _setup_trainer(cfg, spec, model, frozen, data, args, callbacks)

    result = trainer.train(resume_from_checkpoint=resume or None)

    metrics = _final_metrics(trainer, result, data)  # evaluates the final model if the last step did not
    summary = _summary(cfg, trainer, metrics, data, notes, env, frozen)
    _save(trainer, cfg, data, summary, keep_checkpoints)
    return summary


@dataclass
class _Data:
    """The run's student folder and tokenizer, its training examples and counts, and its held-out examples and
    counts (None without ``data.eval``)."""

    model_path: str
    tokenizer: Any
    items: list[dict[str, Any]]
    counts: dict[str, int]
    held_out: tuple[list[dict[str, Any]], dict[str, int]] | None
    aligner: TextAligner | None = None  # an online teacher of another tokenizer, read through the text


@dataclass
class _Frozen:
    """The frozen models beside the student (a π_old snapshot is not one: :func:`_setup_trainer` copies it), a
    teacher cache and what the summary says of it, and each one's vocabulary lined up with the student's."""

    reference: nn.Module | None = None
    teacher: nn.Module | None = None
    cache: TeacherCache | ServedTeacher | RoutedTeacher | None = None  # a teacher that gives top-k rows
    teacher_info: dict[str, Any] | None = None
    vocab: dict[str, VocabAlignment] = field(default_factory=dict)
    shared_vocab_size: int | None = None


def _reference_kind(spec: MethodSpec) -> str | None:
    """The reference ``spec``'s loss reads: ``frozen`` (π_ref), ``snapshot`` (π_old), or None (none)."""
    return spec.ref_model if "ref" in spec.needs else None


def _setup_run(cfg: TrainConfig) -> tuple[Precision, dict[str, Any]]:
    """The precision and environment of the run, announced; the output folder made, with ``config.json`` in it."""
    precision = cfg.resolved_precision()
    env = environment(precision)
    logger.info(
        "precision: %s (%s); CPU %s, %s torch threads",
        precision.name,
        precision.reason,
        env["cpu_capability"],
        env["torch_threads"],
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str))
    return precision, env


def _setup_data(cfg: TrainConfig) -> _Data:
    """The student's tokenizer and the tokenized training and held-out examples (bad data is found before the model
    loads); ValueError when no training example is left."""
    from targetsft.runtime.models import load_tokenizer, resolve_model

    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    split = split_records(cfg)
    served = cfg.teacher.server.model if cfg.teacher.server is not None else None
    teacher_tokenizer = teacher_prompt_tokenizer(cfg, tokenizer, served)  # own_template: one load for both sets
    aligner = teacher_aligner(cfg, tokenizer, served) if cfg.teacher.model or cfg.teacher.server else None
    items, counts = build_dataset(cfg, tokenizer, split, teacher_tokenizer, aligner)
    if aligner is not None:  # a teacher that meets the student at too few tokens is refused before it loads
        first = items[:64]
        rows = torch.tensor([r for item in first for r in item["teacher_rows"]], dtype=torch.long)
        require_aligned_share(rows, len(first), cfg.teacher.min_aligned_share, "teacher.min_aligned_share")
    held_out = build_eval_dataset(cfg, tokenizer, split, teacher_tokenizer, aligner)
    if not items:
        raise ValueError(f"no training examples left from {cfg.data.train!r} after tokenization ({counts})")
    return _Data(model_path, tokenizer, items, counts, held_out, aligner)


def _announce_data(cfg: TrainConfig, data: _Data, args: TrainingArguments) -> list[str]:
    """The notes on where the data is cut or capped (:func:`~targetsft.training.dataset.data_notes`), printed with
    the example counts."""
    seen = args.max_steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    notes = data_notes(cfg, data.counts, seen if args.max_steps > 0 else None)
    logger.info("training data: %s%s", data.counts, f"; held-out: {data.held_out[1]}" if data.held_out else "")
    for note in notes:
        logger.info("note: %s", note)
    return notes


def _setup_model(cfg: TrainConfig, data: _Data) -> nn.Module:
    """The student as loaded, float32 master weights (LoRA's adapters come after its frozen copy is taken)."""
    from targetsft.runtime.models import load_model

    return load_model(data.model_path, **cfg.model_init.from_pretrained_kwargs(torch.float32))


def _setup_teacher_and_reference(
    cfg: TrainConfig,
    spec: MethodSpec,
    student: nn.Module,
    data: _Data,
    precision: Precision,
    served: ServedTeacher | None = None,
    routed: dict[str, ServedTeacher] | None = None,
) -> _Frozen:
    """The frozen reference (``reference.model``, or a copy of ``student``) of a method whose reference is frozen,
    and the teacher (a model, a cache, ``served``, already reached, or the routed ``teachers``, their servers
    already reached in ``routed``); each one's vocabulary lined up with the student's and announced."""
    frozen = _Frozen()
    if _reference_kind(spec) == "frozen":
        if cfg.reference.model:
            frozen.reference = load_frozen(
                cfg.reference.model, cfg.reference, precision.dtype, data.tokenizer, "reference"
            )
        else:
            frozen.reference = frozen_copy(student, cfg.reference, precision.dtype)
        frozen.vocab["reference"] = check_frozen_model(student, frozen.reference, "reference", data.tokenizer)
    if cfg.teacher.model:
        checked = data.tokenizer if data.aligner is None else None  # a teacher read through the text has its own
        frozen.teacher = load_frozen(cfg.teacher.model, cfg.teacher, precision.dtype, checked, "teacher")
        if data.aligner is None:
            frozen.vocab["teacher"] = check_frozen_model(student, frozen.teacher, "teacher", data.tokenizer)
        else:
            logger.info(alignment_note(data.aligner))
    elif cfg.teacher.cache:
        frozen.cache, frozen.teacher_info = _open_teacher_cache(cfg, spec, student, data)
    elif served is not None:
        frozen.cache = served
        frozen.teacher_info = {"server": cfg.teacher.server.url, "prompt": cfg.teacher.prompt}
    elif cfg.teachers:
        frozen.cache = _open_routed_teachers(cfg, spec, student, data, routed or {})
    for role, alignment in frozen.vocab.items():
        logger.info(alignment.note(role))
    frozen.shared_vocab_size = shared_vocab_size(list(frozen.vocab.values()))
    if frozen.shared_vocab_size is None and frozen.cache is not None:
        frozen.shared_vocab_size = frozen.cache.shared_vocab_size
    return frozen


def _open_teacher_cache(
    cfg: TrainConfig, spec: MethodSpec, student: nn.Module, data: _Data, path: str | None = None
) -> tuple[TeacherCache, dict[str, Any]]:
    """``teacher.cache`` (or the cache at ``path``) opened on the training examples, checked against the student's
    rows and the loss's temperature, with what the summary says of it (its teacher and how it scores the labels,
    also printed)."""
    path = path or cfg.teacher.cache
    cache = TeacherCache.open(path, tokenizer=data.tokenizer, examples=data.items)
    rows = student.get_output_embeddings().weight.shape[0]
    if cache.shared_vocab_size > rows:
        raise ValueError(f"the teacher cache holds ids up to {cache.shared_vocab_size}, the student {rows}")
    wanted = float({**spec.defaults, **cfg.loss.params}.get("temperature", 1.0))
    if cache.temperature != wanted:
        raise ValueError(
            f"loss.params.temperature is {wanted} but the teacher cache holds log-probs at temperature "
            f"{cache.temperature}: build one with cache-teacher --temperature {wanted}"
        )
    stats = teacher_label_stats(cfg, path, tokenizer=data.tokenizer, items=data.items, opened=cache)
    logger.info(label_stats_line(stats))
    info = {
        "cache": str(path),
        "name": cache.teacher_name,
        "weights_sha256": cache.teacher_weights_hash,
        "prompt": cfg.teacher.prompt,
        "temperature": cache.temperature,
        "label_stats": stats,
        "vocabulary": cache.teacher_vocabulary,
    }
    return cache, info


def _connect_teacher_server(cfg: TrainConfig, data: _Data, settings: Any = None) -> ServedTeacher:
    """``teacher.server`` (or the server ``settings`` of a routed teacher) reached and checked: it serves the model
    named and tokenizes as the teacher's tokenizer (the student's, read by ids; the teacher's own, read through the
    text)."""
    settings = settings or cfg.teacher.server
    server = TeacherServer(settings.url, settings.model, timeout=settings.timeout, retries=settings.retries)
    teacher = ServedTeacher(
        server,
        k=settings.top_k,
        shared_vocab_size=None if data.aligner else len(data.tokenizer),
        aligner=data.aligner,
        workers=settings.workers,
        max_prefetch=settings.prefetch,
    )
    teacher.check(data.aligner.teacher if data.aligner else data.tokenizer)
    logger.info("teacher: %r served at %s, top-%d log-probs per position", server.model, server.url, settings.top_k)
    if data.aligner is not None:
        logger.info(alignment_note(data.aligner))
    return teacher


def _open_routed_teachers(
    cfg: TrainConfig, spec: MethodSpec, student: nn.Module, data: _Data, served: dict[str, ServedTeacher]
) -> RoutedTeacher:
    """The ``teachers`` as one :class:`~targetsft.training.routed_teacher.RoutedTeacher` over the training examples
    (each example's ``teacher_route``): the caches opened and checked as ``teacher.cache`` is, the servers already
    reached (``served``); the examples and loss rows routed to each announced."""
    teachers: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for entry in cfg.teachers:
        info[entry.name] = {"select": entry.select}
        if entry.cache:
            logger.info("teacher %r: the cache %s", entry.name, entry.cache)
            teachers[entry.name], opened = _open_teacher_cache(cfg, spec, student, data, entry.cache)
            info[entry.name].update(opened)
        else:
            teachers[entry.name] = served[entry.name]
            info[entry.name].update(server=entry.server.url, model=served[entry.name].server.model)
    counts = route_counts(data.items, list(teachers))
    logger.info(routes_line(counts))
    routes = [item.get("teacher_route") for item in data.items]
    return RoutedTeacher(teachers, routes, info=info, counts=counts)


def _loss_params(cfg: TrainConfig, spec: MethodSpec, cache: TeacherCache | None) -> dict[str, Any]:
    """The method's parameters from ``loss.params`` (the trainer's own, such as ``refresh``, included: the trainer
    splits them off); temperature 1 with a teacher cache, whose log-probs are already at the asked temperature."""
    params = dict(cfg.loss.params)
    if cache is not None and "temperature" in spec.params:
        params["temperature"] = 1.0
    return params


def _setup_trainer(
    cfg: TrainConfig,
    spec: MethodSpec,
    model: nn.Module,
    frozen: _Frozen,
    data: _Data,
    args: TrainingArguments,
    callbacks: list[TrainerCallback] | None,
) -> TargetTrainer:
    """:class:`TargetTrainer` on the student ``model`` (adapters included), its frozen models and the examples,
    writing ``metrics.csv`` and the snapshots asked for. A snapshot reference (π_old) is an exact copy of ``model``
    that the trainer takes and refreshes from its trained weights every ``refresh`` steps: it needs the weights whole
    on each rank."""
    from datasets import Dataset

    own: list[TrainerCallback] = [CsvMetricsCallback(Path(cfg.output_dir) / "metrics.csv")]
    if cfg.snapshot_steps:
        own.append(ModelSnapshots(cfg.snapshot_steps, data.tokenizer))
    trainer = TargetTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.items),
        eval_dataset=Dataset.from_list(data.held_out[0]) if data.held_out else None,
        data_collator=Collator(
            data.tokenizer.pad_token_id,
            packing=cfg.data.packing,
            teacher_pad_id=data.aligner.teacher_pad_id if data.aligner else 0,
        ),
        method=cfg.loss.method,
        method_params=_loss_params(cfg, spec, frozen.cache),
        teacher_model=frozen.teacher,
        teacher_cache=frozen.cache,
        ref_model=frozen.reference,
        chunk_size=cfg.loss.chunk_size,
        teacher_placement=cfg.teacher.placement,
        ref_placement=cfg.reference.placement,
        shared_vocab_size=frozen.shared_vocab_size,
        teacher_alignment=data.aligner if frozen.teacher is not None else None,
        callbacks=[*own, *(callbacks or [])],
    )
    log_instead_of_printing(trainer)
    if _reference_kind(spec) == "snapshot" and sharded(trainer.model_wrapped):
        raise ValueError(
            f"{cfg.loss.method} copies the student's weights into π_old at every refresh, which needs them whole on "
            "each rank: train it on one process, with DDP or with ZeRO-1/2, not with FSDP or ZeRO-3"
        )
    return trainer


def _final_metrics(trainer: TargetTrainer, result: Any, data: _Data) -> dict[str, Any]:
    """The run's final metrics: ``trainer.train``'s, the last logged loss and target statistics (``last_*``), and
    the last evaluation's (``eval_*``), evaluating the final model first unless its last step already did."""
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    if data.held_out and not (evaluations and evaluations[-1]["step"] == trainer.state.global_step):
        trainer.evaluate()  # the final model on the held-out set, unless the last step already did
        evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.metrics.items()}
    last = [h for h in trainer.state.log_history if "loss" in h]
    if last:
        metrics.update({f"last_{k}": v for k, v in last[-1].items() if k in (*STAT_NAMES, "loss")})
    if evaluations:
        metrics.update({k: v for k, v in evaluations[-1].items() if k.startswith("eval_")})
    return metrics


def _summary(
    cfg: TrainConfig,
    trainer: TargetTrainer,
    metrics: dict[str, Any],
    data: _Data,
    notes: list[str],
    env: dict[str, Any],
    frozen: _Frozen,
) -> dict[str, Any]:
    """What ``summary.json`` holds and :func:`train` returns: paths, steps, counts, metrics, data notes, environment,
    how the run was distributed, and the teacher and vocabularies when there are some."""
    out = Path(cfg.output_dir)
    summary = {"output_dir": str(out), "final_model": str(out / "final"), "steps": trainer.state.global_step}
    summary.update(data=data.counts, metrics=metrics)
    if data.held_out:
        summary["eval_data"] = data.held_out[1]
    summary["data_notes"] = notes
    summary["environment"] = env
    summary["distributed"] = {
        "type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "processes": trainer.accelerator.num_processes,
        "sharded": sharded(trainer.model_wrapped),
    }
    if frozen.teacher_info is not None:
        summary["teacher"] = frozen.teacher_info
    if isinstance(frozen.cache, ServedTeacher):
        summary["teacher"].update(frozen.cache.summary())
    if isinstance(frozen.cache, RoutedTeacher):
        summary["teachers"] = frozen.cache.summary()
    if frozen.vocab:
        summary["vocabulary"] = {role: {**a.to_dict(), "note": a.note(role)} for role, a in frozen.vocab.items()}
    alignment = None
    if isinstance(frozen.cache, ServedTeacher):
        alignment = frozen.cache.alignment_summary()
    elif data.aligner is not None:
        alignment = data.aligner.summary()
    elif frozen.cache is not None:
        alignment = frozen.cache.alignment
    if alignment is not None:
        summary["teacher_alignment"] = alignment
    return summary


def _save(
    trainer: TargetTrainer, cfg: TrainConfig, data: _Data, summary: dict[str, Any], keep_checkpoints: bool
) -> None:
    """The final model (merged if LoRA), its tokenizer and card in ``final/``, then ``summary.json``; no
    ``checkpoint-N`` left unless ``keep_checkpoints``. Every rank joins in gathering sharded weights; rank 0 writes."""
    out = Path(cfg.output_dir)
    whole = whole_model(trainer, cfg, data.model_path)  # every rank: sharded weights are gathered collectively
    if trainer.is_world_process_zero():  # one writer
        final = out / "final"
        (whole.merge_and_unload() if cfg.lora is not None else whole).save_pretrained(final)
        data.tokenizer.save_pretrained(final)
        card = model_card(
            cfg,
            summary["data"],
            summary["metrics"],
            summary["environment"],
            summary["data_notes"],
            summary.get("teacher_alignment"),
            summary.get("teachers"),
        )
        atomic_write_text(final / "README.md", card)
        if not keep_checkpoints:
            for checkpoint in out.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    trainer.accelerator.wait_for_everyone()
