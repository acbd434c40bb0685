"""The sections of a training config (``data``, ``loss``, ``teacher``, ``teachers``, ``reference``, ``lora``,
``model_init``) as dataclasses, the error a bad key or value raises, and the checks that need only a section.
:mod:`targetsft.training.config` puts them together into :class:`~targetsft.training.config.TrainConfig`."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from targetsft.losses.methods import MethodSpec


class ConfigError(ValueError):
    """A configuration key or value that is not accepted."""


def unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    """The error for ``key`` unknown in ``where``: the valid keys, and the closest one as a suggestion."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(valid)}")


@dataclass
class DataConfig:
    """Training data: a built-in name (``gsm-train``), a local JSONL/Parquet file, or a ``datasets`` name.

    ``size``: the first ``size`` records; None (the default) keeps every record of a file or dataset (``gsm-train``
    then generates its default 2,000). ``eval``: held-out records for ``eval_loss`` and the target statistics on
    them every ``train.eval_steps``: a file or dataset name, or a fraction in (0, 1) of the training records split off
    before training (chosen from ``seed``).
    ``label_noise``: fraction of the records whose final answer is made wrong (robustness studies; ``noise_kind``
    ``answer`` or ``carried``, see :mod:`targetsft.data.noise`), chosen deterministically from ``seed``.
    ``packing``: each batch's examples end to end in one row, without padding, each attending only to itself
    (:class:`~targetsft.training.dataset.Collator`); the same examples and supervised tokens per step. sdpa and
    eager attention attend through a mask as large as the packed row squared (no faster on CPU:
    ``docs/benchmarks.md``); ``flash_attention_2`` takes the sequence boundaries instead.
    """

    train: str = "gsm-train"
    size: int | None = None
    eval: str | float | None = None
    seed: int = 0
    max_length: int = 384
    overflow: str = "truncate"
    label_noise: float = 0.0
    noise_kind: str = "answer"
    packing: bool = False


@dataclass
class LossConfig:
    """The target: a registered method and its parameters; ``chunk_size`` of the fused loss (None: automatic)."""

    method: str = "sft"
    params: dict[str, Any] = field(default_factory=dict)
    chunk_size: int | None = None


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelInit:
    """How a model is loaded (``from_pretrained`` keywords). ``dtype``: ``auto`` is float32 for the student (master
    weights; the training precision is autocast) and the training precision's dtype for a frozen teacher or
    reference (bf16 where the device runs it natively, see :mod:`targetsft.runtime.precision`); or ``float32``,
    ``bfloat16``, ``float16``. ``attn_implementation``: e.g. ``sdpa``, ``eager``, ``flash_attention_2``.
    ``device_map``: where a frozen model sits (e.g. ``cuda:1``, ``auto``); the student is placed by the Trainer."""

    dtype: str = "auto"
    attn_implementation: str | None = None
    device_map: Any = None

    def from_pretrained_kwargs(self, auto_dtype: Any) -> dict[str, Any]:
        """``from_pretrained`` keywords: ``dtype`` (``auto_dtype`` for ``auto``), then ``attn_implementation`` and
        ``device_map`` when set."""
        import torch

        kwargs: dict[str, Any] = {"dtype": auto_dtype if self.dtype == "auto" else getattr(torch, self.dtype)}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs


PLACEMENTS = ("auto", "replicated", "sharded")
TEACHER_ALIGNS = ("auto", "ids", "text")
TEACHER_PROMPTS = ("same", "answer_hint", "own_template")


@dataclass
class FrozenModelInit(ModelInit):
    """A frozen teacher or reference: :class:`ModelInit` plus ``placement`` across data-parallel ranks —
    ``replicated`` (a whole copy on every rank, in ``dtype``), ``sharded`` (partitioned by DeepSpeed ZeRO-3 over
    the ranks, each layer gathered as it runs; needs a ZeRO-3 launch), ``auto`` (sharded under ZeRO-3, else
    replicated)."""

    placement: str = "auto"


