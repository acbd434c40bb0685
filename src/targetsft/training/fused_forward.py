"""Feeding a transformers causal LM to the fused loss: hidden states in, no ``[tokens, V]`` logits out.

:func:`lm_head` finds the (possibly tied, possibly PEFT-wrapped) output projection and the logit transforms
of the model's config; :func:`hidden_states` runs the model without its lm_head; :func:`causal_lm_target_loss`
puts both together with the usual label shift. A teacher or reference of any kind reaches the loss one way
(:class:`LossTeacher`: for a batch, its distribution at the loss rows): a frozen model (:class:`ModelTeacher`), rows
made for the batch (:class:`RowsTeacher`), a teacher read through the text
(:class:`~targetsft.training.text_alignment.AlignedTeacher`). :class:`FusedForward` makes that path the model's own
``forward`` for the duration of one call, so that wrappers that must see the forward call (DDP, FSDP, DeepSpeed,
``torch.compile``) keep working and the model is a plain transformers model at every other moment.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from targetsft.losses.distributions import Chunking, LMHead, Projected, TopK
from targetsft.losses.fused import fused_target_loss

IGNORE_INDEX = -100
# Keywords of a forward that say where a packed (or padding-free) batch's sequences begin; a teacher or reference
# gets them with the student's inputs, so that it attends within each example exactly as the student does.
SEQUENCE_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/accelerate (``.module``), ``torch.compile`` (``_orig_mod``) and PEFT
    (``get_base_model``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            break
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _lora_weight(head: nn.Module) -> Tensor:
    """Effective weight of a PEFT LoRA-wrapped linear layer: base weight plus the active adapters' deltas."""
    weight = head.base_layer.weight
    for name in head.active_adapters:
        if name in getattr(head, "lora_A", {}):
            weight = weight + head.get_delta_weight(name)
    return weight


def lm_head(model: nn.Module) -> LMHead:
    """The model's output projection and logit transforms (Cohere ``logit_scale``, Granite ``logits_scaling``,
    Gemma ``final_logit_softcapping``)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (lm_head)")
    weight = _lora_weight(head) if hasattr(head, "base_layer") else head.weight
    bias = getattr(getattr(head, "base_layer", head), "bias", None)
    cfg = getattr(inner, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(weight=weight, bias=bias, logit_scale=scale, softcap=float(softcap) if softcap else None)


def zero3_managed(param: Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages ``param`` (partitions it and gathers it as its module runs)."""
    return hasattr(param, "ds_numel")


