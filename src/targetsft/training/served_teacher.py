"""A teacher served by vLLM's OpenAI-compatible server (``vllm serve``): its top-k prompt log-probs at the loss rows,
read over HTTP while the student trains.

:class:`TeacherServer` is the client: ``/v1/models``, ``/tokenize`` and ``/v1/completions`` with a token-id prompt and
``prompt_logprobs``, with a timeout and retries. :class:`ServedTeacher` turns a batch into requests (one per distinct
sequence the teacher reads) and their answers into the loss's top-k rows, the same rows a teacher cache built by
the vLLM engine holds (float16, rounded down).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from targetsft.losses.validation import MISSING_ID
from targetsft.training.text_alignment import AlignmentStats, TextAligner, map_topk_to_student, scatter_rows
from targetsft.training.topk_rows import IGNORE_INDEX, check_row_count, drop_unshared, round_down_fp16, stack_rows

logger = logging.getLogger(__name__)

# text whose tokens the server's tokenizer must give as the local one does (words, digits, spaces, non-ASCII)
_PROBE = "Natalia sold 48 clips in April, and half as many in May.\n  Total: 72 — ¿cuántos? 中文 😀"


class TeacherServerError(RuntimeError):
    """The teacher server cannot be reached or answers what it should not; the message names its URL."""


Row = tuple[tuple[int, ...], tuple[float, ...]]  # one position's top-k ids and log-probs, by rank


class TeacherServer:
    """A client of a vLLM OpenAI-compatible server.

    Args:
        url: the server's address, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        model: the served model's name (``--served-model-name``, else its ``--model``); None: the only one served.
        timeout: seconds one request may take; ``retries``: further tries after a failed one (connection refused,
            timeout, a 5xx answer), ``backoff`` seconds doubling between them.
    """

    def __init__(
        self, url: str, model: str | None = None, *, timeout: float = 120.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        import requests

        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._local = threading.local()
        self._requests = requests
        self.model = model if model is not None else self._only_model()

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._requests.Session()
        return session

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request, retried on a failed connection, a timeout or a 5xx answer."""
        errors = self._requests.exceptions
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._session().request(method, self.url + path, json=body, timeout=self.timeout)
            except (errors.ConnectionError, errors.Timeout) as err:
                last = f"{type(err).__name__}"
                continue
            if answer.status_code >= 500:
                last = f"HTTP {answer.status_code}: {answer.text[:200]}"
                continue
            if answer.status_code >= 400:
                status = answer.status_code
                raise TeacherServerError(f"teacher server {self.url}{path}: HTTP {status}: {answer.text[:300]}")
            return answer.json()
        tries = self.retries + 1
        raise TeacherServerError(f"teacher server {self.url}: no answer to {path} after {tries} tries ({last})")

    def models(self) -> list[dict[str, Any]]:
        """The served models (``/v1/models``)."""
        return list(self._call("GET", "/v1/models").get("data", []))

    def _only_model(self) -> str:
        served = [m["id"] for m in self.models()]
        if len(served) != 1:
            raise TeacherServerError(f"teacher server {self.url} serves {served}: name one as teacher.server.model")
        return served[0]

    def max_model_len(self) -> int | None:
        """The served model's longest sequence, as ``/v1/models`` reports it."""
        for m in self.models():
            if m["id"] == self.model:
                return m.get("max_model_len")
        served = [m["id"] for m in self.models()]
        raise TeacherServerError(f"teacher server {self.url} does not serve {self.model!r} (it serves {served})")

    def tokenize(self, text: str) -> list[int]:
        """The server's token ids of ``text``, without special tokens."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return list(self._call("POST", "/tokenize", body)["tokens"])

    def prompt_logprobs(self, seq: Sequence[int], k: int) -> list[Row]:
        """Per position ``p = 0 … len − 1`` of ``seq``, the top-``k`` of ``log p(· | seq[: p + 1])`` (one token is
        appended so that the last position's distribution is also returned)."""
        body = {
            "model": self.model,
            "prompt": [*map(int, seq), int(seq[-1])],
            "max_tokens": 1,
            "prompt_logprobs": int(k),
            "temperature": 0.0,
        }
        choice = self._call("POST", "/v1/completions", body)["choices"][0]
        rows = []
        for entry in choice["prompt_logprobs"][1:]:
            top = sorted((v["rank"], int(t), float(v["logprob"])) for t, v in entry.items() if v["rank"] <= k)[:k]
            rows.append((tuple(t for _, t, _ in top), tuple(v for _, _, v in top)))
        if len(rows) != len(seq):
            raise TeacherServerError(f"teacher server {self.url}: {len(rows)} rows of log-probs for {len(seq)} tokens")
        return rows


@dataclass
class _Plan:
    """The sequences a batch's teacher reads and, per loss row, (sequence, position) or None (no teacher)."""

    seqs: list[tuple[int, ...]]
    picks: list[tuple[int, int] | None]


class ServedTeacher:
    """A :class:`~targetsft.training.topk_rows.TopKTeacher` read from a :class:`TeacherServer`: per loss row, the
    served model's top-``k`` log-probs (temperature 1) on the student's ids.

    Args:
        server: the client.
        k: top-k per row (at most the server's ``--max-logprobs``).
        shared_vocab_size: the student's ids shared with the teacher (ids at or past it are dropped and the row
            renormalised, as in a cache); None: all.
        aligner: a :class:`~targetsft.training.text_alignment.TextAligner` for a teacher of another tokenizer (the
            batch's ``teacher_input_ids``/``teacher_rows``, made here when the collator did not); its ``top_k`` caps
            the student tokens per row. None: the teacher reads the student's ids (or the batch's own
            ``teacher_input_ids``/``teacher_labels`` for a prompt of its own).
        workers: requests in flight at once; ``max_prefetch``: sequences requested ahead of the loss at most.
    """

    temperature = 1.0

    def __init__(
        self,
        server: TeacherServer,
        *,
        k: int = 64,
        shared_vocab_size: int | None = None,
        aligner: TextAligner | None = None,
        workers: int = 8,
        max_prefetch: int = 256,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.server, self.k, self.aligner = server, int(k), aligner
        self._shared = shared_vocab_size
        self.max_prefetch = int(max_prefetch)
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="teacher-server")
        self._pending: OrderedDict[tuple[int, ...], Future[list[Row]]] = OrderedDict()
        self._lock = threading.Lock()
        self.window, self.total = AlignmentStats(), AlignmentStats()
        self.requests = 0

    @property
    def shared_vocab_size(self) -> int | None:
        return self._shared

    def check(self, tokenizer: Any) -> None:
        """The server serves :attr:`TeacherServer.model` and tokenizes as ``tokenizer`` does (the student's for a
        teacher by ids, the teacher's own read through the text), else a :class:`TeacherServerError`."""
        self.server.max_model_len()
        local = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
        served = self.server.tokenize(_PROBE)
        if served != local:
            raise TeacherServerError(
                f"teacher server {self.server.url}: {self.server.model!r} tokenizes text otherwise than the tokenizer "
                f"given ({served[:8]}... vs {local[:8]}...): serve the teacher this run expects, or read it by text "
                "(teacher.align: text, teacher.tokenizer)"
            )

    def _plan(self, batch: Mapping[str, Any]) -> _Plan:
        if self.aligner is not None and "teacher_rows" not in batch:
            batch = {**batch, **self.aligner.batch(batch["input_ids"], batch["labels"], batch.get("position_ids"))}
        if "position_ids" in batch and "teacher_input_ids" not in batch:
            raise ValueError("a served teacher reads each example's own sequence: give it padded batches, not packed")
        if "teacher_rows" in batch:  # read through the text: flat positions into the teacher's padded batch
            seqs = _sequences(batch["teacher_input_ids"], batch.get("teacher_attention_mask"))
            width = batch["teacher_input_ids"].shape[1]
            picks = [(r // width, r % width) if r >= 0 else None for r in batch["teacher_rows"].tolist()]
            return _Plan(seqs, picks)
        own = "teacher_input_ids" in batch  # a prompt of its own, then the student's completion
        ids = batch["teacher_input_ids"] if own else batch["input_ids"]
        labels = batch["teacher_labels"] if own else batch["labels"]
        seqs = _sequences(ids, batch.get("teacher_attention_mask" if own else "attention_mask"))
        where = (labels[:, 1:] != IGNORE_INDEX).nonzero().tolist()
        return _Plan(seqs, [(b, t) for b, t in where])  # label t + 1 is predicted at position t

    def _request(self, seq: tuple[int, ...]) -> Future[list[Row]]:
        future = self._pending.get(seq)
        if future is None:
            future = self._pool.submit(self.server.prompt_logprobs, seq, self.k)
            self._pending[seq] = future
            self.requests += 1
        return future

    def prefetch(self, batch: dict[str, Any]) -> None:
        """Start the requests of ``batch`` (up to ``max_prefetch`` sequences ahead); its rows are then waited for
        by :meth:`batch_rows`. A teacher read through the text adds the batch's ``teacher_input_ids`` /
        ``teacher_rows`` to it here, so that they are made once."""
        if self.aligner is not None and "teacher_rows" not in batch:
            batch.update(self.aligner.batch(batch["input_ids"], batch["labels"], batch.get("position_ids")))
        seqs = self._plan(batch).seqs
        with self._lock:
            for seq in seqs:
                if len(self._pending) >= self.max_prefetch:
                    break
                self._request(seq)

    def batch_rows(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The batch's top-k rows (ids int64 and log-probs float32, rounded down to float16 values as a cache
        stores them), one per loss row; rows without a teacher boundary have ids ``MISSING_ID``."""
        plan = self._plan(batch)
        with self._lock:
            futures = [self._request(seq) for seq in plan.seqs]
        answers = [f.result() for f in futures]
        with self._lock:
            for seq in plan.seqs:
                self._pending.pop(seq, None)
        ids, lps = self._rows(plan, answers)
        check_row_count(ids, batch["labels"], "the served teacher", "the batch's teacher inputs do not match it")
        return ids, lps

    def _rows(self, plan: _Plan, answers: list[list[Row]]) -> tuple[Tensor, Tensor]:
        present = torch.tensor([x is not None for x in plan.picks], dtype=torch.bool)
        rows = torch.where(present, 0, MISSING_ID)
        t_ids, t_lps = stack_rows([answers[b][p] for b, p in (x for x in plan.picks if x is not None)], self.k)
        if self.aligner is None:
            if self._shared is not None:
                t_ids, t_lps = drop_unshared(t_ids.clamp(min=0), t_lps, self._shared)
            ids, lps = t_ids.long(), t_lps
        else:
            k = min(self.aligner.top_k, self.aligner.token_map.student_vocab)
            ids, lps, mass = map_topk_to_student(t_ids, t_lps, self.aligner.token_map, k)
            if torch.is_grad_enabled():  # a training step: its aligned shares
                self.window.add(rows, mass)
                self.total.add(rows, mass)
        return scatter_rows(rows, ids, round_down_fp16(lps).float())

    def take_shares(self) -> dict[str, float]:
        """Under text alignment, the shares of loss rows with a teacher boundary and of the teacher's top-k mass on
        student tokens since the last call (``aligned_mass_topk``: counted over the ``k`` tokens served)."""
        if self.aligner is None:
            return {}
        shares, self.window = self.window.shares(), AlignmentStats()
        return {"aligned_positions": shares["aligned_positions"], "aligned_mass_topk": shares["aligned_mass"]}

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` records of the served teacher."""
        out: dict[str, Any] = {"url": self.server.url, "model": self.server.model, "k": self.k}
        out["requests"] = self.requests
        return out

    def alignment_summary(self) -> dict[str, Any] | None:
        """Under text alignment, what ``summary.json`` records as ``teacher_alignment``: the token map's counts,
        the run's aligned shares (the mass counted over the served top-k) and ``top_k``; else None."""
        if self.aligner is None:
            return None
        shares = self.total.shares()
        return {
            "align": "text",
            **self.aligner.token_map.to_dict(),
            "aligned_positions": shares["aligned_positions"],
            "aligned_mass_topk": shares["aligned_mass"],
            "top_k": self.aligner.top_k,
        }

    def close(self) -> None:
        """Stop the request threads (requests in flight are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _sequences(ids: Tensor, mask: Tensor | None) -> list[tuple[int, ...]]:
    """Each row of a right-padded batch without its padding (a row padded on the left is refused)."""
    rows = ids.tolist()
    if mask is None:
        return [tuple(r) for r in rows]
    lengths = mask.sum(-1).tolist()
    if bool((mask[:, :-1] < mask[:, 1:]).any()):
        raise ValueError("a served teacher reads right-padded batches (padding_side='right')")
    return [tuple(r[:n]) for r, n in zip(rows, lengths)]


class ServedEngine:
    """A :class:`TeacherServer` as the teacher cache builder's vLLM engine (``cache-teacher`` from
    ``teacher.server``): :meth:`prompt_logprobs` of several sequences, requested concurrently.

    Args:
        server: the client; ``max_logprobs``: the largest ``k`` asked (the server's ``--max-logprobs``).
        config: the served model's transformers config (its vocabulary size and the cache's identity), read from
            where the model's files are (``teacher.server.model``, a folder or a hub id).
    """

    is_vllm_engine = True
    engine_name = "server"

    def __init__(self, server: TeacherServer, *, max_logprobs: int, config: Any, workers: int = 8) -> None:
        self.server, self.max_logprobs, self.config = server, int(max_logprobs), config
        self.dtype = str(getattr(config, "dtype", None) or "served").removeprefix("torch.")
        self.name_or_path = server.model
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="teacher-server")

    def prompt_logprobs(self, seqs: Sequence[Sequence[int]], k: int) -> list[list[tuple[tuple[int, ...], ...]]]:
        """As :meth:`~targetsft.runtime.vllm_engine.VLLMEngine.prompt_logprobs`: per sequence, per position
        ``t = 1 … len − 1``, the top-``k`` ids and log-probs after tokens ``< t`` (the label's log-prob is not
        served: NaN)."""
        answers = self._pool.map(lambda s: self.server.prompt_logprobs(s, k), [list(s) for s in seqs])
        return [[(ids, lps, float("nan")) for ids, lps in rows[:-1]] for rows in answers]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
