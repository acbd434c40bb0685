"""Prompts of the generative sets (``gsm`` and ``boxed`` styles), the answer-complete early stop and the cut of the
scored text; see :mod:`targetsft.evaluation.engines` for how they are used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import torch

from targetsft.data.gsm import gsm_user_message

FinishReason = Literal["answer", "eos", "length"]


# "####", optional spaces / "$" / sign, a number (digit groups joined by "." or ","), then a character that cannot
# continue the number: not a digit, and "." or "," only when followed by a non-digit.
_ANSWER_COMPLETE = re.compile(r"####\s*\$?\s*[-+\u2212]?(?P<num>\d+(?:[.,]\d+)*)(?:[^\d.,]|[.,][^\d])")


BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


PROMPT_STYLES = ("gsm", "boxed")


def build_prompt(tokenizer: Any, question: str, style: str = "gsm") -> str:
    """The generation prompt: chat template with ``add_generation_prompt=True`` on one user message, for
    ``style="gsm"`` :func:`~targetsft.data.gsm.gsm_user_message` (the training format: ``#### <number>``), for
    ``"boxed"`` the question + :data:`BOXED_INSTRUCTION` (MATH-style answers, scored by their last ``\\boxed{}``)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; evaluation uses the chat format of training")
    content = gsm_user_message(question) if style == "gsm" else question + BOXED_INSTRUCTION
    msgs = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def build_prompts(tokenizer: Any, questions: Sequence[str], style: str = "gsm") -> list[str]:
    """:func:`build_prompt` for each question."""
    return [build_prompt(tokenizer, q, style) for q in questions]


def answer_complete(text: str) -> bool:
    """Whether ``text`` holds a complete ``#### <number>`` (the number followed by a character that ends it)."""
    return _ANSWER_COMPLETE.search(text) is not None


def cut_at_answer(text: str) -> str:
    """``text`` up to the end of the number of its first complete ``#### <number>`` (unchanged when there is none):
    ``"…#### 12 dollars\\n#### 13"`` → ``"…#### 12"``."""
    m = _ANSWER_COMPLETE.search(text)
    return text if m is None else text[: m.end("num")]


class AnswerStoppingCriteria:
    """Per-sequence stopping criterion for ``model.generate`` (a ``transformers.StoppingCriteria``), also driven row
    by row by the compact decode loop (:meth:`update`).

    A row is finished once its eos (any of ``eos_token_ids``) is generated, or, with ``stop_on_answer``, once the
    decoded new tokens (special tokens skipped) hold a complete ``#### <number>`` (:func:`answer_complete`). Returns
    a BoolTensor of shape ``(batch,)`` that stays True for finished rows. ``n_tokens[i]`` / ``reasons[i]`` record
    how many new tokens row ``i`` had when it finished (its last token included) and why (``"eos"`` or
    ``"answer"``); None while it runs. ``prompt_length`` is the (left-padded) prompt width, so the new tokens are
    ``input_ids[:, prompt_length:]``. ``batch_size``: the number of rows (else taken from the first call). One
    instance serves one ``generate`` call (one batch).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_length: int,
        *,
        eos_token_ids: Sequence[int] = (),
        stop_on_answer: bool = True,
        batch_size: int | None = None,
    ) -> None:
        _register_as_stopping_criteria()
        self.tokenizer = tokenizer
        self.prompt_length = int(prompt_length)
        ids = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self.eos_ids = torch.tensor(sorted(ids), dtype=torch.long)
        self.stop_on_answer = stop_on_answer
        self.done: torch.Tensor | None = None
        self.n_tokens: list[int | None] = []
        self.reasons: list[FinishReason | None] = []
        if batch_size is not None:
            self._start(batch_size)

    def _start(self, batch_size: int) -> None:
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        self.n_tokens, self.reasons = [None] * batch_size, [None] * batch_size

    def _finish(self, row: int, n: int, reason: FinishReason) -> None:
        assert self.done is not None
        self.done[row] = True
        self.n_tokens[row] = n
        self.reasons[row] = reason

    def update(self, new_tokens: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Check rows after a decode step: ``new_tokens[i]`` holds all new tokens so far (same count ``n`` for every
        row) of batch row ``rows[i]`` (default: row ``i``). Marks the rows that finish with this step's token and
        returns, on the CPU, whether each of ``rows`` is finished."""
        new = new_tokens.cpu()
        rows = list(range(new.shape[0])) if rows is None else [int(r) for r in rows]
        if self.done is None:
            self._start(max(rows, default=-1) + 1)
        assert self.done is not None
        idx = torch.tensor(rows, dtype=torch.long)
        n = new.shape[1]
        if n > 0 and rows:
            hit_eos = torch.isin(new[:, -1], self.eos_ids) & ~self.done[idx]
            for i in hit_eos.nonzero().flatten().tolist():
                self._finish(rows[i], n, "eos")
            if self.stop_on_answer:
                active = (~self.done[idx]).nonzero().flatten().tolist()
                if active:
                    texts = self.tokenizer.batch_decode(new[active], skip_special_tokens=True)
                    for i, text in zip(active, texts, strict=True):
                        if answer_complete(text):
                            self._finish(rows[i], n, "answer")
        return self.done[idx].clone()

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.done is None:
            self._start(input_ids.shape[0])
        self.update(input_ids[:, self.prompt_length :])
        assert self.done is not None
        return self.done.clone().to(input_ids.device)


def _register_as_stopping_criteria() -> None:
    """Make :class:`AnswerStoppingCriteria` an (ABC-registered) ``transformers.StoppingCriteria``; done lazily so
    that importing this module does not import transformers (the CLI imports it for its arguments)."""
    try:
        from transformers import StoppingCriteria
    except ImportError:  # pragma: no cover - generation needs transformers anyway
        return
    if not issubclass(AnswerStoppingCriteria, StoppingCriteria):
        StoppingCriteria.register(AnswerStoppingCriteria)
