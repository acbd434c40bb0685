"""``TargetLoss``: a ``compute_loss_func`` for ``transformers.Trainer`` (and, deprecated, TRL's ``SFTTrainer``).

    loss_fn = targetsft.TargetLoss("target_sft", eta=0.5, teacher=teacher_model).bind(model, tokenizer)
    trainer = Trainer(model=model, args=..., train_dataset=..., compute_loss_func=loss_fn)

It receives the model's full logits (that is what ``compute_loss_func`` gets), shifts the labels, and divides
the summed loss by ``num_items_in_batch``, so gradient accumulation and data parallelism stay exact. A teacher
or reference model needs the batch's inputs, which ``compute_loss_func`` does not receive: :meth:`bind` hooks
the student's forward to see them, puts the teacher on the student's device (unless it was loaded with a
``device_map``) and lines its vocabulary up with the student's (by tokenizer when given: padding rows, special
tokens and chat templates may differ; :mod:`targetsft.training.vocabulary`). TRL
1.16 deprecates ``compute_loss_func`` and runs an extra forward for it: with TRL use
:class:`targetsft.training.trl_trainer.TargetSFTTrainer`, and for long sequences and large vocabularies
``target-sft train`` (:class:`targetsft.training.recipe.TargetTrainer`); both run the fused loss, which never
builds the logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from targetsft.losses.distributions import Logits
from targetsft.losses.loss import target_loss
from targetsft.losses.target import Target
from targetsft.training.fused_forward import (
    IGNORE_INDEX,
    SEQUENCE_KEYS,
    input_device,
    place_frozen,
    shift_labels,
    unwrap,
)
from targetsft.training.vocabulary import VocabAlignment, align_by_rows, align_vocabularies


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
        self.alignments: list[VocabAlignment] = []  # set by bind(): how each frozen model's vocabulary lines up
        self.shared_vocab_size: int | None = None
        for other in (teacher, ref):
            if other is not None:
                other.eval().requires_grad_(False)

    def bind(self, model: nn.Module, tokenizer: Any = None, teacher_tokenizer: Any = None) -> TargetLoss:
        """Record each forward's ``input_ids``/``attention_mask`` so the teacher/reference see the same batch; move
        one that sits on the CPU to the student's device (one on an accelerator, or loaded with a ``device_map``,
        stays where it is and gets the batch there) and line their vocabularies up with the student's: by token → id
        map when ``tokenizer`` (the student's) is given — compared with ``teacher_tokenizer`` or, without it, with the
        tokenizer saved beside the teacher (its ``name_or_path``) — else by equal lm_head rows."""
        if self._hook is not None:
            self._hook.remove()
        student = unwrap(model)
        alignments = []
        for role, other in (("teacher", self.teacher), ("reference", self.ref)):
            if other is not None:
                other_tok = teacher_tokenizer if role == "teacher" else None
                alignments.append(check_frozen_model(student, other, role, tokenizer, other_tok))
                place_frozen(other, input_device(student), role)
        self.alignments = alignments
        self.shared_vocab_size = shared_vocab_size(alignments)

        def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}
            self._inputs.update({k: kwargs[k] for k in SEQUENCE_KEYS if kwargs.get(k) is not None})  # packed batches

        self._hook = student.register_forward_pre_hook(capture, with_kwargs=True)
        return self

    def _logits_of(self, model: nn.Module | None) -> Tensor | None:
        if model is None:
            return None
        if self._inputs is None:
            raise RuntimeError("TargetLoss with a teacher or reference needs .bind(student_model) before training")
        at = input_device(model)
        inputs = {k: v.to(at) if isinstance(v, Tensor) else v for k, v in self._inputs.items()}
        with torch.no_grad():
            return model(**inputs).logits

    def __call__(self, outputs: Any, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        shifted = shift_labels(labels, self.ignore_index)
        kwargs: dict[str, Any] = {}
        for role, other in (("teacher", self.teacher), ("ref", self.ref)):
            other_logits = self._logits_of(other)
            if other_logits is not None:
                kwargs[role] = Logits(other_logits.to(logits.device), shared_vocab_size=self.shared_vocab_size)
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, device=logits.device)
        return target_loss(logits, shifted, method=self.method, ignore_index=self.ignore_index, **kwargs, **self.params)


def check_frozen_model(
    student: nn.Module, other: nn.Module, role: str, tokenizer: Any = None, other_tokenizer: Any = None
) -> VocabAlignment:
    """How a teacher's or reference's vocabulary lines up with the student's: by tokenizer when the student's
    ``tokenizer`` is given (``other_tokenizer``, or the one saved beside ``other``; see
    :func:`~targetsft.training.vocabulary.align_vocabularies`), else by lm_head rows, which must then be equal."""
    rows, other_rows = (_vocab_size(m) for m in (student, other))
    if tokenizer is None:
        return align_by_rows(rows, other_rows, role)
    if other_tokenizer is None:
        other_tokenizer = saved_tokenizer(other, role)
    return align_vocabularies(tokenizer, other_tokenizer, student_rows=rows, other_rows=other_rows, role=role)


def shared_vocab_size(alignments: list[VocabAlignment]) -> int | None:
    """The ``shared_vocab_size`` the loss gets for these teachers/references (they share one: the student's real
    vocabulary), or None when there are none."""
    sizes = {a.shared for a in alignments}
    if len(sizes) > 1:
        raise ValueError(f"the teacher and the reference share different vocabularies with the student: {sizes}")
    return sizes.pop() if sizes else None


def _vocab_size(model: nn.Module) -> int:
    weight = unwrap(model).get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # a ZeRO-3 partition knows its full shape


def saved_tokenizer(other: nn.Module, role: str) -> Any:
    """The tokenizer saved beside ``other`` (its ``name_or_path``), else ValueError asking for it."""
    from targetsft.runtime.models import load_tokenizer

    path = getattr(unwrap(other), "name_or_path", None) or getattr(unwrap(other).config, "_name_or_path", "")
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the {role}'s tokenizer from {path!r} to compare it with the student's: pass it as "
            f"teacher_tokenizer=... ({err})"
        ) from None
