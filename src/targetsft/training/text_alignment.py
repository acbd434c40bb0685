"""A teacher with another tokenizer, read through the text (``teacher.align: text``).

The teacher reads the student's text with its own tokenizer. A student position gets the teacher's next-token
distribution where a teacher token ends exactly at the student's prefix end (byte offsets), and that distribution
reaches the student's vocabulary through tokens of equal bytes (:class:`TokenMap`). What maps to no student token,
and what lies past the top ``k``, is completed by the student (``tail='student'``); a position with no boundary has
no teacher (its row's ids are all ``MISSING_ID``: π_T = sg p_θ there).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from targetsft.losses.distributions import LMHead, TopK
from targetsft.losses.validation import MISSING_ID
from targetsft.training.fused_forward import (
    IGNORE_INDEX,
    LossBatch,
    gathered_head,
    hidden_states,
    input_device,
    lm_head,
    moved_to,
    project,
)


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's tokens spell bytes in GPT-2's printable alphabet (``Ġ`` for a space)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Each id's text as bytes (None for an id no token has): byte-level tokens through GPT-2's byte alphabet;
    sentencepiece tokens with ``▁`` as a space and ``<0xNN>`` as that byte; added and special tokens as their content
    (so ``<|im_end|>`` reads as those 10 characters)."""
    from targetsft.training.vocabulary import id_to_token

    tokens = id_to_token(tokenizer)
    added = {int(i): str(t.content) for i, t in dict(getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}
    decoder = _byte_decoder() if _byte_level(tokenizer) else None
    out: list[bytes | None] = []
    for i, token in enumerate(tokens):
        if token is None:
            out.append(None)
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif decoder is not None:
            out.append(bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode())
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out.append(bytes([int(token[3:5], 16)]))
        else:
            out.append(token.replace("▁", " ").encode("utf-8"))
    return out


@dataclass
class TokenMap:
    """The teacher's tokens on the student's vocabulary: ``student_of[t]`` is the student id whose bytes equal
    teacher token ``t``'s (−1: none), plus the teacher's eos on the student's eos. Several teacher tokens may map to
    one student token (their mass adds up)."""

    student_of: list[int]
    student_vocab: int
    mapped: int  # teacher tokens with a student token of equal bytes
    covered: int  # student tokens that some teacher token maps to
    _tensors: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def student_ids(self, device: torch.device | str, width: int = 0) -> Tensor:
        """``student_of`` as a tensor on ``device`` (kept), at least ``width`` long: the teacher's lm_head rows past
        its tokens (padding) map to nothing."""
        key = (torch.device(device), max(width, len(self.student_of)))
        if key not in self._tensors:
            table = self.student_of + [-1] * (key[1] - len(self.student_of))
            self._tensors[key] = torch.tensor(table, dtype=torch.long, device=key[0])
        return self._tensors[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_tokens": len(self.student_of),
            "student_tokens": self.student_vocab,
            "teacher_tokens_mapped": self.mapped,
            "student_tokens_covered": self.covered,
        }


def map_tokens(tokenizer: Any, teacher_tokenizer: Any) -> TokenMap:
    """:class:`TokenMap` from the student's ``tokenizer`` to ``teacher_tokenizer`` by equal bytes
    (:func:`token_bytes`)."""
    mine, theirs = token_bytes(tokenizer), token_bytes(teacher_tokenizer)
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(mine):
        if b and b not in by_bytes:
            by_bytes[b] = i
    student_of = [by_bytes.get(b, -1) if b else -1 for b in theirs]
    eos, t_eos = getattr(tokenizer, "eos_token_id", None), getattr(teacher_tokenizer, "eos_token_id", None)
    if eos is not None and t_eos is not None and 0 <= t_eos < len(student_of) and student_of[t_eos] < 0:
        student_of[t_eos] = int(eos)
    mapped = [s for s in student_of if s >= 0]
    return TokenMap(student_of, len(mine), len(mapped), len(set(mapped)))


def _valid_utf8_prefix(data: bytes) -> str:
    """The longest prefix of ``data`` that is UTF-8 text (a truncated sequence may end inside a character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        return data[: err.start].decode("utf-8")


def boundary_rows(
    student_bytes: Sequence[bytes], supervised: Sequence[bool], teacher_bytes: Sequence[bytes | None]
) -> list[int]:
    """For each supervised student token (in order), how many of the teacher's tokens end exactly where the
    student's prefix before it ends (−1: no teacher token ends there).

    ``student_bytes``/``teacher_bytes``: the two tokenizations of one text, token by token; the teacher's are read
    only while they spell the text (a token with no bytes, or other bytes, ends the comparison)."""
    text = b"".join(student_bytes)
    ends: dict[int, int] = {0: 0}  # byte offset -> teacher tokens consumed when a token ends there (the last one)
    at = 0
    for n, b in enumerate(teacher_bytes, start=1):
        if b is None or text[at : at + len(b)] != b:
            break
        at += len(b)
        ends[at] = n
    rows, offset = [], 0
    for b, wanted in zip(student_bytes, supervised):
        if wanted:
            rows.append(ends.get(offset, -1))
        offset += len(b)
    return rows


def without_dummy_prefix(teacher_bytes: list[bytes | None], text: bytes) -> list[bytes | None]:
    """The teacher's tokens of ``text`` without the space a sentencepiece tokenizer puts before a text's first word
    (``add_dummy_prefix``: ``"The"`` read as ``"▁The"``), which the text does not hold."""
    first = teacher_bytes[0] if teacher_bytes else None
    if first and first.startswith(b" ") and not text.startswith(b" ") and text.startswith(first[1:]):
        return [first[1:], *teacher_bytes[1:]]
    return teacher_bytes


@dataclass
class AlignmentStats:
    """Sums over loss rows, left where they were computed until read: rows, rows with a teacher boundary, and the
    teacher's mass that maps onto student tokens at those rows."""

    rows: float | Tensor = 0.0
    aligned: float | Tensor = 0.0
    mass: float | Tensor = 0.0

    def add(self, rows: Tensor, mass: Tensor) -> None:
        self.rows = self.rows + rows.numel()
        self.aligned = self.aligned + (rows >= 0).sum()
        self.mass = self.mass + mass.double().sum()

    def shares(self) -> dict[str, float]:
        """``aligned_positions``: the share of loss rows with a teacher; ``aligned_mass``: the mean share of the
        teacher's probability that maps onto student tokens, over those rows."""
        rows, aligned, mass = (float(v) for v in (self.rows, self.aligned, self.mass))
        return {
            "aligned_positions": aligned / rows if rows else 0.0,
            "aligned_mass": mass / aligned if aligned else 0.0,
        }


@dataclass
class TextAligner:
    """Builds what an online teacher of another tokenizer reads for each example, and where its rows go.

    ``student``/``teacher``: the two tokenizers; ``token_map``: :func:`map_tokens` of them; ``top_k``: the aligned
    teacher's most probable student tokens that reach the loss (the rest completed by the student)."""

    student: Any
    teacher: Any
    token_map: TokenMap
    top_k: int = 256
    temperature: float = 1.0  # the loss's teacher temperature, applied here (the loss then reads top-k rows at 1)
    window: AlignmentStats = field(default_factory=AlignmentStats, repr=False)  # since the last log
    total: AlignmentStats = field(default_factory=AlignmentStats, repr=False)  # over the run
    _student_bytes: list[bytes | None] = field(default_factory=list, repr=False)
    _teacher_bytes: list[bytes | None] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"teacher.align_top_k must be >= 1, got {self.top_k}")
        self._student_bytes = token_bytes(self.student)
        self._teacher_bytes = token_bytes(self.teacher)

    @classmethod
    def build(cls, tokenizer: Any, teacher_tokenizer: Any, top_k: int = 256) -> TextAligner:
        """The aligner of the student's ``tokenizer`` with ``teacher_tokenizer``."""
        return cls(tokenizer, teacher_tokenizer, map_tokens(tokenizer, teacher_tokenizer), top_k)

    @property
    def teacher_pad_id(self) -> int:
        pad = getattr(self.teacher, "pad_token_id", None)
        pad = pad if pad is not None else getattr(self.teacher, "eos_token_id", None)
        return int(pad) if pad is not None else 0

    def take_temperature(self, method: Any, params: dict[str, Any] | None) -> dict[str, Any]:
        """``params`` with the method's teacher ``temperature`` moved here (applied to the teacher's logits before
        they are mapped) and 1.0 left for the loss, which reads the mapped rows as top-k."""
        from targetsft.losses.methods import get_method

        params = dict(params or {})
        spec = get_method(method) if isinstance(method, str) else None
        if spec is not None and "temperature" in spec.params:
            self.temperature = float(params.get("temperature", spec.defaults.get("temperature", 1.0)))
            params["temperature"] = 1.0
        return params

    def record(self, rows: Tensor, mass: Tensor) -> None:
        """Count a training batch's loss ``rows`` (−1: no teacher) and the mapped ``mass`` of its aligned ones."""
        self.window.add(rows, mass)
        self.total.add(rows, mass)

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` records: ``align``, the token map's counts, the run's aligned shares and ``top_k``."""
        return {"align": "text", **self.token_map.to_dict(), **self.total.shares(), "top_k": self.top_k}

    def take_shares(self) -> dict[str, float]:
        """The shares since the last call (:meth:`AlignmentStats.shares`)."""
        shares, self.window = self.window.shares(), AlignmentStats()
        return shares

    def read_prompt(self, student_prompt_ids: Sequence[int]) -> list[int]:
        """The teacher's tokens of a student prompt's text (its tokens' bytes; special tokens as their content),
        with what the teacher's tokenizer adds itself (e.g. a BOS)."""
        text = _valid_utf8_prefix(b"".join(self._bytes(student_prompt_ids)))
        return list(self.teacher(text)["input_ids"]) if text else []

    def _bytes(self, ids: Sequence[int]) -> list[bytes]:
        table = self._student_bytes
        return [(table[i] if 0 <= i < len(table) else None) or b"" for i in ids]

    def example(
        self, input_ids: Sequence[int], labels: Sequence[int], teacher_prompt_ids: Sequence[int] | None = None
    ) -> dict[str, list[int]]:
        """``teacher_input_ids`` and ``teacher_rows`` (per supervised token after the shift, the teacher position
        whose next-token distribution is used, −1 for none) for one example with unshifted HF ``labels``.

        The teacher reads the student's prompt as rendered (its tokens' text; or ``teacher_prompt_ids`` of its own),
        then the rest of the sequence as text, tokenized apart so that the first supervised token always aligns."""
        labels = list(labels)
        kept = [j for j, label in enumerate(labels) if label != IGNORE_INDEX and j > 0]  # position 0 predicts nothing
        if not kept:
            return {"teacher_input_ids": list(teacher_prompt_ids or [self.teacher_pad_id]), "teacher_rows": []}
        start, end = kept[0], kept[-1] + 1  # what follows the last supervised token (padding) is not read
        labels = labels[:end]
        pieces = self._bytes(list(input_ids)[:end])
        prompt = self.read_prompt(list(input_ids)[:start]) if teacher_prompt_ids is None else list(teacher_prompt_ids)
        if not prompt:
            raise ValueError("the teacher's prompt is empty: the first supervised token has no context to align")
        rest = pieces[start:]
        text = _valid_utf8_prefix(b"".join(rest))
        rest_ids = self.teacher(text, add_special_tokens=False)["input_ids"] if text else []
        supervised = [label != IGNORE_INDEX for label in labels[start:]]
        spelled = without_dummy_prefix([self._teacher_bytes[i] for i in rest_ids], text.encode("utf-8"))
        consumed = boundary_rows(rest, supervised, spelled)
        used = max(consumed, default=0)
        rows = [len(prompt) - 1 + c if c >= 0 else MISSING_ID for c in consumed]
        return {"teacher_input_ids": prompt + list(rest_ids[:used]), "teacher_rows": rows}

    def batch(self, input_ids: Tensor, labels: Tensor, position_ids: Tensor | None = None) -> dict[str, Tensor]:
        """:meth:`example` for each row of a padded batch, collated (:func:`collate_teacher`), on the batch's
        device; a packed batch (``position_ids``) is refused: its rows hold several examples."""
        if position_ids is not None:
            raise ValueError(
                "a teacher aligned by text reads each example's text: give it padded batches, not packed or "
                "padding-free ones (position_ids)"
            )
        features = [self.example(i, l) for i, l in zip(input_ids.tolist(), labels.tolist())]
        return {k: v.to(input_ids.device) for k, v in collate_teacher(features, self.teacher_pad_id).items()}


def collate_teacher(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """The batch's teacher sequences right-padded, and ``teacher_rows`` as indices into the flattened
    ``[B·T_teacher]`` positions, one per loss row in the loss's order (−1 kept)."""
    width = max(len(f["teacher_input_ids"]) for f in features)
    ids, mask, rows = [], [], []
    for b, f in enumerate(features):
        seq = list(f["teacher_input_ids"])
        ids.append(seq + [pad_id] * (width - len(seq)))
        mask.append([1] * len(seq) + [0] * (width - len(seq)))
        rows.extend(r + b * width if r >= 0 else MISSING_ID for r in f["teacher_rows"])
    return {
        "teacher_input_ids": torch.tensor(ids, dtype=torch.long),
        "teacher_attention_mask": torch.tensor(mask, dtype=torch.long),
        "teacher_rows": torch.tensor(rows, dtype=torch.long),
    }


def head_logits(head: LMHead, hidden: Tensor) -> Tensor:
    """The model's logits of ``hidden [m, H]`` through its own output projection and transforms, in float32."""
    return project(head, hidden.to(head.weight.dtype), torch.float32)


def log_softmax_at(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable columns of ``log_softmax(logits / temperature)`` per row: ``(float64 log-probs, ids)``.
    The normaliser is summed in float64 over float32 terms, so it does not depend on the order of the columns (a
    vocabulary permuted gives the same log-probs to the last float32 bit) and no float64 copy of the row is made."""
    values, ids, _ = _top_and_share(logits, k, temperature)
    return values, ids


def _top_and_share(
    logits: Tensor, k: int, temperature: float, keep: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`log_softmax_at`, and with ``keep`` (a ``[V]`` mask of columns) each row's probability on the kept
    columns, ``Σ_{keep} softmax(logits / temperature)`` (float64), from the same exponentials."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    top = scaled.amax(-1, keepdim=True)
    terms = torch.exp(scaled - top)
    total = terms.sum(-1, keepdim=True, dtype=torch.float64)
    values, ids = scaled.topk(min(k, scaled.shape[-1]), dim=-1)
    share = None
    if keep is not None:
        share = terms.masked_fill_(~keep, 0.0).sum(-1, dtype=torch.float64) / total.squeeze(-1)
    return values.double() - (top.double() + total.log()), ids, share


def map_to_student(logits: Tensor, token_map: TokenMap, k: int, temperature: float = 1.0) -> tuple[Tensor, ...]:
    """Teacher logits ``[m, V_teacher]`` on the student's vocabulary: ``(ids [m, k], logprobs [m, k], mapped mass
    [m])``. Each student token gets the summed probability (at ``temperature``) of the teacher's tokens of its bytes
    among the teacher's ``max(4k, 1024)`` most probable (a log-sum-exp in float64: a token mapped one to one keeps
    its log-probability to the last float32 bit); ``k`` is capped at the student's vocabulary; logprobs are ``-inf``
    where the mass is 0. The mapped mass is the teacher's probability on every token that has a student token, over
    its whole vocabulary (of which the ``k`` rows carry the largest part)."""
    k = min(k, token_map.student_vocab)
    student_of = token_map.student_ids(logits.device, logits.shape[-1])
    values, teacher_ids, mass = _top_and_share(logits, max(4 * k, 1024), temperature, keep=student_of >= 0)
    ids, logprobs = _on_student(values, student_of[teacher_ids], token_map.student_vocab, k)
    return ids, logprobs, mass.clamp(max=1.0).float()


def map_topk_to_student(ids: Tensor, logprobs: Tensor, token_map: TokenMap, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher top-K rows (``ids [m, K]`` of the teacher's vocabulary, their log-probs, ``-inf`` for none) on the
    student's vocabulary, as :func:`map_to_student` maps logits: ``(ids [m, k], logprobs [m, k], mapped mass [m])``,
    where the mass is counted over the ``K`` given tokens only (a lower bound of the whole vocabulary's)."""
    k = min(k, token_map.student_vocab)
    student_of = token_map.student_ids(ids.device, int(ids.max()) + 1 if ids.numel() else 0)
    student_ids = student_of[ids.clamp(min=0)].masked_fill(ids < 0, -1)
    values = logprobs.double()
    mass = torch.where(student_ids >= 0, values.exp(), 0.0).sum(-1)
    out_ids, out_lps = _on_student(values, student_ids, token_map.student_vocab, k)
    return out_ids, out_lps, mass.clamp(max=1.0).float()


def _on_student(values: Tensor, student_ids: Tensor, student_vocab: int, k: int) -> tuple[Tensor, Tensor]:
    """Teacher candidates (float64 log-probs ``[m, C]`` and the student id each spells, −1: none) as the ``k`` most
    probable student tokens per row: each student token gets the log-sum-exp of its candidates."""
    values = values.masked_fill(student_ids < 0, float("-inf"))  # no student token spells it
    # the candidates grouped by student id (sorted within each row), each group's log-sum-exp
    student_ids, order = student_ids.sort(dim=-1)
    values = values.gather(1, order)
    starts = torch.ones_like(student_ids, dtype=torch.bool)
    starts[:, 1:] = student_ids[:, 1:] != student_ids[:, :-1]
    group = starts.cumsum(-1) - 1
    top = torch.full_like(values, float("-inf")).scatter_reduce(1, group, values, "amax")
    terms = torch.where(values > float("-inf"), (values - top.gather(1, group)).exp(), 0.0)
    log_mass = top + torch.zeros_like(values).scatter_add_(1, group, terms).log()
    ids_of_group = torch.zeros_like(student_ids).scatter_(1, group, student_ids).clamp(min=0)
    # on the student's row, so that every one of the k ids is a distinct real token (-inf where it has no mass)
    row = torch.full((values.shape[0], student_vocab), float("-inf"), dtype=values.dtype, device=values.device)
    row = row.scatter_reduce(1, ids_of_group, log_mass, "amax")
    logprobs, ids = row.topk(k, dim=-1)
    return ids, logprobs.float()


def map_in_chunks(
    logits_of: Callable[[int, int], Tensor], rows: int, token_map: TokenMap, k: int, temperature: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`map_to_student` of ``rows`` teacher rows whose logits ``logits_of(start, end)`` gives, ``chunk`` rows at
    a time, so that no ``[rows, V_teacher]`` tensor is built; the parts concatenated (empty ones for no rows)."""
    k = min(k, token_map.student_vocab)
    parts = [
        map_to_student(logits_of(s, min(s + chunk, rows)), token_map, k, temperature) for s in range(0, rows, chunk)
    ]
    if not parts:
        return torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k)), torch.zeros(0)
    ids, logprobs, mass = (torch.cat(p) for p in zip(*parts))
    return ids, logprobs, mass


def aligned_topk(
    hidden: Tensor, head: LMHead, token_map: TokenMap, k: int, temperature: float = 1.0, chunk: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`map_to_student` of the teacher's rows given as final hidden states ``[m, H]`` and its ``head``
    (:func:`map_in_chunks`, ``chunk`` rows at a time)."""
    ids, logprobs, mass = map_in_chunks(
        lambda s, e: head_logits(head, hidden[s:e]), hidden.shape[0], token_map, k, temperature, chunk
    )
    return ids.to(hidden.device), logprobs.to(hidden.device), mass.to(hidden.device)


def scatter_rows(rows: Tensor, ids: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k rows for every loss row: those of the aligned ``rows >= 0`` (in order), ids ``MISSING_ID`` and
    logprobs ``-inf`` elsewhere."""
    n, k = rows.shape[0], ids.shape[-1]
    full_ids = torch.full((n, k), MISSING_ID, dtype=torch.long, device=ids.device)
    full_lp = torch.full((n, k), float("-inf"), dtype=logprobs.dtype, device=logprobs.device)
    where = (rows >= 0).nonzero().squeeze(-1).to(ids.device)
    full_ids[where] = ids
    full_lp[where] = logprobs
    return full_ids, full_lp


def aligned_teacher_topk(
    teacher: torch.nn.Module,
    aligner: TextAligner,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    rows: Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Run ``teacher`` (no grad) on its own ``input_ids`` and give the loss its top-k rows on the student's ids, one
    per entry of ``rows`` (flat positions, −1: none, whose rows get ids ``MISSING_ID``); a training step's shares
    are recorded on ``aligner``. Nothing is read back to the host: a row with no teacher is computed from position
    0 and then masked."""
    at = input_device(teacher)
    record = torch.is_grad_enabled()  # a training step (evaluation runs without gradients)
    picked = rows.to(at)
    missing = picked < 0
    with torch.no_grad():
        h = hidden_states(teacher, *moved_to(at, input_ids, attention_mask))
        h = h.reshape(-1, h.shape[-1]).index_select(0, picked.clamp(min=0))
        with gathered_head(teacher):
            ids, logprobs, mass = aligned_topk(
                h, lm_head(teacher), aligner.token_map, aligner.top_k, aligner.temperature
            )
    if record:
        aligner.record(picked, mass.masked_fill(missing, 0.0))
    ids = ids.masked_fill(missing[:, None], MISSING_ID)
    logprobs = logprobs.masked_fill(missing[:, None], float("-inf"))
    return ids.to(device), logprobs.to(device)


@dataclass
class AlignedTeacher:
    """An online teacher of another tokenizer (``teacher.align: text``), run without gradient on the batch's
    ``teacher_input_ids``; its distribution at each loss row (``teacher_rows``: its position, −1 for none) reaches
    the loss as top-k rows on the student's ids (:func:`aligned_teacher_topk`), whose ids lie below
    ``shared_vocab_size``."""

    model: torch.nn.Module
    aligner: TextAligner
    shared_vocab_size: int | None = None

    @contextlib.contextmanager
    def at_loss_rows(self, batch: LossBatch) -> Iterator[TopK]:
        t = batch.teacher_inputs
        if t.get("teacher_rows") is None or t.get("teacher_input_ids") is None:
            raise ValueError("a teacher aligned by text needs the batch's teacher_input_ids and teacher_rows")
        ids, logprobs = aligned_teacher_topk(
            self.model,
            self.aligner,
            t["teacher_input_ids"],
            t.get("teacher_attention_mask"),
            t["teacher_rows"],
            batch.device,
        )
        yield TopK(ids, logprobs, self.shared_vocab_size)


def require_aligned_share(rows: Tensor, examples: int, least: float, setting: str) -> float:
    """The share of ``rows`` (one per supervised token of the first ``examples`` training examples; −1 where no
    teacher boundary meets the student's) with a teacher; an ``InputError`` naming ``setting`` when it is below
    ``least`` (the rest would learn from no teacher)."""
    from targetsft.runtime.inputs import InputError

    if not 0.0 <= least <= 1.0:
        raise InputError(f"{setting} must be in [0, 1], got {least}")
    if rows.numel() == 0:
        return 1.0
    share = float((rows >= 0).double().mean())
    if share < least:
        raise InputError(
            f"the teacher meets the student's tokens at only {share:.1%} of the supervised positions of the first "
            f"{examples} training examples ({setting}={least}): the rest would learn from no teacher. Use a teacher "
            f"whose tokenizer segments text more like the student's, or lower {setting} to train anyway"
        )
    return share


def alignment_note(aligner: TextAligner) -> str:
    """One line for the start of a run: how many of the teacher's tokens reach the student's vocabulary."""
    m = aligner.token_map
    return (
        f"teacher: another tokenizer, read through the text (teacher.align: text); {m.mapped:,} of its "
        f"{len(m.student_of):,} tokens map onto {m.covered:,} of the student's {m.student_vocab:,} by their bytes; "
        f"top {aligner.top_k} per position reach the loss"
    )
