"""Small statistics of an evaluation: the majority vote of independent workers, Wilson intervals."""

from __future__ import annotations

import math

from .answers import normalize_answer, parse_number


def _key(answer: str) -> object:
    """Answers that `answers_match` would call equal share a key (numbers by value)."""
    text = normalize_answer(answer)
    number = parse_number(text)
    return number if number is not None else text


def majority(answers: list[str | None]) -> str | None:
    """The most common answer (equal numbers and normalised strings count together); on a tie
    the one given first; missing answers (None) do not vote; None if nobody answered."""
    counts: dict[object, int] = {}
    first: dict[object, str] = {}
    for a in answers:
        if a is None or not normalize_answer(a):
            continue
        k = _key(a)
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, a)
    if not counts:
        return None
    best = max(counts.values())
    return next(first[k] for k in first if counts[k] == best)  # dicts keep insertion order: first given wins


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) for `correct` successes out of `n`;
    unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0 or n."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in 0..{n}, got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