def _partitioned(param: Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose data is, right now, only this rank's shard."""
    return zero3_managed(param) and param.numel() != param.ds_numel


def _head_params(model: nn.Module) -> list[nn.Parameter]:
    return list(unwrap(model).get_output_embeddings().parameters())


@contextlib.contextmanager
def gathered_head(*models: nn.Module | None) -> Iterator[None]:
    """The output projections of ``models`` (lm_head, its bias, LoRA factors; the tied embedding) held whole for the
    duration, where ZeRO-3 partitions them; nothing otherwise.

    ZeRO-3 gathers a parameter only while its own module runs; the fused loss reads ``lm_head.weight`` without
    calling the lm_head, so it would see an empty shard. Gathering without a modifier rank is read-only and leaves
    the parameters partitioned again on exit; the fused loss needs nothing of the weight after that, since it
    computes the weight's gradient in its forward (scalar reductions; ``reduction="none"`` is refused here).
    """
    params = [p for model in models if model is not None for p in _head_params(model) if _partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def register_head_with_zero3(model: nn.Module) -> None:
    """ZeRO-3: make the output projection's parameters external parameters of the module whose forward runs the
    loss (DeepSpeed's ``register_external_parameter``), so DeepSpeed gathers them again in that module's backward,
    where their full-size gradient arrives (the lm_head module itself never runs). No-op otherwise."""
    inner = unwrap(model)
    params = [p for p in _head_params(model) if zero3_managed(p)]
    known = getattr(inner, "_external_params", {})
    missing = [p for p in params if id(p) not in known]
    if missing:
        import deepspeed

        for p in missing:
            deepspeed.zero.register_external_parameter(inner, p)


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm) without running the lm_head."""
    inner = unwrap(model)
    out = inner.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out[0]


def input_device(model: nn.Module) -> torch.device:
    """Where a model takes its inputs: the device of its input embeddings (the first of a ``device_map``)."""
    return unwrap(model).get_input_embeddings().weight.device


KEEP_DEVICE = "_targetsft_keep_device"  # set on a model loaded with an explicit device_map


def place_frozen(model: nn.Module, device: torch.device | str, role: str = "teacher") -> nn.Module:
    """A teacher or reference: eval mode, no gradients, and on ``device`` if it is on the CPU; one already on an
    accelerator, spread by a ``device_map`` or loaded with one stays where it was put (the loss moves its inputs
    there and its outputs back). A model that would not fit in the free memory of a CUDA ``device`` is refused with
    the ways out."""
    model.eval().requires_grad_(False)
    placed = getattr(model, KEEP_DEVICE, False) or getattr(model, "hf_device_map", None)
    if placed or input_device(model).type != "cpu":
        return model
    device = torch.device(device)
    if device.type == "cuda":
        need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            raise ValueError(
                f"the {role} needs {need / 1e9:.2f} GB on {device}, which has {free / 1e9:.2f} GB free: load it in "
                f"bfloat16 ({role}.dtype), shard it over the ranks ({role}.placement: sharded under DeepSpeed ZeRO-3), "
                f"give it devices of its own ({role}.device_map), or precompute its top-k (teacher.cache)"
            )
    return model.to(device)


def with_rank0_weights(model: nn.Module, fsdp_plugin: Any) -> nn.Module:
    """``model`` with rank 0's weights and buffers on every rank, under FSDP's ``cpu_ram_efficient_loading``:
    there ``from_pretrained`` (once the process group exists) reads them on rank 0 only, zeros elsewhere, and FSDP
    broadcasts rank 0's into the model it wraps, the student; a frozen model gets them here."""
    if fsdp_plugin is None or not fsdp_plugin.cpu_ram_efficient_loading:
        return model
    from accelerate.utils import broadcast

    broadcast([t.data for t in (*model.parameters(), *model.buffers())], from_process=0)
    return model


def shard_frozen(model: nn.Module, deepspeed_config: dict[str, Any]) -> nn.Module:
    """A frozen model partitioned over the ranks by DeepSpeed ZeRO-3, with no optimizer: each rank keeps 1/N of its
    weights and gathers a layer's as the layer runs (the student's ZeRO-3 config, optimizer and scheduler dropped)."""
    import deepspeed

    config = copy.deepcopy(deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": 3}
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # returns None
    return engine


def moved_to(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Each tensor on ``device`` (None stays None)."""
    return tuple(None if t is None else t.to(device) for t in tensors)


_HEAD_COPY = "_targetsft_head_copy"  # a frozen model's output projection, copied to the student's device


def _frozen_head_on(model: nn.Module, head: LMHead, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """A frozen model's lm_head weight and bias on ``device``: as they are when already there, else copied once and
    kept (the copy is redone only if the weights change place or version, e.g. a ZeRO-3 gather)."""
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    if weight.device == device:
        return weight, bias
    key = (weight.data_ptr(), weight._version, device)
    cached = getattr(model, _HEAD_COPY, None)
    if cached is None or cached[0] != key:
        cached = (key, weight.to(device), None if bias is None else bias.to(device))
        object.__setattr__(model, _HEAD_COPY, cached)
    return cached[1], cached[2]


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``labels[:, 1:]`` padded with ``ignore_index``: position t then predicts token t + 1 (HF convention)."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


@dataclass
class LossBatch:
    """What a teacher may read of a batch: the student's inputs, its ``labels`` shifted (−100: no loss), a packed
    batch's sequence ``boundaries`` (:data:`SEQUENCE_KEYS`), the inputs the collator made for the teacher
    (``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``, ``teacher_rows``), and the ``device``
    the loss runs on."""

    input_ids: Tensor
    attention_mask: Tensor | None
    labels: Tensor
    device: torch.device
    boundaries: dict[str, Any]
    teacher_inputs: dict[str, Tensor]


class LossTeacher(Protocol):
    """A teacher (or reference) of the fused forward, whatever its kind: for a batch, its distribution at the loss
    rows as the loss takes it (:class:`~targetsft.TopK` or :class:`~targetsft.Projected`), held valid while the
    block runs (a sharded model's output projection stays gathered)."""

    def at_loss_rows(self, batch: LossBatch) -> AbstractContextManager[TopK | Projected]: ...


@dataclass
class ModelTeacher:
    """A frozen model run without gradient on each batch: the student's very inputs (a packed batch's sequence
    boundaries go along), or, with ``own_prompt`` and a batch that has them, its own ``teacher_input_ids`` whose
    supervised tokens (``teacher_labels``) must be the student's, in order. Its final hidden states reach the loss
    with its output projection (:class:`~targetsft.Projected`), projected there chunk by chunk. A reference model, and
    ``proximal_sft``'s π_old, is one with ``own_prompt=False``."""

    model: nn.Module
    shared_vocab_size: int | None = None
    own_prompt: bool = True

    def _hidden(self, batch: LossBatch) -> Tensor:
        t = batch.teacher_inputs
        if self.own_prompt and t.get("teacher_input_ids") is not None:
            if batch.boundaries:
                raise ValueError(
                    "a teacher with a prompt of its own (teacher_input_ids) cannot read a packed or padding-free batch "
                    f"(it has {sorted(batch.boundaries)}): train without packing"
                )
            return _own_prompt_hidden(
                self.model,
                t["teacher_input_ids"],
                t.get("teacher_attention_mask"),
                t.get("teacher_labels"),
                batch.labels,
            )
        at = input_device(self.model)  # it may sit on another device (device_map): inputs there, rows back here
        seen = {k: v.to(at) if isinstance(v, Tensor) else v for k, v in batch.boundaries.items()}
        with torch.no_grad():
            return hidden_states(self.model, *moved_to(at, batch.input_ids, batch.attention_mask), **seen)

    @contextlib.contextmanager
    def at_loss_rows(self, batch: LossBatch) -> Iterator[Projected]:
        hidden = self._hidden(batch).to(batch.device)
        with gathered_head(self.model):
            weight, bias = _frozen_head_on(self.model, lm_head(self.model), batch.device)
            yield Projected(hidden, weight, bias, self.shared_vocab_size)


@dataclass
class RowsTeacher:
    """Top-k rows already made for this batch (a teacher cache's, a served or routed teacher's): given as they are."""

    rows: TopK

    @contextlib.contextmanager
    def at_loss_rows(self, batch: LossBatch) -> Iterator[TopK]:
        yield self.rows


def causal_lm_target_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    teacher_model: nn.Module | None = None,
    ref_model: nn.Module | None = None,
    teacher_input_ids: Tensor | None = None,
    teacher_attention_mask: Tensor | None = None,
    teacher_labels: Tensor | None = None,
    **loss_kwargs: Any,
):
    """The fused target loss of a causal LM on a batch with unshifted HF ``labels`` (−100 = no loss): the model's
    final hidden states (:func:`hidden_states`), then :func:`target_loss_on_hidden`, whose keyword arguments
    (``method``, ``teacher``, ``num_items_in_batch``, ...) ``loss_kwargs`` are. ``teacher_model`` / ``ref_model``: a
    frozen model as the teacher / reference (a :class:`ModelTeacher`); the teacher reads ``teacher_input_ids``
    (with ``teacher_labels``, ``teacher_attention_mask``) when they are given."""
    if teacher_model is not None:
        loss_kwargs["teacher"] = ModelTeacher(teacher_model)
    if ref_model is not None:
        loss_kwargs["ref"] = ModelTeacher(ref_model, own_prompt=False)
    given = {"teacher_input_ids": teacher_input_ids, "teacher_attention_mask": teacher_attention_mask}
    given["teacher_labels"] = teacher_labels
    loss_kwargs["teacher_inputs"] = {k: v for k, v in given.items() if v is not None}
    hidden = hidden_states(model, input_ids, attention_mask, **(model_kwargs or {}))
    return target_loss_on_hidden(
        model, hidden, input_ids, labels, attention_mask=attention_mask, model_kwargs=model_kwargs, **loss_kwargs
    )


@torch.compiler.disable  # data-dependent rows and value checks: run eagerly after a compiled decoder
def target_loss_on_hidden(
    model: nn.Module,
    hidden: Tensor,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    teacher: LossTeacher | None = None,
    ref: LossTeacher | None = None,
    teacher_inputs: dict[str, Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    num_loss_tokens: int | None = None,
    **loss_kwargs: Any,
):
    """The fused target loss of the student's final ``hidden`` states ``[B, T, H]`` against unshifted ``labels``.

    ``teacher`` and ``ref`` (a :class:`ModelTeacher`, a :class:`RowsTeacher`, a teacher read through the text, ...)
    each give their distribution at the loss rows of the batch (:class:`LossBatch`, with ``teacher_inputs``), all in
    one way (:class:`LossTeacher`). ``chunk_size`` and ``num_loss_tokens`` make the loss's
    :class:`~targetsft.Chunking`; other keyword arguments go to :func:`targetsft.fused_target_loss` (``method``,
    ``num_items_in_batch``, method parameters, ...). ``torch.compile`` does not trace it: its rows and value checks
    depend on the data.
    """
    shifted = shift_labels(labels)
    boundaries = {k: v for k, v in (model_kwargs or {}).items() if k in SEQUENCE_KEYS and v is not None}
    batch = LossBatch(input_ids, attention_mask, shifted, hidden.device, boundaries, dict(teacher_inputs or {}))
    if loss_kwargs.get("reduction") == "none" and any(_partitioned(p) for p in _head_params(model)):
        raise ValueError("reduction='none' needs the lm_head weight in backward, which ZeRO-3 has partitioned by then")
    with contextlib.ExitStack() as held:
        given = {
            role: held.enter_context(other.at_loss_rows(batch))
            for role, other in (("teacher", teacher), ("ref", ref))
            if other is not None
        }
        held.enter_context(gathered_head(model))
        return fused_target_loss(
            hidden,
            lm_head(model),
            shifted,
            chunking=Chunking(chunk_size, num_loss_tokens),
            **given,
            **loss_kwargs,
        )


def _output_class():
    """``CausalLMOutputWithPast`` plus ``target_stats`` (a declared field, so DDP can rebuild the output)."""
    from dataclasses import dataclass as _dataclass

    from transformers.modeling_outputs import CausalLMOutputWithPast

    global _TargetLMOutput
    if _TargetLMOutput is None:

        @_dataclass
        class TargetLMOutput(CausalLMOutputWithPast):
            target_stats: Any = None  # TargetStats (sums on the device) or a dict of means

        _TargetLMOutput = TargetLMOutput
    return _TargetLMOutput


_TargetLMOutput = None


def _own_prompt_hidden(
    teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None, shifted: Tensor
) -> Tensor:
    """A teacher's final hidden states at its own supervised positions (``labels``, unshifted), read from its own
    ``input_ids``; its supervised tokens must be the student's (``shifted``), in order."""
    if labels is None:
        raise ValueError("teacher_input_ids needs teacher_labels to align the supervised tokens")
    t_shift = shift_labels(labels)
    if not torch.equal(t_shift[t_shift != IGNORE_INDEX], shifted[shifted != IGNORE_INDEX]):
        raise ValueError("the teacher's supervised tokens differ from the student's; they must be identical")
    at = input_device(teacher)
    with torch.no_grad():
        hidden = hidden_states(teacher, *moved_to(at, input_ids, attention_mask))
        return hidden[t_shift.to(at) != IGNORE_INDEX]


def project(head: LMHead, hidden: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The logits ``softcap·tanh(logit_scale·(h·Wᵀ + b)/softcap)`` of ``hidden``, as the model's forward makes them
    (the transforms in ``dtype`` when given)."""
    z = torch.nn.functional.linear(hidden, head.weight, head.bias)
    if dtype is not None:
        z = z.to(dtype)
    if head.logit_scale != 1.0:
        z = z * head.logit_scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


class FusedForward:
    """``model(input_ids, labels=..., target_loss_kwargs={...})`` returns the fused loss (``logits=None``) inside
    :meth:`active`, and nothing about the model changes outside it.

    While active, the transformers model inside ``model``'s wrappers has an instance ``forward`` that takes the fused
    path for calls with ``target_loss_kwargs`` and hands every other call to the forward it had (its own, or one a
    wrapper such as accelerate's autocast installed). Going through the model's forward keeps DDP, FSDP, DeepSpeed and
    ``torch.compile`` in the loop. ``defaults`` (method, teacher, ...) apply to every fused call; per-batch loss
    arguments (``num_items_in_batch``, ``teacher``, ``token_weights``, ...) travel in ``target_loss_kwargs``,
    with ``return_logits=True`` when the caller needs the logits too (evaluation with metrics, prediction).
    """

    def __init__(self, model: nn.Module, **defaults: Any) -> None:
        self.model = unwrap(model)
        self.defaults = defaults
        self._gates: dict[tuple[int, int], Any] = {}

    def _gate(self, previous: Any) -> Any:
        """The instance forward installed over ``previous``: one object per ``previous`` function, so that a
        compiled model's guards see the same forward at every step."""
        key = (id(getattr(previous, "__func__", previous)), id(getattr(previous, "__self__", None)))
        if key not in self._gates:
            fused = self._fused

            def forward(module, *args, target_loss_kwargs=None, **kwargs):
                if target_loss_kwargs is None:
                    return previous(*args, **kwargs)
                return fused(module, target_loss_kwargs, *args, **kwargs)

            self._gates[key] = types.MethodType(forward, self.model)
        return self._gates[key]

    def _fused(self, module, options, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            raise ValueError("the fused target loss needs labels")
        kwargs.pop("num_items_in_batch", None)
        kwargs.pop("use_cache", None)
        options = {**self.defaults, **options}
        want_logits = options.pop("return_logits", False)
        register_head_with_zero3(module)
        hidden = hidden_states(module, input_ids, attention_mask, **kwargs)
        logits = project(lm_head(module), hidden) if want_logits else None
        out = target_loss_on_hidden(
            module, hidden, input_ids, labels, attention_mask=attention_mask, model_kwargs=kwargs, **options
        )
        loss, stats = out if isinstance(out, tuple) else (out, None)
        return _output_class()(loss=loss, logits=logits, target_stats=stats)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The fused forward installed for the block; the model's own attributes restored exactly on exit."""
        inner = self.model
        had, before = "forward" in inner.__dict__, inner.__dict__.get("forward")
        inner.forward = self._gate(inner.forward)
        try:
            yield
        finally:
            if had:
                inner.forward = before
            else:
                del inner.forward
