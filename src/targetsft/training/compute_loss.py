"""``TargetLoss``: a drop-in ``compute_loss_func`` for ``transformers.Trainer`` and TRL's ``SFTTrainer``.

    loss_fn = targetsft.TargetLoss("target_sft", eta=0.5, teacher=teacher_model).bind(model)
    trainer = SFTTrainer(model=model, args=..., train_dataset=..., compute_loss_func=loss_fn)

It receives the model's full logits (that is what ``compute_loss_func`` gets), shifts the labels, and divides
the summed loss by ``num_items_in_batch``, so gradient accumulation and data parallelism stay exact. A teacher
or reference model needs the batch's inputs, which ``compute_loss_func`` does not receive: :meth:`bind` hooks
the student's forward to see them. For long sequences and large vocabularies prefer ``target-sft train``
(:class:`targetsft.training.trainer.TargetTrainer`), whose fused loss never builds the logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from targetsft.losses.loss import target_loss
from targetsft.losses.target import Target
from targetsft.training.integration import IGNORE_INDEX, shift_labels, unwrap


class TargetLoss:
    """``loss(outputs, labels, num_items_in_batch=None)`` = ``target_loss`` of ``method`` on the shifted labels.

    Args:
        method: a registered method name or a :class:`targetsft.Target`; ``**params`` its parameters.
        teacher: a model sharing the student's vocabulary, run without gradient on the same inputs.
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

    def bind(self, model: nn.Module) -> TargetLoss:
        """Record each forward's ``input_ids``/``attention_mask`` so the teacher/reference see the same batch."""
        if self._hook is not None:
            self._hook.remove()

        def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}

        self._hook = unwrap(model).register_forward_pre_hook(capture, with_kwargs=True)
        return self

    def _logits_of(self, model: nn.Module | None) -> Tensor | None:
        if model is None:
            return None
        if self._inputs is None:
            raise RuntimeError("TargetLoss with a teacher or reference needs .bind(student_model) before training")
        with torch.no_grad():
            return model(**self._inputs).logits

    def __call__(self, outputs: Any, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        shifted = shift_labels(labels, self.ignore_index)
        kwargs: dict[str, Any] = {}
        teacher_logits, ref_logits = self._logits_of(self.teacher), self._logits_of(self.ref)
        if teacher_logits is not None:
            kwargs["teacher_logits"] = teacher_logits
        if ref_logits is not None:
            kwargs["ref_logits"] = ref_logits
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, device=logits.device)
        return target_loss(logits, shifted, method=self.method, ignore_index=self.ignore_index, **kwargs, **self.params)
