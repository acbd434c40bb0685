"""Routed teachers: one top-k teacher per kind of example (math rows from a math model, code rows from a code model).

The ``teachers:`` section of a training config (its entries are
:class:`~targetsft.training.config_sections.RoutedTeacherConfig`) is checked here (:func:`check_routed_teachers`).
Each example is routed once, when the data is set up, to the first teacher whose selector its record matches
(:func:`route_records`), or to none. :class:`RoutedTeacher` is itself a
:class:`~targetsft.training.topk_rows.TopKTeacher`: for a batch it asks each teacher for the rows of its own examples
(a sub-batch of them) and puts them back in batch order; an example routed to no teacher gets rows whose ids are all
``MISSING_ID``, the rows of a position without a teacher (the method's no-teacher behaviour: Target-SFT is DFT there,
KD has no gradient).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from targetsft.losses.methods import MethodSpec
from targetsft.losses.validation import MISSING_ID
from targetsft.training.config_sections import (
    ConfigError,
    RoutedTeacherConfig,
    build_section,
    check_served_temperature,
    server_section,
)
from targetsft.training.topk_rows import IGNORE_INDEX, TopKTeacher, check_row_count

logger = logging.getLogger(__name__)

NO_TEACHER = "none"  # the name the statistics give to the examples no selector matches


# ------------------------------------------------------------------------------------------- configuration


def routed_teacher_entries(values: Any) -> list[RoutedTeacherConfig]:
    """The ``teachers:`` list as :class:`RoutedTeacherConfig` entries (each checked for unknown keys)."""
    if values is None:
        return []
    if not isinstance(values, list):
        raise ConfigError(f"teachers must be a list of {{name, select, cache | server}} entries, got {values!r}")
    return [
        v if isinstance(v, RoutedTeacherConfig) else build_section(RoutedTeacherConfig, v, f"teachers[{i}]")
        for i, v in enumerate(values)
    ]


ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_routed_teachers(cfg: Any, spec: MethodSpec, given: list[str]) -> None:
    """``teachers``: named entries (names unique, not ``none``), each with a selector and one source (a cache or a
    server; not a model); exclusive of ``teacher.model``/``cache``/``server``; for a method that uses a teacher, on
    padded batches, without ``data.eval``."""
    if given:
        raise ConfigError(f"give teachers or teacher.{given[0]}, not both (a routed teacher is an entry of teachers)")
    if "teacher" not in spec.needs:
        raise ConfigError(f"method {cfg.loss.method!r} does not use a teacher; remove teachers")
    if cfg.data.packing:
        raise ConfigError("teachers route each example of a batch on its own: set data.packing false")
    if cfg.data.eval is not None:
        raise ConfigError("data.eval with teachers: the routes are of the training examples; remove data.eval")
    seen: set[str] = set()
    for i, entry in enumerate(cfg.teachers):
        where = f"teachers[{i}]"
        if not isinstance(entry.name, str) or not ROUTE_NAME.match(entry.name) or entry.name == "none":
            raise ConfigError(
                f"{where}.name must be a name of letters, digits, '_', '-' or '.' other than 'none', got {entry.name!r}"
            )
        if entry.name in seen:
            raise ConfigError(f"teachers: the name {entry.name!r} is given twice; each teacher needs its own name")
        seen.add(entry.name)
        check_selector(entry.select, f"{where} ({entry.name}).select")
        if entry.model:
            raise ConfigError(
                f"{where} ({entry.name}): an online teacher.model is not routed; build its cache with target-sft "
                "cache-teacher and give cache:, or serve it with vLLM and give server:"
            )
        sources = [k for k in ("cache", "server") if getattr(entry, k)]
        if len(sources) != 1:
            what = "no teacher source" if not sources else "both cache and server"
            raise ConfigError(f"{where} ({entry.name}) has {what}: give one of cache: or server:")
        if entry.server is not None:
            entry.server = server_section(entry.server, f"{where}.server")
            check_served_temperature(cfg, spec)
            if cfg.teacher.align == "text":
                raise ConfigError(
                    f"{where} ({entry.name}): a routed server is read by ids; route a teacher of another tokenizer "
                    "through a cache built with teacher.align text"
                )


def check_selector(select: Any, where: str) -> None:
    """A selector: a non-empty mapping of field names to a value or a non-empty list of values."""
    if not isinstance(select, dict) or not select:
        raise ConfigError(
            f"{where} must be a mapping of a record field to its value (e.g. domain: math), got {select!r}"
        )
    for name, value in select.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: field names must be strings, got {name!r}")
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, (dict, list)) for v in values):
            raise ConfigError(f"{where}.{name} must be a value or a non-empty list of values, got {value!r}")


# ----------------------------------------------------------------------------------------------- routes


def selector_matches(select: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    """Whether ``record`` matches ``select``: for every field, the record's value equals the value given, or is
    one of them when a list is given."""
    for name, wanted in select.items():
        if name not in record:
            return False
        values = wanted if isinstance(wanted, list) else [wanted]
        if record[name] not in values:
            return False
    return True


def route_records(records: Sequence[Mapping[str, Any]], teachers: Sequence[Any]) -> list[str | None]:
    """Per record, the ``name`` of the first of ``teachers`` (entries with ``name`` and ``select``) whose selector
    it matches, or None. A selector field that no record has is refused (an
    :class:`~targetsft.runtime.inputs.InputError`: most likely a typo)."""
    from targetsft.runtime.inputs import InputError

    fields = {f for t in teachers for f in t.select}
    present = {f for f in fields if any(f in r for r in records)}
    for teacher in teachers:
        absent = sorted(set(teacher.select) - present)
        if absent and records:
            known = sorted({k for r in records[:100] for k in r})
            raise InputError(
                f"teachers: {teacher.name!r} selects on field {absent[0]!r}, which no training record has "
                f"(the records' fields: {', '.join(known)})"
            )
    return [next((t.name for t in teachers if selector_matches(t.select, r)), None) for r in records]


def route_counts(items: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per teacher name (and :data:`NO_TEACHER`), the examples of ``items`` routed to it and their loss rows
    (supervised tokens after the shift), from each item's ``teacher_route``."""
    counts = {name: {"examples": 0, "loss_rows": 0} for name in [*names, NO_TEACHER]}
    for item in items:
        entry = counts[item.get("teacher_route") or NO_TEACHER]
        entry["examples"] += 1
        entry["loss_rows"] += sum(label != IGNORE_INDEX for label in item["labels"][1:])
    return counts


