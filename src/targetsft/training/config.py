"""Training configuration: a YAML file plus ``key=value`` overrides, checked strictly.

Unknown keys anywhere (including the method's parameters and ``train:``, which holds
``transformers.TrainingArguments`` fields) are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from targetsft.data.noise import NOISE_KINDS
from targetsft.losses.methods import MethodSpec, get_method
from targetsft.runtime.precision import Precision, normalize, resolve_precision
from targetsft.training.config_sections import (  # the sections, re-exported: the config's one import path
    MODEL_DTYPES,
    PLACEMENTS,
    TEACHER_ALIGNS,
    TEACHER_PROMPTS,
    ConfigError,
    DataConfig,
    FrozenModelInit,
    LoraConfig,
    LossConfig,
    ModelInit,
    ReferenceConfig,
    RoutedTeacherConfig,
    TeacherConfig,
    TeacherServerConfig,
    build_section,
    check_served_temperature,
    server_section,
    unknown_key,
)
from targetsft.training.routed_teacher import check_routed_teachers, routed_teacher_entries

__all__ = [
    "ConfigError",
    "DataConfig",
    "FrozenModelInit",
    "LoraConfig",
    "LossConfig",
    "MODEL_DTYPES",
    "ModelInit",
    "PLACEMENTS",
    "ReferenceConfig",
    "RoutedTeacherConfig",
    "TEACHER_ALIGNS",
    "TEACHER_PROMPTS",
    "TRAIN_DEFAULTS",
    "TRAIN_RESERVED",
    "TeacherConfig",
    "TeacherServerConfig",
    "TrainConfig",
    "build_section",
    "check_inputs",
    "config_from_dict",
    "load_config",
    "load_yaml",
    "parse_override",
    "unknown_key",
]

# TrainingArguments values targetsft sets unless the config says otherwise (pilot-sized, CPU friendly).
TRAIN_DEFAULTS: dict[str, Any] = {
    "max_steps": 100,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2.0e-5,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 0,
    "logging_steps": 5,
    "save_steps": 50,
    "save_total_limit": 2,
    "report_to": ["tensorboard"],
}
# TrainingArguments that the trainer owns and a config may not set.
TRAIN_RESERVED = ("output_dir", "remove_unused_columns", "label_names")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; read it as a float, as YAML 1.2 and every user does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML as configs are read (``_Loader``: exponents without a dot, such as ``2e-5``, are numbers)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class TrainConfig:
    """Everything ``target-sft train`` needs. ``model: null`` is the embedded SmolLM2-135M-Instruct.

    ``precision``: ``auto`` (bf16 where the device runs it natively, fp16 on a GPU with only that, else fp32; see
    :mod:`targetsft.runtime.precision`), ``bf16``, ``fp16`` or ``fp32``. ``train.bf16``/``train.fp16`` are still read as
    an explicit choice when ``precision`` is ``auto``. ``model_init``: how the student loads (:class:`ModelInit`,
    no ``device_map``). ``teachers``: routed teachers (:class:`RoutedTeacherConfig`), one per kind of example,
    instead of ``teacher.model``/``cache``/``server``. ``snapshot_steps``: optimizer steps after which the model
    (weights and tokenizer, no optimizer state) is saved to ``<output_dir>/snapshots/step-N`` and kept, e.g. to use
    it later as a teacher.
    """

    model: str | None = None
    model_init: ModelInit = field(default_factory=ModelInit)
    precision: str = "auto"
    output_dir: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[RoutedTeacherConfig] = field(default_factory=list)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig | None = None
    train: dict[str, Any] = field(default_factory=dict)
    snapshot_steps: list[int] = field(default_factory=list)

    def requested_precision(self) -> str:
        """``precision``, or what ``train.bf16``/``train.fp16`` ask for when it is ``auto``."""
        if self.precision != "auto":
            return self.precision
        if self.train.get("bf16"):
            return "bf16"
        if self.train.get("fp16"):
            return "fp16"
        return "fp32" if "bf16" in self.train or "fp16" in self.train else "auto"

    def resolved_precision(self) -> Precision:
        """The precision this config trains at on this machine
        (:func:`targetsft.runtime.precision.resolve_precision`)."""
        import torch

        cpu = self.train.get("use_cpu") or not torch.cuda.is_available()
        return resolve_precision(self.requested_precision(), "cpu" if cpu else "cuda")

    def training_arguments(self, precision: Precision | None = None) -> dict[str, Any]:
        """Keyword arguments for ``transformers.TrainingArguments``: ``bf16``/``fp16`` from the resolved precision,
        ``use_cpu`` and the gloo backend when no accelerator is present (so that bf16 autocast also runs on a CPU)."""
        import torch

        precision = precision or self.resolved_precision()
        defaults = dict(TRAIN_DEFAULTS)
        if "num_train_epochs" in self.train and "max_steps" not in self.train:
            del defaults["max_steps"]  # epochs asked for: the step cap would override them
        args = {**defaults, **self.train, "output_dir": self.output_dir, "remove_unused_columns": False}
        if self.data.eval is not None:
            args.setdefault("eval_strategy", "steps")
            args.setdefault("prediction_loss_only", True)
        args.update(precision.training_flags)
        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            args.setdefault("use_cpu", True)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched on several processes: the CPU's backend
                args.setdefault("ddp_backend", "gloo")  # (accelerate picks it for DDP; DeepSpeed needs it said)
        return args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "model_init": ModelInit,
    "data": DataConfig,
    "loss": LossConfig,
    "teacher": TeacherConfig,
    "reference": ReferenceConfig,
    "lora": LoraConfig,
}


def _check_train_args(train: dict[str, Any]) -> None:
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    for key, value in train.items():
        if key in TRAIN_RESERVED:
            raise ConfigError(f"train.{key} is set by targetsft; use the top-level output_dir for the output folder")
        if key not in fields:
            raise unknown_key("train (transformers.TrainingArguments)", key, sorted(fields))
        train[key] = _scalar(f"train.{key}", value, fields[key].type)


def _scalar(where: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against a bool/int/float field type (a number written as text, ``"2e-5"``, is converted);
    values of other field types are left to transformers."""
    args = typing.get_args(annotation) or (annotation,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (bool, int, float) or (value is None and type(None) in args):
        return value
    kind = kinds[0]
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is bool:
        ok = isinstance(value, bool)
    else:  # a bool is an int to Python, not a number here; an int is a number for a float field
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        name = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{where} must be {name}, got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A checked :class:`TrainConfig` from plain data (what a YAML file holds)."""
    if raw is None:
        raw = {}
    top = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in raw:
        if key not in top:
            raise unknown_key("the config", key, top)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = None if (key == "lora" and value is None) else build_section(_SECTIONS[key], value or {}, key)
        elif key == "teachers":
            kwargs[key] = routed_teacher_entries(value)
        else:
            kwargs[key] = value
    cfg = TrainConfig(**kwargs)
    _check_precision(cfg)
    spec = _check_loss(cfg)
    _check_models(cfg)
    _check_data(cfg)
    _check_teacher(cfg, spec)
    return cfg


def _check_precision(cfg: TrainConfig) -> None:
    """``train`` is a mapping of checked TrainingArguments fields; ``precision`` and ``train.bf16/fp16`` agree."""
    if not isinstance(cfg.train, dict):
        raise ConfigError("train must be a mapping of transformers.TrainingArguments fields")
    _check_train_args(cfg.train)
    try:
        cfg.precision = normalize(cfg.precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.precision != "auto" and ("bf16" in cfg.train or "fp16" in cfg.train):
        raise ConfigError(f"precision {cfg.precision!r} and train.bf16/train.fp16 both set: keep one of them")
    if cfg.train.get("bf16") and cfg.train.get("fp16"):
        raise ConfigError("train.bf16 and train.fp16 are both true: choose one (or set precision)")


def _check_loss(cfg: TrainConfig) -> MethodSpec:
    """``loss.method`` is registered and ``loss.params`` are its own (the trainer's, e.g. ``refresh``, included)."""
    try:
        spec = get_method(cfg.loss.method)
    except ValueError as err:
        raise ConfigError(f"loss.method: {err}") from None
    try:
        loss_params, _ = spec.split_params(cfg.loss.params)
        spec.target(**loss_params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss.params: {err}") from None
    return spec


def _check_models(cfg: TrainConfig) -> None:
    """Loading options of the student, teacher and reference; ``snapshot_steps``."""
    for where, init in (("model_init", cfg.model_init), ("teacher", cfg.teacher), ("reference", cfg.reference)):
        if init.dtype not in MODEL_DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {MODEL_DTYPES}, got {init.dtype!r}")
    for where, init in (("teacher", cfg.teacher), ("reference", cfg.reference)):
        if init.placement not in PLACEMENTS:
            raise ConfigError(f"{where}.placement must be one of {PLACEMENTS}, got {init.placement!r}")
        if init.placement == "sharded" and init.device_map is not None:
            raise ConfigError(f"{where}: a device_map and placement 'sharded' exclude each other; choose one")
    if cfg.model_init.device_map is not None:
        raise ConfigError("model_init.device_map: the Trainer places the student (use accelerate for several devices)")
    steps = cfg.snapshot_steps
    if not isinstance(steps, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in steps):
        raise ConfigError(f"snapshot_steps must be a list of positive step numbers, got {steps!r}")


def _check_data(cfg: TrainConfig) -> None:
    """The ``data`` section's sizes, held-out set, overflow and label noise."""
    size, held_out = cfg.data.size, cfg.data.eval
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"data.size must be a positive integer or null (every record), got {size!r}")
    fraction = isinstance(held_out, (int, float)) and not isinstance(held_out, bool)
    if held_out is not None and not isinstance(held_out, str) and not (fraction and 0.0 < held_out < 1.0):
        raise ConfigError(f"data.eval must be a file, a dataset name or a fraction in (0, 1), got {held_out!r}")
    if held_out is not None and cfg.teacher.cache:
        raise ConfigError(
            "data.eval with teacher.cache: the cache holds the training examples only; use teacher.model for eval_loss"
        )
    if cfg.data.overflow not in ("truncate", "drop"):
        raise ConfigError(f"data.overflow must be 'truncate' or 'drop', got {cfg.data.overflow!r}")
    noise = cfg.data.label_noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
        raise ConfigError(f"data.label_noise must be a fraction in [0, 1], got {noise!r}")
    if cfg.data.noise_kind not in NOISE_KINDS:
        raise ConfigError(f"data.noise_kind must be one of {NOISE_KINDS}, got {cfg.data.noise_kind!r}")


def _check_teacher(cfg: TrainConfig, spec: MethodSpec) -> None:
    """The teacher (and reference) sections agree with each other, with packing and with what the method needs."""
    if cfg.teacher.prompt not in TEACHER_PROMPTS:
        raise ConfigError(f"teacher.prompt must be one of {TEACHER_PROMPTS}, got {cfg.teacher.prompt!r}")
    if cfg.data.packing and cfg.teacher.prompt != "same":
        raise ConfigError(
            f"data.packing with teacher.prompt {cfg.teacher.prompt}: the teacher reads sequences of its own, which "
            "are not packed; use teacher.prompt same or data.packing false"
        )
    given = [k for k in ("model", "cache", "server") if getattr(cfg.teacher, k)]
    if len(given) > 1:
        raise ConfigError(f"give one of teacher.model, teacher.cache and teacher.server, not {' and '.join(given)}")
    if cfg.teacher.server is not None:
        _check_teacher_server(cfg, spec)
    if cfg.teacher.align not in TEACHER_ALIGNS:
        raise ConfigError(f"teacher.align must be one of {TEACHER_ALIGNS}, got {cfg.teacher.align!r}")
    top_k = cfg.teacher.align_top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"teacher.align_top_k must be a positive integer, got {top_k!r}")
    least = cfg.teacher.min_aligned_share
    if isinstance(least, bool) or not isinstance(least, (int, float)) or not 0.0 <= least <= 1.0:
        raise ConfigError(f"teacher.min_aligned_share must be a fraction in [0, 1], got {least!r}")
    needs = spec.needs
    if cfg.teachers:
        check_routed_teachers(cfg, spec, given)
    elif "teacher" in needs and not given:
        raise ConfigError(
            f"method {cfg.loss.method!r} needs a teacher: set teacher.model, teacher.cache, teacher.server or teachers"
        )
    if "teacher" not in needs and given:
        raise ConfigError(f"method {cfg.loss.method!r} does not use a teacher; remove teacher.{given[0]}")
    if spec.ref_model == "snapshot" and cfg.reference != ReferenceConfig():
        raise ConfigError(
            f"{cfg.loss.method}'s reference is π_old, an exact copy of the student: remove the reference section"
        )


def _check_teacher_server(cfg: TrainConfig, spec: MethodSpec) -> None:
    """``teacher.server`` as a :class:`TeacherServerConfig` with an http(s) url and positive counts; the method's
    teacher temperature is 1 (the server gives log-probs at 1) and batches are not packed."""
    server = cfg.teacher.server = server_section(cfg.teacher.server, "teacher.server")
    check_served_temperature(cfg, spec)
    if cfg.data.packing:
        raise ConfigError("a served teacher reads each example's own sequence: set data.packing false")
    if cfg.teacher.align == "text" and not (server.model or cfg.teacher.tokenizer):
        raise ConfigError(
            "a served teacher read by text needs its tokenizer: set teacher.server.model or teacher.tokenizer"
        )


def check_inputs(cfg: TrainConfig) -> None:
    """Everything a training config points to, before any model loads: its models, its data and its teacher cache
    (an :class:`~targetsft.runtime.inputs.InputError` naming the first that cannot be used)."""
    from targetsft.data.sft import check_source
    from targetsft.runtime.inputs import check_model
    from targetsft.training.teacher_cache.read import check_cache_folder

    check_model(cfg.model)
    check_model(cfg.teacher.model, "teacher.model")
    check_model(cfg.reference.model, "reference.model")
    if cfg.teacher.cache:
        check_cache_folder(cfg.teacher.cache)
    for entry in cfg.teachers:
        if entry.cache:
            check_cache_folder(entry.cache)
    check_source(cfg.data.train, cfg.data.size, cfg.data.seed)
    if isinstance(cfg.data.eval, str):
        check_source(cfg.data.eval)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. loss.params.eta=0.25)")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key")
    return path, load_yaml(value) if value.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = load_yaml(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return config_from_dict(raw)
