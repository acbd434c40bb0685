"""``TargetTrainer`` (``transformers.Trainer`` with the fused target loss of
:class:`~targetsft.training.fused_trainer.FusedLossMixin`) and the ``target-sft train`` recipe: loading, the
teacher cache, snapshots, π_old, the metrics file and the final model."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from targetsft.losses.methods import get_method
from targetsft.losses.target import STAT_NAMES
from targetsft.runtime.files import atomic_write_text
from targetsft.runtime.precision import environment, resolve_precision
from targetsft.training.compute_loss import check_frozen_model, shared_vocab_size
from targetsft.training.config import ModelInit, TrainConfig
from targetsft.training.dataset import (
    Collator,
    build_dataset,
    build_eval_dataset,
    data_notes,
    split_records,
    teacher_prompt_tokenizer,
)
from targetsft.training.fused_trainer import FusedLossMixin
from targetsft.training.integration import KEEP_DEVICE, zero3_managed
from targetsft.training.vocabulary import check_token_maps

if TYPE_CHECKING:
    from targetsft.training.teacher_cache import TeacherCache

LABEL_STATS_FILE = "label_stats.json"  # beside a teacher cache: :func:`teacher_label_stats`


class TargetTrainer(FusedLossMixin, Trainer):
    """A ``transformers.Trainer`` whose loss is ``targetsft.fused_target_loss`` of a registered method (or a
    ``Target``); the keyword arguments are :class:`~targetsft.training.fused_trainer.FusedLossMixin` 's."""


class CsvMetricsCallback(TrainerCallback):
    """Appends every training log and every evaluation (``eval_loss``, ``eval_gamma``, ...) to
    ``<output_dir>/metrics.csv``; on resume, rows past the checkpoint are dropped first so the file has each step
    once."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(float(r.get("step") or 0)) <= state.global_step]
        if len(keep) != len(rows):
            self._write(keep, list(rows[0].keys()))

    def _write(self, rows: list[dict[str, Any]], fields: list[str]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not ("loss" in logs or "eval_loss" in logs):
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        rows, fields = [], list(row)
        if self.path.exists():
            with self.path.open() as f:
                rows = list(csv.DictReader(f))
            if rows:
                fields = list(rows[0].keys()) + [k for k in row if k not in rows[0]]
        self._write(rows + [row], fields)


class ModelSnapshots(TrainerCallback):
    """Saves the model (merged if LoRA) and tokenizer to ``<output_dir>/snapshots/step-N`` after each optimizer step
    N of ``steps``: written to a temporary folder and renamed, so a snapshot folder is always complete; one a
    resumed run has already written is kept."""

    def __init__(self, steps: list[int], tokenizer: Any) -> None:
        self.steps, self.tokenizer = set(steps), tokenizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        target = snapshot_dir(args.output_dir, state.global_step)
        if state.global_step not in self.steps or not state.is_world_process_zero or target.is_dir():
            return
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        inner = model.module if hasattr(model, "module") else model
        if hasattr(inner, "merge_and_unload"):  # LoRA: a full model, the adapters left in place
            inner = copy.deepcopy(inner).merge_and_unload()
        inner.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)


def snapshot_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where :class:`ModelSnapshots` keeps the model after optimizer step ``step``."""
    return Path(output_dir) / "snapshots" / f"step-{step}"


