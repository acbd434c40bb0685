"""``TargetLoss``: a ``compute_loss_func`` for ``transformers.Trainer`` (and, deprecated, TRL's ``SFTTrainer``).

    loss_fn = targetsft.TargetLoss("target_sft", eta=0.5, teacher=teacher_model).bind(model, tokenizer)
    trainer = Trainer(model=model, args=..., train_dataset=..., compute_loss_func=loss_fn)

It receives the model's full logits (that is what ``compute_loss_func`` gets), shifts the labels, and divides
the summed loss by ``num_items_in_batch``, so gradient accumulation and data parallelism stay exact. A teacher
or reference model needs the batch's inputs, which ``compute_loss_func`` does not receive: :meth:`bind` hooks
the student's forward to see them, puts the teacher on the student's device (unless it was loaded with a
``device_map``) and checks that it shares the student's vocabulary and, given the tokenizers, its tokenizer. TRL
1.16 deprecates ``compute_loss_func`` and runs an extra forward for it: with TRL use
:class:`targetsft.training.sft_trainer.TargetSFTTrainer`, and for long sequences and large vocabularies
``target-sft train`` (:class:`targetsft.training.trainer.TargetTrainer`); both run the fused loss, which never
builds the logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from targetsft.losses.loss import target_loss
from targetsft.losses.target import Target
from targetsft.training.integration import IGNORE_INDEX, input_device, moved_to, place_frozen, shift_labels, unwrap


class TargetLoss:
    """``loss(outputs, labels, num_items_in_batch=None)`` = ``target_loss`` of ``method`` on the shifted labels.

    Args:
        method: a registered method name or a :class:`targetsft.Target`; ``**params`` its parameters.
        teacher: a model sharing the student's vocabulary, run without gradient on the same inputs (on the device
            it sits on: its logits come back to the student's).
        ref: the reference model of ``asft`` / ``sft_kl``, likewise.
    """

    def __init__(
        self,
        method: str | Target = "sft",
        *,
        teacher: nn.Module | None = None,
        ref: nn.Module | None = None,
        ignore_index: int = IGNORE_INDEX,
        **params: Any,
    ) -> None:
        self.method, self.params, self.ignore_index = method, params, ignore_index
        self.teacher, self.ref = teacher, ref
        self._inputs: dict[str, Tensor] | None = None
        self._hook = None
        for other in (teacher, ref):
            if other is not None:
                other.eval().requires_grad_(False)

    def bind(self, model: nn.Module, tokenizer: Any = None, teacher_tokenizer: Any = None) -> TargetLoss:
        """Record each forward's ``input_ids``/``attention_mask`` so the teacher/reference see the same batch; move
        one that sits on the CPU to the student's device (one on an accelerator, or loaded with a ``device_map``,
        stays where it is and gets the batch there) and check them against the student: the
        same vocabulary size always, the same tokenizer when ``tokenizer`` (the student's) is given — compared with
        ``teacher_tokenizer`` or, without it, with the tokenizer saved beside the teacher (its ``name_or_path``)."""
        if self._hook is not None:
            self._hook.remove()
        student = unwrap(model)
        for role, other in (("teacher", self.teacher), ("reference", self.ref)):
            if other is not None:
                check_frozen_model(student, other, role, tokenizer, teacher_tokenizer if role == "teacher" else None)
                place_frozen(other, input_device(student), role)

        def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}

        self._hook = student.register_forward_pre_hook(capture, with_kwargs=True)
        return self

    def _logits_of(self, model: nn.Module | None) -> Tensor | None:
        if model is None:
            return None
        if self._inputs is None:
            raise RuntimeError("TargetLoss with a teacher or reference needs .bind(student_model) before training")
        ids, mask = moved_to(input_device(model), self._inputs["input_ids"], self._inputs["attention_mask"])
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    def __call__(self, outputs: Any, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        shifted = shift_labels(labels, self.ignore_index)
        kwargs: dict[str, Any] = {}
        for role, other in (("teacher", self.teacher), ("ref", self.ref)):
            other_logits = self._logits_of(other)
            if other_logits is not None:
                kwargs[f"{role}_logits"] = other_logits.to(logits.device)
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, device=logits.device)
        return target_loss(logits, shifted, method=self.method, ignore_index=self.ignore_index, **kwargs, **self.params)


def check_frozen_model(
    student: nn.Module, other: nn.Module, role: str, tokenizer: Any = None, other_tokenizer: Any = None
) -> None:
    """A teacher or reference has the student's vocabulary size and, given the student's ``tokenizer``, the same
    tokenizer (``other_tokenizer``, or the one saved beside ``other``); else ValueError."""
    vocab, other_vocab = (_vocab_size(m) for m in (student, other))
    if other_vocab != vocab:
        raise ValueError(f"the {role} has a vocabulary of {other_vocab} tokens, the student {vocab}")
    if tokenizer is not None:
        _check_same_tokenizer(tokenizer, other_tokenizer, other, role)


def _vocab_size(model: nn.Module) -> int:
    weight = unwrap(model).get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # a ZeRO-3 partition knows its full shape


def _check_same_tokenizer(tokenizer: Any, other_tokenizer: Any, other: nn.Module, role: str) -> None:
    """``other_tokenizer`` (or the one saved with ``other``) tokenizes exactly as ``tokenizer``, else ValueError."""
    from targetsft.runtime.models import load_tokenizer
    from targetsft.training.teacher_cache import check_same_tokenizer

    if other_tokenizer is None:
        path = getattr(unwrap(other), "name_or_path", None) or getattr(unwrap(other).config, "_name_or_path", "")
        try:
            other_tokenizer = load_tokenizer(path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load the {role}'s tokenizer from {path!r} to compare it with the student's: pass it as "
                f"teacher_tokenizer=... ({err})"
            ) from None
    check_same_tokenizer(tokenizer, other_tokenizer, role)
