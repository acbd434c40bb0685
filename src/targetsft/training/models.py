"""The models of a ``target-sft train`` run beside the loop: the student's LoRA adapters, a frozen teacher or
reference (loaded with its tokenizer checked against the student's, or copied from the student), whether weights
are sharded over the ranks, and the trained model gathered whole for saving."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from targetsft.training.config import ModelInit, TrainConfig
from targetsft.training.fused_forward import KEEP_DEVICE, zero3_managed
from targetsft.training.vocabulary import check_token_maps

if TYPE_CHECKING:
    from transformers import Trainer


def matching_tokenizer(path: str, tokenizer: Any, role: str) -> Any:
    """The tokenizer saved at ``path``, checked to give every student token its id (special tokens and chat
    template may differ) before any weights load."""
    from targetsft.runtime.models import load_tokenizer

    other = load_tokenizer(path)
    check_token_maps(tokenizer, other, f"{role} model {path!r}")
    return other


def with_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """``model`` with the LoRA adapters of ``cfg.lora`` (peft), the only weights that train."""
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


def whole_model(trainer: Trainer, cfg: TrainConfig, model_path: str) -> nn.Module | None:
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

    with without_zero3_init():
        model = load_model(model_path, **cfg.model_init.from_pretrained_kwargs(torch.float32))
    if cfg.lora is not None:
        model = with_lora(model, cfg)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    return model


@contextlib.contextmanager
def without_zero3_init() -> Iterator[None]:
    """``from_pretrained`` with every weight on this rank, not partitioned at load by a ZeRO-3 config (zero3_init).
    (Under FSDP's ``cpu_ram_efficient_loading`` a frozen model reads its weights on rank 0 only; the trainer gives
    it rank 0's: :func:`~targetsft.training.fused_forward.with_rank0_weights`.)"""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def load_frozen(path: str, init: ModelInit, auto_dtype: torch.dtype, tokenizer: Any, role: str) -> nn.Module:
    """A teacher or reference model: its token → id map checked against the student's ``tokenizer`` (None: not
    checked, for a teacher read through the text), loaded as ``init`` says (``dtype: auto``: ``auto_dtype``;
    training gives its precision's, so bf16 where the device runs it natively)."""
    from targetsft.runtime.models import load_model, resolve_model

    path = resolve_model(path)
    if tokenizer is not None:
        matching_tokenizer(path, tokenizer, role)
    with without_zero3_init():  # the trainer shards it (placement) where ZeRO-3 runs
        model = load_model(path, **init.from_pretrained_kwargs(auto_dtype))
    if init.device_map is not None:
        setattr(model, KEEP_DEVICE, True)  # the Trainer leaves it where its device_map put it
    return model


def frozen_copy(model: nn.Module, init: ModelInit, auto_dtype: torch.dtype) -> nn.Module:
    """The default reference: a copy of the initial student in the reference's dtype."""
    if sharded(model):
        raise ValueError("the student was loaded partitioned (ZeRO-3 zero3_init): give reference.model to load one")
    return copy.deepcopy(model).to(init.from_pretrained_kwargs(auto_dtype)["dtype"])