class PolicySnapshot(TrainerCallback):
    """π_old of ``proximal_sft``, a copy of the student (with its LoRA adapters, if any): the weights the student
    trains (every weight, or only the adapters under LoRA; the frozen base is shared content, never copied again)
    and its buffers are copied into it right before every ``refresh``-th optimizer step, so the loss of step t sees
    the model of 1 to ``refresh`` updates before. Those weights are saved in each checkpoint (``pi_old.safetensors``)
    and restored on resume, so an interrupted run continues exactly."""

    FILE = "pi_old.safetensors"

    def __init__(self, model: nn.Module, pi_old: nn.Module, refresh: int) -> None:
        self.model, self.pi_old, self.refresh = model, pi_old, int(refresh)
        self.trained = [name for name, p in model.named_parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: π_old as it was when the checkpoint was written
            from safetensors.torch import load_model

            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
            missing, _ = load_model(self.pi_old, path, strict=False)  # the frozen base is not in the file
            lost = sorted(set(missing) & set(self.trained))
            if lost:
                raise ValueError(f"{path} lacks π_old's trained weights {lost[:3]}: the checkpoint is not this run's")

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step % self.refresh == 0:
            old = dict(self.pi_old.named_parameters())
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    old[name].copy_(p)
            old_buffers = dict(self.pi_old.named_buffers())
            for name, b in self.model.named_buffers():
                old_buffers[name].copy_(b)

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        if state.is_world_process_zero:
            old = dict(self.pi_old.named_parameters())
            weights = {name: old[name].detach().contiguous() for name in self.trained}
            save_file(weights, str(Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE))


def _model_card(
    cfg: TrainConfig, counts: dict[str, int], metrics: dict[str, Any], env: dict[str, Any], notes: list[str]
) -> str:
    spec = get_method(cfg.loss.method)
    params = {**spec.defaults, **cfg.loss.params}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [targetsft, " + cfg.loss.method + "]",
        "---",
        f"# Fine-tuned with targetsft: `{cfg.loss.method}`",
        "",
        f"Target: γ = {spec.gamma}; π̃ = {spec.residual} ({spec.reference}).",
        f"Parameters: {json.dumps(params)}",
        f"Base model: {cfg.model or 'SmolLM2-135M-Instruct (embedded default)'}",
        f"Training data: {cfg.data.train} (size {cfg.data.size or 'all'}, seed {cfg.data.seed}, "
        f"max_length {cfg.data.max_length}); "
        f"examples kept {counts.get('kept')}, truncated {counts.get('truncated')}, dropped {counts.get('dropped')}"
        + (f"; held out for eval_loss: {cfg.data.eval}." if cfg.data.eval is not None else "."),
        *(f"Note: {note}." for note in notes),
        f"Teacher: {cfg.teacher.model or cfg.teacher.cache or '—'} (prompt: {cfg.teacher.prompt}).",
        f"LoRA: {json.dumps(cfg.lora.__dict__) if cfg.lora else 'no (full fine-tuning)'}",
        f"Precision: {env['precision']} (asked: {env['requested_precision']}) on {env['device']}; "
        f"CPU capability {env['cpu_capability']}, native CPU bf16: {env['cpu_native_bf16']}.",
        "",
        "## Final training metrics",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in metrics.items()]
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg.to_dict(), indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _matching_tokenizer(path: str, tokenizer: Any, role: str) -> Any:
    """The tokenizer saved at ``path``, checked to give every student token its id (special tokens and chat
    template may differ) before any weights load."""
    from targetsft.runtime.models import load_tokenizer

    other = load_tokenizer(path)
    check_token_maps(tokenizer, other, f"{role} model {path!r}")
    return other


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
    folder with weights at ``precision``'s dtype; temperature 1 only)."""
    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.teacher_cache import build_teacher_cache

    teacher = teacher or cfg.teacher.model
    if not teacher:
        raise ValueError("cache_teacher needs a teacher model (argument or teacher.model)")
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    # the teacher section's loading keys; dtype auto keeps float32 weights (the forward runs in autocast at
    # `precision`, and the cache's identity records the weights' dtype, so caches built before stay valid)
    precision = precision or cfg.requested_precision()
    if engine == "vllm":
        from targetsft.runtime.vllm_engine import VLLMEngine

        dtype = str(resolve_precision(precision, device).dtype).removeprefix("torch.")
        model: Any = VLLMEngine(resolve_model(teacher), dtype=dtype, max_logprobs=max(k, 1))
    elif engine == "transformers":
        model = load_frozen(teacher, cfg.teacher, torch.float32, tokenizer, "teacher")
    else:
        raise ValueError(f"engine must be 'transformers' or 'vllm', got {engine!r}")
    try:
        prompt_tokenizer = teacher_prompt_tokenizer(cfg, tokenizer, teacher)
        items, counts = build_dataset(cfg, tokenizer, teacher_tokenizer=prompt_tokenizer)
        print(f"examples: {counts}")
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
            teacher_tokenizer=_matching_tokenizer(resolve_model(teacher), tokenizer, "teacher"),
        )
    finally:
        if engine == "vllm":
            model.close()
    stats = teacher_label_stats(cfg, folder, tokenizer=tokenizer, items=items)
    print(_label_stats_line(stats))
    return folder


def _label_stats_line(stats: dict[str, float]) -> str:
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
    from targetsft.training.teacher_cache import MANIFEST_NAME, TeacherCache

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


def _with_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    import peft

    lora = cfg.lora
    return peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are split across ranks: FSDP2 ``DTensor`` s or DeepSpeed ZeRO-3 partitions."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or zero3_managed(p) for p in model.parameters())


def _whole_model(trainer: Trainer, cfg: TrainConfig, model_path: str) -> nn.Module | None:
    """The trained model, whole, on rank 0 (None on the others); called by every rank.

    Unsharded (one process, DDP, ZeRO-1/2): the model itself. Sharded (FSDP2, ZeRO-3): accelerate gathers the full
    state dict (a collective; ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save``), which rank 0 loads into a
    fresh CPU copy of the model (LoRA included, so it can be merged).
    """
    if not sharded(trainer.model):
        return trainer.model
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    from targetsft.runtime.models import load_model

    with _without_zero3_init():
        model = load_model(model_path, **cfg.model_init.from_pretrained_kwargs(torch.float32))
    if cfg.lora is not None:
        model = _with_lora(model, cfg)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    return model