@dataclass
class TeacherConfig(FrozenModelInit):
    """Teacher for kd / hybrid_kd / target_sft: a model run online, or a top-k cache from ``cache-teacher``; loaded
    as :class:`ModelInit` says.

    ``prompt``: ``same`` (the student's prompt), ``answer_hint`` (the prompt plus the final answer, read from each
    record's ``answer`` field: a privileged teacher) or ``own_template`` (the record's prompt rendered with the
    teacher's own chat template and tokenizer: an instruct teacher for a base student); the completion tokens stay
    the student's, so the supervised tokens align. ``tokenizer``: where the teacher's tokenizer is read for
    ``own_template`` and ``align`` (default ``model``; needed when training from ``cache``).

    ``align``: how the teacher's vocabulary meets the student's: ``ids`` (one token → id map, one model family),
    ``text`` (another tokenizer: the teacher reads the text with its own, positions meet where token boundaries do
    and tokens where their bytes are equal; see the Teachers page) or ``auto`` (``ids`` when the maps agree, else
    an error naming ``text``). ``align_top_k``: under ``text``, the teacher's most probable student tokens per
    position that reach the loss (the rest of its mass is completed by the student). ``min_aligned_share``: under
    ``text`` with ``model`` or ``server``, the run is refused when fewer of the supervised tokens of the first 64
    training examples meet a teacher boundary (0 accepts any teacher). ``server``: a teacher served by vLLM
    (:class:`TeacherServerConfig`), instead of ``model`` or ``cache``.
    """

    model: str | None = None
    cache: str | None = None
    server: Any = None
    prompt: str = "same"
    tokenizer: str | None = None
    align: str = "auto"
    align_top_k: int = 256
    min_aligned_share: float = 0.5


@dataclass
class TeacherServerConfig:
    """A teacher served by vLLM's OpenAI-compatible server (``target-sft serve-teacher`` starts one).

    ``url``: its address (``http://host:port``). ``model``: the served model's name (None: the only one served); it
    is also where the teacher's tokenizer is read for ``align: text`` and ``own_template`` unless
    ``teacher.tokenizer`` says otherwise, and what ``serve-teacher`` serves. ``top_k``: log-probs per position (at
    most the server's ``--max-logprobs``). ``timeout``: seconds per request; ``retries``: further tries of a failed
    one; ``workers``: requests in flight at once; ``prefetch``: sequences requested ahead of the loss at most.
    """

    url: str = ""
    model: str | None = None
    top_k: int = 64
    timeout: float = 120.0
    retries: int = 3
    workers: int = 8
    prefetch: int = 256


@dataclass
class RoutedTeacherConfig:
    """One entry of the top-level ``teachers:`` list: a teacher for the examples its selector matches.

    ``name``: how logs, ``summary.json`` and the model card call it (letters, digits, ``_``, ``-``, ``.``; not
    ``none``). ``select``: ``{field: value}`` — the records whose ``field`` equals ``value`` (or is one of the values
    of a list); several fields must all match. An example goes to the first entry that matches it, or to no teacher
    (its loss rows have none: the method's no-teacher behaviour). The source, one of: ``cache`` (a folder built by
    ``target-sft cache-teacher`` over the same training data) or ``server`` (as ``teacher.server``, read by ids).
    ``model`` (an online teacher) is not routed: build its cache or serve it.
    """

    name: str = ""
    select: Any = None
    cache: str | None = None
    server: Any = None
    model: str | None = None


@dataclass
class ReferenceConfig(FrozenModelInit):
    """Reference model for asft / sft_kl: a path, or None for a frozen copy of the initial model (in ``dtype``)."""

    model: str | None = None


@dataclass
class LoraConfig:
    """LoRA adapters (peft); ``target_modules`` as in ``peft.LoraConfig`` (``all-linear`` by default)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"


def build_section(cls: type, values: Any, where: str) -> Any:
    """The dataclass ``cls`` from the mapping ``values`` (a config section called ``where``); unknown keys refused."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise unknown_key(where, key, names)
    return cls(**values)


def server_section(server: Any, where: str) -> TeacherServerConfig:
    """``server`` (a mapping, at ``where``) as a :class:`TeacherServerConfig` with an http(s) url and positive
    counts."""
    if not isinstance(server, TeacherServerConfig):
        server = build_section(TeacherServerConfig, server, where)
    if not isinstance(server.url, str) or not server.url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url must be an http:// or https:// address, got {server.url!r}")
    for name in ("top_k", "retries", "workers", "prefetch"):
        value = getattr(server, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "retries" else 1):
            kind = "non-negative" if name == "retries" else "positive"
            raise ConfigError(f"{where}.{name} must be a {kind} integer, got {value!r}")
    if isinstance(server.timeout, bool) or not isinstance(server.timeout, (int, float)) or server.timeout <= 0:
        raise ConfigError(f"{where}.timeout must be a number of seconds > 0, got {server.timeout!r}")
    return server


def check_served_temperature(cfg: Any, spec: MethodSpec) -> None:
    """A served teacher gives log-probs at temperature 1: the method's teacher temperature must be 1."""
    temperature = float({**spec.defaults, **cfg.loss.params}.get("temperature", 1.0))
    if temperature != 1.0:
        raise ConfigError(
            f"a served teacher gives log-probs at temperature 1, but loss.params.temperature is {temperature}: "
            "train with temperature 1, or from a teacher.model or a cache built at that temperature"
        )
