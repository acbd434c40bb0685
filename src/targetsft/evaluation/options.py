"""How a set is evaluated, as one object each, carried from the command line (``target-sft eval``) and the experiment
grid's eval specs down to the engines: :class:`DecodeOptions` for generative sets, :class:`ChoiceOptions` for
multiple-choice sets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class DecodeOptions:
    """How a generative set is decoded.

    Attributes:
        samples: k samples per problem (Average@k, pass@k).
        temperature: sampling temperature; None: 0 (greedy) for one sample, else 1.0.
        top_p: nucleus sampling mass (sampled runs only).
        greedy: also report greedy accuracy (its own greedy pass when the samples are not greedy).
        max_new_tokens: the generation cap per sample.
        batch_size: prompts per batch.
        stop_on_answer: stop a row once its ``#### n`` is complete (``prompt="gsm"`` only).
        seed: the sampling seed.
        prompt: ``"gsm"`` (``#### <number>``) or ``"boxed"`` (the last ``\\boxed{}``, generated to eos).
        engine: ``"compact"``, ``"hf"``, ``"vllm"`` or ``"auto"`` (see :func:`~targetsft.evaluation.engines.
            generate_detailed`).
    """

    samples: int = 1
    temperature: float | None = None
    top_p: float = 1.0
    greedy: bool = True
    max_new_tokens: int = 256
    batch_size: int = 32
    stop_on_answer: bool = True
    seed: int = 0
    prompt: str = "gsm"
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(
                "samples > 1 with temperature 0 would give k identical greedy samples; set temperature > 0"
            )

    @property
    def sampling_temperature(self) -> float:
        """``temperature``, or its default: 0 for one sample, 1.0 for several."""
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.samples == 1 else 1.0

    def with_(self, **changes: Any) -> DecodeOptions:
        """A copy with ``changes`` (field names; an unknown one is a TypeError)."""
        return dataclasses.replace(self, **changes) if changes else self


@dataclass(frozen=True)
class ChoiceOptions:
    """How a multiple-choice set is scored: ``batch_size`` sequences per forward; ``normalize``: the choice's
    log-likelihood summed (``"sum"``) or averaged over its tokens (``"mean"``)."""

    batch_size: int = 16
    normalize: Literal["mean", "sum"] = "mean"
