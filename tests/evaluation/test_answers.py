"""Final-answer extraction and checking."""

from __future__ import annotations

import threading

import pytest

from targetsft.evaluation.answers import extract_answer, is_correct, to_number


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so the total is\n#### 1,234", "1234"),
        ("#### 1,234,567.50", "1234567.5"),
        (r"The answer is \boxed{18}.", "18"),
        (r"\boxed{\frac{7}{2}}", "7/2"),
        (r"\boxed{1{,}000}", "1000"),
        ("She pays $18.00 in total.", "18"),
        ("18 dollars", "18"),
        ("#### $18.00", "18"),
        ("#### 7/2", "7/2"),
        ("#### 14/2", "7"),
        ("The temperature fell to -5 degrees.", "-5"),
        ("#### -12", "-12"),
        ("#### \u22123", "-3"),
        ("The answer is 42.", "42"),
        ("#### 18.", "18"),
        ("#### 52%", "52"),
        ("#### 0.5", "0.5"),
        ("#### .5", "0.5"),
        ("5-3", "3"),
        ("24 clips in May #### 72 clips in total. I think 80", "72"),
        ("first #### 5 then #### 6", "6"),
        ("#### 10\n\nBonus: 3 + 4 = 7", "10"),
        ("####\n\n 12", "12"),
        ("no number here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("#### 1,234", "1234", True),
        (r"\boxed{18}", "18", True),
        ("$18.00", "18", True),
        ("18 dollars", 18, True),
        ("#### 7/2", "3.5", True),
        ("#### 3.5", "7/2", True),
        ("#### -5", "-5", True),
        ("#### 5", "-5", False),
        ("The answer is 18.", "18", True),
        ("The answer is 18. #### 20", "18", False),  # the #### answer decides
        ("#### 18", "Natalia sold 48/2 = 24.\n#### 18", True),  # gold as a GSM8K solution
        ("#### 72.0", "72", True),
        ("#### 0.52", "52", False),
        ("no answer", "3", False),
        ("#### 3", "not a number", False),
    ],
)
def test_is_correct(pred, gold, ok):
    assert is_correct(pred, gold) is ok


def test_to_number_exact():
    from fractions import Fraction

    assert to_number("3.5") == Fraction(7, 2) == to_number("7/2")
    assert to_number("1,000") == 1000
    assert to_number(None) is None and to_number("x") is None


def test_is_correct_outside_main_thread():
    # math_verify's signal-based timeouts fail in threads; is_correct must still work there
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", is_correct("#### 7/2", "3.5")))
    t.start()
    t.join()
    assert out["r"] is True


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("thus \\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\sqrt 2}", "\\sqrt{2}", True),
        ("\\boxed{1+x^2}", "x^2+1", True),
        ("\\boxed{3} and finally \\boxed{4}", "4", True),
        ("\\boxed{3} and finally \\boxed{4}", "3", False),
        ("#### 4", "4", False),  # no box: no answer
        ("\\boxed{\\text{(C)}}", "\\boxed{\\text{(C)}}", True),  # a gold solution is reduced to its box
        ("\\boxed{2x}", "2", False),
    ],
)
def test_is_correct_boxed(pred, gold, ok):
    from targetsft.evaluation.answers import is_correct_boxed

    assert is_correct_boxed(pred, gold) is ok
