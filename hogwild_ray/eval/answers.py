"""Answer checking: is a model's final answer the reference answer?

The rules (documented in the README's evaluation section and tested):

1. The model's answer is the last complete `\\boxed{...}` in its text (see
   `protocol.extract_boxed`); none means wrong.
2. Both sides are normalised: surrounding `$`, `\\(`/`\\)`, a trailing period, LaTeX
   spacing (`\\,`, `\\!`, `~`), `\\text{...}`/`\\mathrm{...}` wrappers, `\\left`/`\\right`,
   `\\dfrac`/`\\tfrac` -> `\\frac`, and whitespace are dropped; case is ignored.
3. If both sides read as numbers they are compared as numbers: thousands separators
   (`1,234`), a leading currency sign, trailing units or percent (`12 cm`, `50%`),
   fractions (`3/4`, `\\frac{3}{4}`), mixed numbers (`2 1/2`) and decimals are accepted;
   equal within 1e-6 relative (so `0.5` = `1/2` = `\\frac12`).
4. Otherwise the normalised strings must be equal (`x=3` and `3` differ only by a
   leading `x=` / `answer:`, which is dropped first).
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..core.protocol import extract_boxed

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\{([^{}]+)\}\{([^{}]+)\}|\\frac(\d)(\d)")
_UNIT = re.compile(r"^(-?[\d.,/ ]+?)\s*(?:%|\\%|[a-zA-Z][a-zA-Z.² ]*)$")
_LEAD = re.compile(r"^(?:[a-z]\s*=|answer\s*[:=]|the answer is)\s*", re.I)


def normalize_answer(text: str) -> str:
    """The comparable form of an answer string (rule 2)."""
    s = text.strip().rstrip(".").strip()
    s = re.sub(r"^\$+|\$+$", "", s)
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("{,}", ",")  # LaTeX thousands separator
    s = re.sub(r"\\[,!;: ]|~", "", s)
    prev = None
    while prev != s:
        prev, s = s, _WRAPPERS.sub(r"\1", s)
    s = s.rstrip(".").strip()
    s = _LEAD.sub("", s)
    s = re.sub(r"^\\\$|^\$|^[€£¥]", "", s)
    return re.sub(r"\s+", " ", s).strip().lower()


def parse_number(text: str) -> Fraction | None:
    """A normalised answer as an exact number (rule 3), or None if it is not one."""
    s = _FRAC.sub(lambda m: f"({m.group(1) or m.group(3)})/({m.group(2) or m.group(4)})", text)
    unit = _UNIT.match(s)
    if unit:
        s = unit.group(1)
    s = s.strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    mixed = re.fullmatch(r"(-?\d+)\s+(\d+)/(\d+)", s)
    try:
        if mixed:
            whole, num, den = (int(g) for g in mixed.groups())
            return whole + (Fraction(num, den) if whole >= 0 else -Fraction(num, den))
        frac = re.fullmatch(r"\(?(-?[\d.]+)\)?\s*/\s*\(?([\d.]+)\)?", s)
        if frac:
            return Fraction(frac.group(1)) / Fraction(frac.group(2))
        if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(predicted: str | None, reference: str | int | float) -> bool:
    """Rules 2-4 on two answer strings; None (no answer) never matches."""
    if predicted is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(str(reference))
    if not a:
        return False
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return x == y or abs(x - y) <= 1e-6 * max(abs(x), abs(y))
    return a == b


def grade(text: str, reference: str | int | float) -> tuple[str | None, bool]:
    """(the extracted final answer, whether it is right) for a model's full text (rule 1)."""
    answer = extract_boxed(text)
    return answer, answers_match(answer, reference)
