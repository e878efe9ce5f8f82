"""An offline dataset made by code: multi-step arithmetic word problems with known answers.

Deterministic from a seed, no downloads: for tests, demos and quick evaluations. Each
problem chains 2-4 operations over small integers (sales, shares, rates), so a model has
to keep several intermediate results; the answer is always an integer.
"""

from __future__ import annotations

import random

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
ITEMS = [("muffins", "muffin"), ("apples", "apple"), ("books", "book"), ("tickets", "ticket"), ("pens", "pen")]


def _sales(rng: random.Random) -> tuple[str, int]:
    (items, item), (others, other) = rng.sample(ITEMS, 2)
    p1, p2 = rng.randint(2, 9), rng.randint(2, 9)
    n1 = rng.randint(3, 20)
    k = rng.randint(2, 4)
    more = rng.randint(1, 9)
    text = (f"A shop sells {items} for ${p1} each and {others} for ${p2} each. On Monday it sold {n1} {items} "
            f"and {k} times as many {others}. On Tuesday it sold {more} more {items} than on Monday and "
            f"no {others}. How many dollars did the shop take over the two days?")
    return text, p1 * n1 + p2 * k * n1 + p1 * (n1 + more)


def _shares(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.sample(NAMES, 3)
    per = rng.randint(2, 12)
    people = rng.randint(3, 8)
    total = per * people * 2
    kept = rng.randint(1, per)
    text = (f"{a} has {total} stickers and gives half of them to {b}. {b} shares the stickers equally among "
            f"{people} friends, and each friend gives {kept} of their share to {c}. How many stickers does "
            f"{c} get?")
    return text, kept * people


def _rates(rng: random.Random) -> tuple[str, int]:
    a = rng.choice(NAMES)
    speed = rng.randint(3, 15)
    hours = rng.randint(2, 6)
    back = rng.randint(1, speed - 1) if speed > 1 else 1
    text = (f"{a} cycles at {speed} km per hour for {hours} hours, then walks back toward the start at "
            f"{back} km per hour for {hours} hours. How many kilometres from the start is {a} now?")
    return text, (speed - back) * hours


def _savings(rng: random.Random) -> tuple[str, int]:
    a = rng.choice(NAMES)
    start = rng.randint(10, 100)
    weekly = rng.randint(5, 30)
    weeks = rng.randint(2, 10)
    spent = rng.randint(1, start)
    text = (f"{a} has ${start} and saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a "
            f"gift. How many dollars does {a} have left?")
    return text, start + weekly * weeks - spent


GENERATORS = [_sales, _shares, _rates, _savings]


def arithmetic_problems(n: int, seed: int = 0) -> list[dict]:
    """`n` problems as {"id", "problem", "answer"} dicts, the same for the same seed."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text, answer = GENERATORS[i % len(GENERATORS)](rng)
        out.append({"id": f"arith-{seed}-{i}", "problem": text, "answer": str(answer)})
    return out
