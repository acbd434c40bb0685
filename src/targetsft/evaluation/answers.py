"""Final-answer extraction and checking for GSM-style outputs.

:func:`extract_answer` follows the GSM8K protocol: the first number after the *last* ``####``; else the content of the
last ``\\boxed{…}``; else the last number in the text. Commas, ``$`` and units are dropped and the number is
normalised (``"$18.00"`` → ``"18"``, ``"1,234"`` → ``"1234"``, ``"7/2"`` stays a fraction).

:func:`is_correct` compares the *extracted* answers (not the whole output, so a stray "the answer is 18" before
``#### 20`` does not count) with ``math_verify`` (``pip install 'math-verify[antlr4_13_2]'``), and falls back to an
exact numeric comparison (fractions and decimals compared exactly) when ``math_verify`` is unavailable or says no.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = ["extract_answer", "extract_boxed", "is_correct", "is_correct_boxed", "to_number"]

# A number: optional sign, digits with optional thousands commas, optional decimals, optional "/denominator".
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+]?\.\d+"
_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _clean_latex(s: str) -> str:
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}", r" \1 ", s)
    s = s.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    s = s.replace("(", "").replace(")", "")
    return re.sub(r"[{}]", " ", s)


def _normalise(num: str) -> str | None:
    s = num.replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            n, d = s.split("/", 1)
            if Decimal(d) == 0:
                return None
            f = Fraction(Decimal(n)) / Fraction(Decimal(d))
            return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
        d = Decimal(s)
    except (InvalidOperation, ValueError):
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _first_number(s: str) -> str | None:
    m = _NUM_RE.search(s)
    return _normalise(m.group(0)) if m else None


def _last_number(s: str) -> str | None:
    ms = list(_NUM_RE.finditer(s))
    return _normalise(ms[-1].group(0)) if ms else None


def extract_answer(text: str | None) -> str | None:
    """The final numeric answer of a model output or GSM8K solution, normalised; None if there is no number."""
    if text is None:
        return None
    text = str(text).translate(_MINUS)
    if "####" in text:
        ans = _first_number(_clean_latex(text.rsplit("####", 1)[1]))
        if ans is not None:
            return ans
    boxed = _last_boxed(text)
    if boxed is not None:
        ans = _first_number(_clean_latex(boxed))
        if ans is not None:
            return ans
    return _last_number(_clean_latex(text))


def extract_boxed(text: str | None) -> str | None:
    """The content of the last ``\\boxed{…}`` of ``text``, stripped; None if there is none."""
    boxed = _last_boxed(str(text)) if text is not None else None
    return boxed.strip() if boxed is not None else None


def is_correct_boxed(prediction_text: str | None, gold: str | int | float) -> bool:
    """Whether the last ``\\boxed{…}`` of ``prediction_text`` equals ``gold`` (LaTeX or a number; a gold that is
    itself a solution with ``\\boxed{…}`` is reduced to it): ``math_verify`` on both, else exact equality of the
    two as numbers (when each is a whole number) or as strings without spaces. For MATH-style answers."""
    pred = extract_boxed(prediction_text)
    if pred is None:
        return False
    gold_s = extract_boxed(str(gold)) or str(gold).strip()
    if _math_verify(f"${gold_s}$", f"${pred}$"):
        return True
    gp, pp = to_number(_clean_latex(gold_s).strip()), to_number(_clean_latex(pred).strip())
    if gp is not None and pp is not None:
        return gp == pp
    return "".join(gold_s.split()) == "".join(pred.split())


def to_number(ans: str | None) -> Fraction | None:
    """An extracted answer as an exact Fraction (``"3.5"`` → 7/2), or None."""
    if ans is None:
        return None
    norm = _normalise(str(ans))
    if norm is None:
        return None
    try:
        return Fraction(norm)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify(gold: str, pred: str) -> bool | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math_verify's timeouts use signal.alarm, which only works in the main thread; elsewhere run without them
    # (the inputs are short extracted answers, so nothing can hang).
    t = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(gold, parsing_timeout=t)
        p = parse(pred, parsing_timeout=t)
        if not g or not p:
            return None
        return bool(verify(g, p, timeout_seconds=t))
    except Exception:  # noqa: BLE001 - math_verify may raise on odd input; the numeric check decides then
        return None


def is_correct(prediction_text: str | None, gold: str | int | float) -> bool:
    """Whether the final answer of ``prediction_text`` equals ``gold`` (a number, a number string, or a GSM8K
    solution ending ``#### n``)."""
    pred = extract_answer(prediction_text)
    gold_ans = extract_answer(str(gold))
    if pred is None or gold_ans is None:
        return False
    gp, pp = to_number(gold_ans), to_number(pred)
    if gp is not None and pp is not None and gp == pp:
        return True
    return bool(_math_verify(gold_ans, pred))