def sub_batch(batch: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The examples ``rows`` of a padded ``batch``: each tensor with one entry per example sliced to them (other
    values, such as a host-side count of the whole batch, are left out)."""
    size = batch["labels"].shape[0]
    index = torch.tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[index.to(value.device)]
    return out


class RoutedTeacher:
    """A :class:`~targetsft.training.topk_rows.TopKTeacher` that takes each example's rows from the teacher it is
    routed to.

    Args:
        teachers: the named teachers (each a ``TopKTeacher``: a teacher cache, a served teacher, ...); they must
            give log-probs at one temperature and, where they say it (``k``), rows of one width.
        routes: per example index (the dataset's ``example_index``), the name of its teacher, or None (no
            teacher: its rows have ids all ``MISSING_ID``).
        info: what the summary says of each teacher (its source), by name.
        counts: the examples and loss rows of the data routed to each name (:func:`route_counts`), for the summary.

    ``temperature`` is the teachers' own; ``shared_vocab_size`` the smallest of theirs (None when none says).
    """

    def __init__(
        self,
        teachers: Mapping[str, TopKTeacher],
        routes: Sequence[str | None],
        info: Mapping[str, dict[str, Any]] | None = None,
        counts: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        if not teachers:
            raise ValueError("a routed teacher needs at least one teacher")
        unknown = sorted({r for r in routes if r is not None} - set(teachers))
        if unknown:
            raise ValueError(f"examples are routed to {unknown[0]!r}, which is not one of the teachers")
        temperatures = {name: float(t.temperature) for name, t in teachers.items()}
        if len(set(temperatures.values())) > 1:
            raise ValueError(f"routed teachers must give log-probs at one temperature, got {temperatures}")
        widths = {name: int(t.k) for name, t in teachers.items() if hasattr(t, "k")}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"routed teachers must keep the same top-k per row, got {widths}: build (or serve) them all with "
                "one k (a row's top-k ids are where the loss leaves the student's tail, so rows cannot be padded)"
            )
        self.teachers = dict(teachers)
        self.routes = list(routes)
        self.info = {name: dict((info or {}).get(name, {})) for name in self.teachers}
        self.counts = {name: dict(c) for name, c in (counts or {}).items()}
        self.temperature = next(iter(temperatures.values()))
        self.k = next(iter(widths.values()), None)
        self.alignment = None  # a routed teacher's caches may each be aligned by text: see each one's info
        names = [*self.teachers, NO_TEACHER]
        self.window: Counter[str] = Counter({name: 0 for name in names})
        self.total_rows: Counter[str] = Counter({name: 0 for name in names})
        self.total_examples: Counter[str] = Counter({name: 0 for name in names})

    @property
    def shared_vocab_size(self) -> int | None:
        sizes = [t.shared_vocab_size for t in self.teachers.values() if t.shared_vocab_size is not None]
        return min(sizes) if sizes else None

    def _plan(self, batch: Mapping[str, Any]) -> tuple[list[str | None], list[int]]:
        """Per example of ``batch``: its teacher's name (or None) and its number of loss rows."""
        if "position_ids" in batch:
            raise ValueError("routed teachers split a batch by example: give them padded batches, not packed")
        if "teacher_rows" in batch:
            raise ValueError("routed teachers read by ids: a teacher of another tokenizer is routed through its cache")
        index = batch.get("example_index")
        if index is None:
            raise ValueError("routed teachers need the dataset's example_index column in every batch")
        names = []
        for i in index.tolist():
            if not 0 <= i < len(self.routes):
                raise IndexError(f"example index {i} out of range for the {len(self.routes)} routed examples")
            names.append(self.routes[i])
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        return names, counts

    def prefetch(self, batch: Mapping[str, Any]) -> None:
        """Hand each teacher that starts its requests early (``prefetch``) the sub-batch of its examples."""
        names, _ = self._plan(batch)
        for name, teacher in self.teachers.items():
            rows = [b for b, n in enumerate(names) if n == name]
            if rows and hasattr(teacher, "prefetch"):
                teacher.prefetch(sub_batch(batch, rows))

    def batch_rows(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """``(ids [n, k], logprobs [n, k])`` of the batch's ``n`` loss rows in batch order: each example's rows
        from its teacher (asked for the sub-batch of its examples), all ``MISSING_ID`` / ``-inf`` for an example
        routed to none."""
        names, counts = self._plan(batch)
        starts = [sum(counts[:b]) for b in range(len(counts))]
        parts: dict[str, tuple[list[int], Tensor, Tensor]] = {}
        for name in dict.fromkeys(n for n in names if n is not None):
            rows = [b for b, n in enumerate(names) if n == name]
            sub = sub_batch(batch, rows)
            ids, lps = self.teachers[name].batch_rows(sub)
            check_row_count(ids, sub["labels"], f"teacher {name!r}", "its rows do not match its examples")
            parts[name] = (rows, ids.cpu().long(), lps.cpu().float())
        widths = {name: part[1].shape[1] for name, part in parts.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(f"routed teachers gave rows of different top-k in one batch: {widths}")
        k = next(iter(widths.values()), self.k or 1)
        out_ids = torch.full((sum(counts), k), MISSING_ID, dtype=torch.long)
        out_lps = torch.full((sum(counts), k), float("-inf"))
        for rows, ids, lps in parts.values():
            where = torch.cat([torch.arange(starts[b], starts[b] + counts[b]) for b in rows])
            out_ids[where], out_lps[where] = ids, lps
        if torch.is_grad_enabled():  # training: the statistics count the rows the loss learns from
            self._count(names, counts)
        return out_ids, out_lps

    def _count(self, names: list[str | None], counts: list[int]) -> None:
        for name, n in zip(names, counts):
            key = name or NO_TEACHER
            self.window[key] += n
            self.total_rows[key] += n
            self.total_examples[key] += 1

    def take_shares(self) -> dict[str, float]:
        """Per teacher (and ``none``), its share of the loss rows trained on since the last call, as
        ``rows_<name>`` (the trainer logs them as ``teacher_rows_<name>``)."""
        total = sum(self.window.values())
        shares = {f"rows_{name}": (n / total if total else 0.0) for name, n in self.window.items()}
        self.window = Counter({name: 0 for name in self.window})
        return shares

    def summary(self) -> dict[str, dict[str, Any]]:
        """What ``summary.json`` records under ``teachers``: per teacher name (and ``none``), its source (``info``),
        what the teacher says of itself (a served teacher's ``summary()``: its url, model, k and requests), the
        examples and loss rows of the data routed to it (``examples``, ``loss_rows``: ``counts``) and those trained
        on (``trained_examples``, ``trained_loss_rows``: repeats counted)."""
        out: dict[str, dict[str, Any]] = {}
        for name in [*self.teachers, NO_TEACHER]:
            entry = dict(self.info.get(name, {}))
            if hasattr(self.teachers.get(name), "summary"):
                entry.update(self.teachers[name].summary())
            entry.update(self.counts.get(name, {}))
            entry["trained_examples"] = self.total_examples[name]
            entry["trained_loss_rows"] = self.total_rows[name]
            out[name] = entry
        return out

    def close(self) -> None:
        """Close the teachers that hold something open (shard handles, request threads)."""
        for teacher in self.teachers.values():
            if hasattr(teacher, "close"):
                teacher.close()


def routes_line(counts: Mapping[str, Mapping[str, int]]) -> str:
    """The line a run prints about its routed teachers: per teacher (and ``none``) its examples and loss rows."""
    parts = [f"{name} {c['examples']} examples / {c['loss_rows']} loss rows" for name, c in counts.items()]
    return "routed teachers: " + "; ".join(parts)
