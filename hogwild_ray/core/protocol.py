"""The collaboration protocol: prompts, headers, step boundaries, answers. Pure logic.

Workers are told that they are several, that they see each other's work as it is
written, and that they should split the work among themselves. Each worker writes in
steps (paragraphs); a finished step joins the shared history under a header such as
`**Bob [4]:** `. Every so many tokens a worker's next step opens with a short forced
question about redundant work. The run ends with a final answer in `\\boxed{...}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidRequestError, check_int

NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi",
    "Ivan", "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil",
)

HEADER_OTHERS = "\n\n### Work in progress (the others, live)\n\n"
HEADER_OWN = "\n\n### Work in progress (yours, continue from here)\n\n"
HISTORY_HEADER = "### Finished steps (shared by everyone)\n\n"
REDUNDANCY_QUESTION = "(Quick check: is another worker already doing what I am doing? yes/no): "
FINISHER_PROMPT = "\n\nOut of time. Putting together what we have, the final answer is \\boxed{"


def worker_name(i: int) -> str:
    return NAMES[i] if i < len(NAMES) else f"Worker{i + 1}"


def system_prompt(workers: int) -> str:
    """Instructions in the system turn; the problem goes in the user turn."""
    if workers == 1:
        return (
            "You are a careful problem solver. Think step by step, one short paragraph "
            "per step, and end with the final result written inside \\boxed{}."
        )
    names = ", ".join(worker_name(i) for i in range(workers))
    return (
        f"You are one of {workers} assistants ({names}) solving the same problem together, "
        "at the same time. Everyone sees everyone else's work as it is being written: the "
        "finished steps of the whole team, then each assistant's step in progress, then "
        "your own step in progress. Nobody assigns the work: look at what the others are "
        "doing and do something useful that they are not doing (another part of the "
        "problem, another approach, or checking a result). Write one short paragraph per "
        "step. If you notice that you duplicate someone's work, stop and switch. When the "
        "team has the result, write it inside \\boxed{}."
    )


def step_header(w: int, step: int) -> str:
    return f"**{worker_name(w)} [{step}]:** "


def think_prefix(template: str | None, rendered: str) -> str:
    """Open the thinking section for reasoning models whose template does not already."""
    tail = rendered.rstrip()
    if template and "<think>" in template and not tail.endswith(("<think>", "</think>")):
        return "<think>\n"
    return ""


_BREAK = re.compile(r"\n[ \t]*\n[ \t]*$")
_FENCES = {"```": "```", "$$": "$$", "\\[": "\\]"}


def open_fence(text: str) -> bool:
    """True while a code fence (```), display math ($$) or \\[ ... \\] is open.

    One left-to-right scan: inside a fence only its own closer counts, so `$$` or `\\[`
    in a code block (or ``` in math) opens nothing. Outside code, `\\$` and `\\\\` are
    escapes, not delimiters."""
    i, close = 0, None
    while i < len(text):
        if close != "```" and text[i] == "\\" and text[i + 1 : i + 2] in ("$", "\\"):
            i += 2
        elif close is None:
            opener = next((o for o in _FENCES if text.startswith(o, i)), None)
            close = _FENCES.get(opener)
            i += len(opener) if opener else 1
        elif text.startswith(close, i):
            i, close = i + len(close), None
        else:
            i += 1
    return close is not None


# A step header as the model imitates it: `**Bob [13]:**` (also `**Bob [13]**:`), any name of NAMES or
# WorkerN, with or without a line break before it. A name in bold without `[n]:` is not a header.
_HEADER_LIKE = re.compile(
    r"\*\*[ \t]*(?:" + "|".join(NAMES) + r"|Worker\d+)[ \t]*\[[ \t]*\d+[ \t]*\][ \t]*(?::[ \t]*\*\*|\*\*[ \t]*:)"
)


def imitated_header(body: str) -> int | None:
    """Where the first complete step header that the worker wrote itself starts in `body` (its
    step's text after the forced header), outside any open fence; None if there is none."""
    for m in _HEADER_LIKE.finditer(body):
        if not open_fence(body[: m.start()]):
            return m.start()
    return None


def is_step_boundary(step_text: str, header: str = "") -> bool:
    """A step ends at a paragraph break after some text, outside any open fence, or as soon as
    the worker writes a step header of its own (`**Bob [13]:**`, see `imitated_header`).

    `header`: the forced text that opened the step (it is not part of what the worker wrote)."""
    if header and step_text.startswith(header):
        body = step_text[len(header):]
    else:
        body = step_text
        if header:  # the forced header did not decode to itself: a header-like opening is still it
            first = _HEADER_LIKE.match(body.lstrip())
            body = body.lstrip()[first.end():] if first else body
    if _BREAK.search(body) and body.strip() and not open_fence(body):
        return True
    return imitated_header(body) is not None


def extract_boxed(text: str) -> str | None:
    """Contents of the last complete, non-empty \\boxed{...} (braces balanced), or None.

    Escaped braces (`\\{`, `\\}`) do not count; an empty `\\boxed{}` (as in "write the
    result inside \\boxed{}") is not an answer."""
    found = None
    start = text.find("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        while i < len(text) and depth:
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        inner = text[start + len("\\boxed{") : i - 1].strip()
        if depth == 0 and inner:
            found = inner
        start = text.find("\\boxed{", start + 1)
    return found


@dataclass(frozen=True)
class ProtocolOptions:
    """Knobs of the collaboration protocol; `enabled=False` gives a plain prompt."""

    enabled: bool = True
    chat_template: bool = True
    redundancy_every: int | None = 128  # tokens between redundancy checks; None: off
    finisher: bool = True
    finisher_tokens: int = 32
    stop_on_answer: bool = True

    def __post_init__(self) -> None:
        check_int("redundancy_every", self.redundancy_every, 1, none="off")
        check_int("finisher_tokens", self.finisher_tokens, 1)
        for name in ("enabled", "chat_template", "finisher", "stop_on_answer"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "no" or "off" is truthy: the switch would stay on
                shown = "protocol" if name == "enabled" else name
                raise InvalidRequestError(f"{shown} must be True or False, got {value!r}")


@dataclass
class WorkerProtocol:
    """Per-worker protocol state: step counter, the current step's ids, redundancy clock."""

    index: int
    options: ProtocolOptions
    step: int = 0
    since_check: int = 0
    checks: int = 0
    finished_steps: int = 0

    def next_step_prefix(self) -> str:
        """Forced text that opens the worker's next step (header, maybe the question)."""
        if not self.options.enabled:
            return ""
        self.step += 1
        text = step_header(self.index, self.step)
        every = self.options.redundancy_every
        if every is not None and self.since_check >= every:
            self.since_check = 0
            self.checks += 1
            text += REDUNDANCY_QUESTION
        return text
