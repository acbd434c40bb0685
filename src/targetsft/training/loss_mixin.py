"""The fused target loss inside a ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``).

:class:`FusedLossMixin` runs the loss through the model's forward, made fused for the loss call only
(:class:`targetsft.training.fused_forward.FusedForward`), so DDP/FSDP/DeepSpeed/``torch.compile`` wrappers see the
call they expect and the model is a plain transformers model everywhere else; the loss is divided by the Trainer's
``num_items_in_batch`` (supervised tokens over the whole gradient-accumulation window, summed over ranks), which
makes accumulation and data parallelism exact; a teacher or reference is replicated or sharded over the ranks; the
target statistics (γ, p(label), ...) join the logs.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from targetsft.losses.distributions import TopK
from targetsft.losses.methods import get_method, resolve_target
from targetsft.losses.target import STAT_NAMES, TargetStats
from targetsft.runtime.distributed import end_process_group_at_exit
from targetsft.training.callbacks import PolicySnapshot
from targetsft.training.fused_forward import (
    KEEP_DEVICE,
    FusedForward,
    ModelTeacher,
    RowsTeacher,
    place_frozen,
    shard_frozen,
    with_rank0_weights,
)
from targetsft.training.text_alignment import AlignedTeacher, TextAligner
from targetsft.training.topk_rows import PrefetchingCollator, TopKTeacher

_TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_rows")


class FusedLossMixin:
    """Put before a ``transformers.Trainer`` subclass: its loss becomes ``targetsft.fused_target_loss`` of a
    registered method (or a ``Target``), run inside the model's own forward, so no ``[tokens, V]`` logits are built.

    Args:
        method: the target: a name of ``targetsft.METHODS`` or a ``Target``; ``method_params`` its parameters
            (a method's trainer parameters, such as ``proximal_sft``'s ``refresh``, included). None: chosen by the
            training arguments (:func:`method_from_args`). A method that needs a teacher or a reference without one,
            or given one it does not use, is refused here (:func:`check_method_inputs`).
        teacher_model: a teacher run online (no grad, eval mode) on each batch; or ``teacher``: one that gives the
            loss top-k rows per batch (a :class:`~targetsft.training.topk_rows.TopKTeacher`: a
            :class:`~targetsft.training.teacher_cache.TeacherCache`, whose rows are looked up by the batch's
            ``example_index`` column, or a :class:`~targetsft.training.served_teacher.ServedTeacher`, whose requests
            start when the batch is collated). ``teacher_cache``: the same argument under its older name.
        ref_model: the reference model of ``asft`` / ``sft_kl``; ``proximal_sft`` without one takes a copy of the
            student refreshed every ``refresh`` optimizer steps (π_old).
        chunk_size: rows per chunk of the fused loss (None: automatic).
        teacher_placement: (and ``ref_placement``) ``replicated`` on every rank, ``sharded`` by the launch's
            DeepSpeed ZeRO-3 config, or ``auto`` (sharded under ZeRO-3, else replicated).
        shared_vocab_size: the student's real tokens, shared with the teacher/reference (see
            :func:`targetsft.fused_target_loss`); rows past it on either side are padding. None: all rows, equal.
        teacher_alignment: a :class:`~targetsft.training.text_alignment.TextAligner` for an online teacher of
            another tokenizer (``teacher.align: text``): it reads the batch's text with its own tokenizer (the
            batch's ``teacher_input_ids``/``teacher_rows`` when the collator made them, else made here from
            ``input_ids`` and ``labels``) and reaches the loss as top-k rows on the student's ids; the method's
            teacher ``temperature`` is applied there. Its aligned shares join the logs.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        method: Any = None,
        method_params: dict[str, Any] | None = None,
        teacher_model: nn.Module | None = None,
        teacher: TopKTeacher | None = None,
        teacher_cache: TopKTeacher | None = None,
        ref_model: nn.Module | None = None,
        chunk_size: int | None = None,
        teacher_placement: str = "auto",
        ref_placement: str = "auto",
        shared_vocab_size: int | None = None,
        teacher_alignment: TextAligner | None = None,
        **kwargs: Any,
    ) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if teacher is not None and teacher_cache is not None:
            raise ValueError("teacher and teacher_cache name the same argument: give one")
        teacher_cache = teacher if teacher is not None else teacher_cache
        if teacher_cache is not None and teacher_model is not None:
            raise ValueError("give one teacher: teacher_model (run online) or teacher / teacher_cache (top-k rows)")
        if teacher_cache is not None and not isinstance(teacher_cache, TopKTeacher):
            raise TypeError(
                f"teacher must give top-k rows per batch (a TeacherCache, a ServedTeacher, ...), got "
                f"{type(teacher_cache).__name__}: pass a model as teacher_model"
            )
        method, method_params = method_from_args(method, method_params, training_args)
        if teacher_alignment is not None:
            if teacher_model is None:
                raise ValueError("teacher_alignment aligns an online teacher: give teacher_model too")
            method_params = teacher_alignment.take_temperature(method, method_params)
        spec = get_method(method) if isinstance(method, str) else None
        loss_params, trainer_params = spec.split_params(method_params or {}) if spec else (method_params or {}, {})
        # the target is built once here, not at every step from the method's name and parameters
        target = resolve_target(method, loss_params)
        snapshot = spec is not None and spec.ref_model == "snapshot" and ref_model is None and "ref" in target.needs
        check_method_inputs(
            target,
            method if spec else type(method).__name__,
            teacher=teacher_model is not None or teacher_cache is not None,
            ref=ref_model is not None or snapshot,
        )
        super().__init__(*args, **kwargs)
        if snapshot:  # π_old: a copy of the student as trained (adapters included), refreshed by PolicySnapshot
            ref_model, ref_placement = copy.deepcopy(self.model), "replicated"
            self.add_callback(PolicySnapshot(self.model, ref_model, **trainer_params))
        if hasattr(teacher_cache, "prefetch"):  # its requests start when a batch is collated
            self.data_collator = PrefetchingCollator(self.data_collator, teacher_cache)
        end_process_group_at_exit()  # a user's script exits 0 without calling accelerator.end_training() itself
        self.method, self.teacher_cache = target, teacher_cache
        self._stats, self._eval_stats = TargetStats(), TargetStats()
        self._tokens = 0
        self._clock = time.perf_counter()
        teacher_model = self._place(teacher_model, teacher_placement, "teacher")
        ref_model = self._place(ref_model, ref_placement, "reference")
        self.teacher_alignment = teacher_alignment
        if shared_vocab_size is None and teacher_cache is not None:  # its ids lie below the tokens it shares
            shared_vocab_size = getattr(teacher_cache, "shared_vocab_size", None)
        self.shared_vocab_size = shared_vocab_size
        defaults: dict[str, Any] = {"method": target, "chunk_size": chunk_size}
        if teacher_model is not None:  # the teacher the loss reads, whatever its kind
            defaults["teacher"] = (
                ModelTeacher(teacher_model, shared_vocab_size)
                if teacher_alignment is None
                else AlignedTeacher(teacher_model, teacher_alignment, shared_vocab_size)
            )
        if ref_model is not None:
            defaults["ref"] = ModelTeacher(ref_model, shared_vocab_size, own_prompt=False)
        self.fused_forward = FusedForward(self.model, **defaults)
        self._want_logits = False  # set by prediction_step when the caller needs the logits
        # the fused forward takes num_items_in_batch through target_loss_kwargs: have the Trainer count it
        self.model_accepts_loss_kwargs = True

    def _place(self, model: nn.Module | None, placement: str, role: str) -> nn.Module | None:
        """A frozen model ``replicated`` on every rank's device or ``sharded`` by the student's ZeRO-3 config
        (``auto``: sharded under ZeRO-3 unless it was loaded with a ``device_map``)."""
        if model is None:
            return None
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        zero3 = plugin is not None and plugin.zero_stage == 3
        if placement == "sharded" and not zero3:
            raise ValueError(
                f"{role}.placement 'sharded' needs DeepSpeed ZeRO-3 (accelerate launch --config_file "
                "configs/accelerate/zero3.yaml); otherwise every rank holds a replica: lower its dtype or cache it"
            )
        placed = getattr(model, KEEP_DEVICE, False)  # its own device_map: left where the user put it
        if placement == "sharded" or (placement == "auto" and zero3 and not placed):
            return shard_frozen(model, plugin.deepspeed_config)
        fsdp = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        return with_rank0_weights(place_frozen(model, self.args.device, role), fsdp)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        index = inputs.pop("example_index", None)
        options: dict[str, Any] = {"return_stats": "sums"}  # left on the device until a logging step reads them
        if num_items_in_batch is not None:
            options["num_items_in_batch"] = num_items_in_batch
        if "num_loss_tokens" in inputs:  # counted by the collator on the host: no read back to find the loss rows
            options["num_loss_tokens"] = inputs.pop("num_loss_tokens")
        if self.teacher_alignment is not None and "teacher_rows" not in inputs:  # e.g. TRL's collator
            inputs.update(self.teacher_alignment.batch(inputs["input_ids"], labels, inputs.get("position_ids")))
        teacher_inputs = {key: inputs.pop(key) for key in _TEACHER_KEYS if key in inputs}
        if "token_weights" in inputs:  # shifted like the labels: position t carries the weight of token t + 1
            options["token_weights"] = torch.nn.functional.pad(inputs.pop("token_weights")[:, 1:], (0, 1))
        if self.teacher_cache is not None:  # its rows of this batch, as the loss reads them
            batch = {**inputs, **teacher_inputs, "labels": labels, "example_index": index}
            ids, logprobs = self._teacher_rows(batch)
            rows = TopK(ids.to(labels.device), logprobs.to(labels.device), self.shared_vocab_size)
            options["teacher"] = RowsTeacher(rows)
        else:
            options["teacher_inputs"] = teacher_inputs
        if return_outputs and self._want_logits and not model.training:
            options["return_logits"] = True
        # the fused forward replaces any wrapper's forward for this call: autocast as accelerate's wrapper would
        with self.fused_forward.active(), self.accelerator.autocast():
            outputs = model(**inputs, labels=labels, target_loss_kwargs=options)
        loss = outputs.loss
        stats = outputs.get("target_stats")
        if stats is not None:
            (self._stats if model.training else self._eval_stats).add(stats)
        if model.training:  # a device-side count, read when the step logs
            self._tokens = self._tokens + (
                inputs["attention_mask"].sum() if "attention_mask" in inputs else labels.numel()
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over ranks while num_items_in_batch is the global count: undo the average
            loss = loss * self.accelerator.num_processes
        if not return_outputs:
            return loss
        return loss, CausalLMOutputWithPast(loss=loss, logits=outputs.logits)

    def _teacher_rows(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k teacher's rows of ``batch``; a teacher server that stops answering stops the run with the
        step it stopped at."""
        from targetsft.training.served_teacher import TeacherServerError

        if batch["example_index"] is None:
            del batch["example_index"]
        try:
            return self.teacher_cache.batch_rows(batch)
        except TeacherServerError as err:
            raise TeacherServerError(f"{err} (training step {self.state.global_step + 1})") from None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's prediction step; the logits are built only when it keeps them (``compute_metrics``,
        ``predict``, ``prediction_loss_only=False``), from the same hidden states as the fused loss."""
        self._want_logits = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._want_logits = False

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._stats.count:
            means = self._stats.means()
            logs.update({k: round(means[k], 6) for k in STAT_NAMES})
            elapsed = time.perf_counter() - self._clock
            logs["tokens_per_second"] = round(int(self._tokens) * self.args.world_size / max(elapsed, 1e-9), 1)
            self._stats, self._tokens, self._clock = TargetStats(), 0, time.perf_counter()
            for source in (self.teacher_alignment, self.teacher_cache):
                if hasattr(source, "take_shares"):
                    logs.update({f"teacher_{k}": round(v, 6) for k, v in source.take_shares().items()})
        if "eval_loss" in logs and self._eval_stats.count:  # the held-out set's target statistics, as in training
            means = self._eval_stats.means()
            logs.update({f"eval_{k}": round(means[k], 6) for k in STAT_NAMES})
            self._eval_stats = TargetStats()
        super().log(logs, *args, **kwargs)


def method_from_args(method: Any, params: dict[str, Any] | None, args: Any) -> tuple[Any, dict[str, Any]]:
    """The method and its parameters, with the loss settings of ``args`` (``SFTConfig.loss_type`` ``nll`` | ``dft``,
    ``TrainingArguments.label_smoothing_factor`` ε) honoured: they choose the method when ``method`` is None
    (``dft``; ``label_smoothing`` with ``epsilon`` = ε; else ``sft``) and must agree with it when it is given."""
    loss_type = getattr(args, "loss_type", "nll") or "nll"
    smoothing = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
    params = dict(params or {})
    if loss_type not in ("nll", "dft"):
        raise ValueError(f"SFTConfig.loss_type must be 'nll' or 'dft', got {loss_type!r}")
    if loss_type == "dft" and smoothing > 0:
        raise ValueError(
            f"SFTConfig(loss_type='dft') and label_smoothing_factor={smoothing} name two different losses: keep one"
        )
    implied = "dft" if loss_type == "dft" else "label_smoothing" if smoothing > 0 else None
    if method is None:
        if implied == "label_smoothing":
            params.setdefault("epsilon", smoothing)
        return implied or "sft", params
    if implied is None:
        return method, params
    setting = "loss_type='dft'" if implied == "dft" else f"label_smoothing_factor={smoothing}"
    if method != implied:
        raise ValueError(
            f"the training arguments say {setting} but method={method!r}: leave method unset to train "
            f"{implied!r}, or drop {setting}"
        )
    if implied == "label_smoothing" and float(params.setdefault("epsilon", smoothing)) != smoothing:
        raise ValueError(
            f"label_smoothing_factor={smoothing} and method_params epsilon={params['epsilon']} disagree: keep one"
        )
    return method, params


def check_method_inputs(target: Any, name: str, *, teacher: bool, ref: bool) -> None:
    """A method that learns from a teacher (or a reference) has one, and one that does not is given none."""
    needs = target.needs
    if "teacher" in needs and not teacher:
        raise ValueError(
            f"method {name!r} learns from a teacher: give teacher_model (a model, a local path or a hub id) or "
            "teacher_cache"
        )
    if "teacher" not in needs and teacher:
        raise ValueError(
            f"method {name!r} does not use a teacher: drop teacher_model / teacher_cache, or choose a method that "
            "does (target_sft, kd, hybrid_kd, ...)"
        )
    if "ref" in needs and not ref:
        raise ValueError(f"method {name!r} needs a reference model: give ref_model (e.g. a frozen copy of the student)")
    if "ref" not in needs and ref:
        raise ValueError(f"method {name!r} does not use a reference model: drop ref_model")
