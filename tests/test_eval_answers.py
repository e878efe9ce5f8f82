"""Answer extraction and checking, and the offline dataset (pure logic, no model)."""

from __future__ import annotations

import pytest

from hogwild_ray.eval import answers_match, arithmetic_problems, normalize_answer, parse_number
from hogwild_ray.eval.answers import grade


@pytest.mark.parametrize("predicted,reference", [
    ("1,234", "1234"), ("4{,}200", "4200"), ("\\frac{3}{4}", "0.75"), ("\\dfrac{3}{4}", "3/4"),
    ("\\frac12", "0.5"), ("12 cm", "12"), ("50%", "50"), ("50\\%", "50"), ("$5", "5"), ("\\$5", "5"),
    ("2 1/2", "2.5"), ("x = 3", "3"), ("\\text{Paris}", "Paris"), ("-3", "-3.0"), ("3.", "3"),
    ("$\\frac{1}{3}$", "1/3"), ("\\left(2\\right)", "(2)"), ("  42 ", 42), ("0.333333", "0.333333"),
])
def test_equal_answers(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted,reference", [
    ("abc", "abd"), ("", "0"), (None, "0"), ("13", "12"), ("1/3", "0.33"), ("12 cm", "120"),
    ("1,23", "123"),  # not a thousands separator: compared as text
    ("\\frac{1}{0}", "1"), ("two", "2"),
])
def test_different_answers(predicted, reference):
    assert not answers_match(predicted, reference)


def test_normalize_and_parse():
    assert normalize_answer(" $\\text{ 7 apples }$. ") == "7 apples"
    assert parse_number("7 apples") == 7
    assert parse_number("1/0") is None
    assert parse_number("seven") is None


@pytest.mark.parametrize("text,reference,answer,right", [
    ("so the total is \\boxed{426}.", "426", "426", True),
    ("first \\boxed{12} then, correcting, \\boxed{13}", "13", "13", True),  # the last box counts
    ("the answer is 426", "426", None, False),  # no box: no answer
    ("\\boxed{} is where the answer goes", "5", None, False),  # empty box
    ("unfinished \\boxed{42", "42", None, False),  # unbalanced
    ("\\boxed{\\frac{1}{2}}", "0.5", "\\frac{1}{2}", True),  # nested braces
])
def test_grade_extracts_the_last_box(text, reference, answer, right):
    assert grade(text, reference) == (answer, right)


def test_dataset_is_deterministic_and_correct():
    a, b = arithmetic_problems(12, seed=3), arithmetic_problems(12, seed=3)
    assert a == b and a != arithmetic_problems(12, seed=4)
    assert len({p["id"] for p in a}) == 12
    assert all(p["answer"].lstrip("-").isdigit() and p["problem"].endswith("?") for p in a)
    # the first kind is checkable by hand: price * count sums
    import re
    p = a[0]["problem"]
    p1, p2 = map(int, re.findall(r"\$(\d+)", p))
    n1 = int(re.search(r"sold (\d+)", p).group(1))
    k = int(re.search(r"and (\d+) times", p).group(1))
    more = int(re.search(r"sold (\d+) more", p).group(1))
    assert int(a[0]["answer"]) == p1 * n1 + p2 * k * n1 + p1 * (n1 + more)
    with pytest.raises(ValueError, match="non-negative"):
        arithmetic_problems(-1)