@contextlib.contextmanager
def _without_zero3_init():
    """``from_pretrained`` with every weight on this rank, not partitioned at load by a ZeRO-3 config (zero3_init).
    (Under FSDP's ``cpu_ram_efficient_loading`` a frozen model reads its weights on rank 0 only; the trainer gives
    it rank 0's: :func:`~targetsft.training.integration.with_rank0_weights`.)"""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def load_frozen(path: str, init: ModelInit, auto_dtype: torch.dtype, tokenizer: Any, role: str) -> nn.Module:
    """A teacher or reference model: its token → id map checked against the student's, loaded as ``init`` says
    (``dtype: auto``: ``auto_dtype``; training gives its precision's, so bf16 where the device runs it natively)."""
    from targetsft.runtime.models import load_model, resolve_model

    path = resolve_model(path)
    _matching_tokenizer(path, tokenizer, role)
    with _without_zero3_init():  # the trainer shards it (placement) where ZeRO-3 runs
        model = load_model(path, **init.from_pretrained_kwargs(auto_dtype))
    if init.device_map is not None:
        setattr(model, KEEP_DEVICE, True)  # the Trainer leaves it where its device_map put it
    return model


def _as_frozen_copy(model: nn.Module, init: ModelInit, auto_dtype: torch.dtype) -> nn.Module:
    """The default reference: a copy of the initial student in the reference's dtype."""
    if sharded(model):
        raise ValueError("the student was loaded partitioned (ZeRO-3 zero3_init): give reference.model to load one")
    return copy.deepcopy(model).to(init.from_pretrained_kwargs(auto_dtype)["dtype"])


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
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model

    precision = cfg.resolved_precision()
    env = environment(precision)
    print(
        f"precision: {precision.name} ({precision.reason}); CPU {env['cpu_capability']}, "
        f"{env['torch_threads']} torch threads",
        flush=True,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str))
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    split = split_records(cfg)  # bad data is found before the model loads
    teacher_tokenizer = teacher_prompt_tokenizer(cfg, tokenizer)  # own_template: one load for both sets
    items, counts = build_dataset(cfg, tokenizer, split, teacher_tokenizer)
    held_out = build_eval_dataset(cfg, tokenizer, split, teacher_tokenizer)
    if not items:
        raise ValueError(f"no training examples left from {cfg.data.train!r} after tokenization ({counts})")
    args = TrainingArguments(**cfg.training_arguments(precision))
    seen = args.max_steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    notes = data_notes(cfg, counts, seen if args.max_steps > 0 else None)
    print(f"training data: {counts}" + (f"; held-out: {held_out[1]}" if held_out else ""))
    for note in notes:
        print(f"note: {note}", flush=True)
    set_seed(args.seed)  # what the model's creation draws (LoRA's initial A) is the same on every launch
    model = load_model(model_path, **cfg.model_init.from_pretrained_kwargs(torch.float32))
    spec = get_method(cfg.loss.method)
    ref_model = None
    if "ref" in spec.needs and cfg.loss.method != "proximal_sft":  # π_old is copied below, adapters included
        if cfg.reference.model:
            ref_model = load_frozen(cfg.reference.model, cfg.reference, precision.dtype, tokenizer, "reference")
        else:
            ref_model = _as_frozen_copy(model, cfg.reference, precision.dtype)
    teacher_model, teacher_cache, teacher_info = None, None, None
    method_params = dict(cfg.loss.params)
    vocab = {} if ref_model is None else {"reference": check_frozen_model(model, ref_model, "reference", tokenizer)}
    if cfg.teacher.model:
        teacher_model = load_frozen(cfg.teacher.model, cfg.teacher, precision.dtype, tokenizer, "teacher")
        vocab["teacher"] = check_frozen_model(model, teacher_model, "teacher", tokenizer)
    elif cfg.teacher.cache:
        from targetsft.training.teacher_cache import TeacherCache

        teacher_cache = TeacherCache.open(cfg.teacher.cache, tokenizer=tokenizer, examples=items)
        rows = model.get_output_embeddings().weight.shape[0]
        if teacher_cache.shared_vocab_size > rows:
            raise ValueError(f"the teacher cache holds ids up to {teacher_cache.shared_vocab_size}, the student {rows}")
        wanted = float({**spec.defaults, **cfg.loss.params}.get("temperature", 1.0))
        if teacher_cache.temperature != wanted:
            raise ValueError(
                f"loss.params.temperature is {wanted} but the teacher cache holds log-probs at temperature "
                f"{teacher_cache.temperature}: build one with cache-teacher --temperature {wanted}"
            )
        if "temperature" in spec.defaults:  # the cached log-probs are already at it: the loss uses them as they are
            method_params["temperature"] = 1.0
        stats = teacher_label_stats(cfg, cfg.teacher.cache, tokenizer=tokenizer, items=items, opened=teacher_cache)
        print(_label_stats_line(stats))
        teacher_info = {
            "cache": str(cfg.teacher.cache),
            "name": teacher_cache.teacher_name,
            "weights_sha256": teacher_cache.teacher_weights_hash,
            "prompt": cfg.teacher.prompt,
            "temperature": teacher_cache.temperature,
            "label_stats": stats,
            "vocabulary": teacher_cache.teacher_vocabulary,
        }
    for role, alignment in vocab.items():
        print(alignment.note(role), flush=True)
    shared = shared_vocab_size(list(vocab.values()))
    if shared is None and teacher_cache is not None:
        shared = teacher_cache.shared_vocab_size
    if cfg.lora is not None:
        model = _with_lora(model, cfg)
    if cfg.loss.method == "proximal_sft":  # π_old: an exact copy of the student, refreshed from its trained weights
        ref_model = copy.deepcopy(model)
    from datasets import Dataset

    snapshots: list[TrainerCallback] = [ModelSnapshots(cfg.snapshot_steps, tokenizer)] if cfg.snapshot_steps else []
    if cfg.loss.method == "proximal_sft":  # π_old is the reference: a copy of the student, refreshed as it trains
        refresh = {**spec.defaults, **cfg.loss.params}["refresh"]
        snapshots.append(PolicySnapshot(model, ref_model, refresh))
    trainer = TargetTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(items),
        eval_dataset=Dataset.from_list(held_out[0]) if held_out else None,
        data_collator=Collator(tokenizer.pad_token_id, packing=cfg.data.packing),
        method=cfg.loss.method,
        method_params=method_params,
        teacher_model=teacher_model,
        teacher_cache=teacher_cache,
        ref_model=ref_model,
        chunk_size=cfg.loss.chunk_size,
        teacher_placement=cfg.teacher.placement,
        ref_placement="replicated" if cfg.loss.method == "proximal_sft" else cfg.reference.placement,
        shared_vocab_size=shared,
        callbacks=[CsvMetricsCallback(out / "metrics.csv"), *snapshots, *(callbacks or [])],
    )
    if cfg.loss.method == "proximal_sft" and sharded(trainer.model_wrapped):
        raise ValueError(
            "proximal_sft copies the student's weights into π_old at every refresh, which needs them whole on each "
            "rank: train it on one process, with DDP or with ZeRO-1/2, not with FSDP or ZeRO-3"
        )
    result = trainer.train(resume_from_checkpoint=resume or None)
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    if held_out and not (evaluations and evaluations[-1]["step"] == trainer.state.global_step):
        trainer.evaluate()  # the final model on the held-out set, unless the last step already did
        evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    final = out / "final"
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.metrics.items()}
    last = [h for h in trainer.state.log_history if "loss" in h]
    if last:
        metrics.update({f"last_{k}": v for k, v in last[-1].items() if k in (*STAT_NAMES, "loss")})
    if evaluations:
        metrics.update({k: v for k, v in evaluations[-1].items() if k.startswith("eval_")})
    summary = {"output_dir": str(out), "final_model": str(final), "steps": trainer.state.global_step}
    summary.update(data=counts, metrics=metrics)
    if held_out:
        summary["eval_data"] = held_out[1]
    summary["data_notes"] = notes
    summary["environment"] = env
    summary["distributed"] = {
        "type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "processes": trainer.accelerator.num_processes,
        "sharded": sharded(trainer.model_wrapped),
    }
    if teacher_info is not None:
        summary["teacher"] = teacher_info
    if vocab:
        summary["vocabulary"] = {role: {**a.to_dict(), "note": a.note(role)} for role, a in vocab.items()}
    whole = _whole_model(trainer, cfg, model_path)  # every rank: sharded weights are gathered collectively
    if trainer.is_world_process_zero():  # one writer
        (whole.merge_and_unload() if cfg.lora is not None else whole).save_pretrained(final)
        tokenizer.save_pretrained(final)
        atomic_write_text(final / "README.md", _model_card(cfg, counts, metrics, env, notes))
        if not keep_checkpoints:
            for checkpoint in out.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    trainer.accelerator.wait_for_everyone()
    return summary
