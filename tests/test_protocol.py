"""The collaboration protocol: step boundaries, fences, answers, names, prompts, headers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.core.protocol import (
    NAMES, REDUNDANCY_QUESTION, ProtocolOptions, WorkerProtocol, extract_boxed, imitated_header,
    is_step_boundary, open_fence, step_header, system_prompt, think_prefix, worker_name,
)

HDR = step_header(1, 4)


# ---- step boundaries --------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "The sum is 12.\n\n",
    "The sum is 12.\n \n",
    "The sum is 12.\n\t\n",
    "The sum is 12. \n  \n  ",
    "The sum is 12.\n\n\n",
    "a\n\n",
])
def test_paragraph_break_after_text_is_a_boundary(text):
    assert is_step_boundary(text)
    assert is_step_boundary(HDR + text, HDR)


@pytest.mark.parametrize("text", [
    "The sum is 12.",
    "The sum is 12.\n",
    "The sum is 12.\n \n x",
    "The sum is 12.\n\nNext",
    "one\ntwo\n",
    "",
])
def test_no_paragraph_break_is_no_boundary(text):
    assert not is_step_boundary(text)
    assert not is_step_boundary(HDR + text, HDR)


@pytest.mark.parametrize("tail", ["\n\n", "\n \n", " \n\n"])
def test_header_only_step_is_no_boundary(tail):
    assert not is_step_boundary(HDR + tail, HDR)
    q = HDR + REDUNDANCY_QUESTION
    assert not is_step_boundary(q + tail, q)
    assert is_step_boundary(q + "no" + tail, q)
    assert not is_step_boundary(tail)
    assert not is_step_boundary(" " + tail)


@pytest.mark.parametrize("text", [
    "Here is code:\n```python\nx = 1\n\n",
    "```\nprint(1)\n```\nMore:\n```\n\n",
    "Then\n$$\nx = 1\n\n",
    "Then \\[\n x = 1\n\n",
    "Then $$a$$ and $$\n b\n\n",
    "Then \\[ a \\] and \\[ b\n\n",
])
def test_no_boundary_inside_an_open_fence(text):
    assert open_fence(text.rstrip())
    assert not is_step_boundary(text)
    assert not is_step_boundary(HDR + text, HDR)


@pytest.mark.parametrize("text", [
    "Here is code:\n```python\nx = 1\n```\n\n",
    "Then\n$$\nx = 1\n$$\n\n",
    "Then \\[\n x = 1\n\\]\n\n",
    "Costs \\$5 and \\$6.\n\n",
    "Costs \\$$5.\n\n",
    "```\na\n```\n$$b$$\n\\[c\\] done.\n\n",
    # a fence's contents are literal: math openers inside code do not open anything
    "Shell:\n```bash\necho $$\n```\n\n",
    "Regex:\n```python\nre.compile(r'\\[')\n```\n\n",
    # and a code fence written inside display math is not code
    "$$\n\\text{```}\n```\n$$\n\n",
])
def test_closed_fences_then_a_break_is_a_boundary(text):
    assert not open_fence(text)
    assert is_step_boundary(text)
    assert is_step_boundary(HDR + text, HDR)


# ---- a step header the worker writes itself ends its step ------------------------------

@pytest.mark.parametrize("body, at", [
    ("So 2 + 3 = 5.\n**Bob [13]:**", 14),  # one line break, no blank line
    ("So 2 + 3 = 5. **Alice [3]:**", 14),  # no line break at all
    ("**Bob [4]:**", 0),  # right after the forced header
    ("Done.\n**Carol [2]**:", 6),  # the colon outside the bold
    ("Next: **Worker17 [1]:**", 6),  # past the sixteen names
    ("Ok\n** Bob [ 7 ] : **", 3),
    ("```\ncode\n```\n**Dave [2]:**", 13),  # after a closed fence
    ("Text **Bob** and then **Erin [9]:**", 22),  # the first header-like one
])
def test_imitated_header_is_found(body, at):
    assert imitated_header(body) == at
    assert is_step_boundary(HDR + body, HDR)
    assert is_step_boundary(HDR + REDUNDANCY_QUESTION + "no. " + body, HDR + REDUNDANCY_QUESTION)


@pytest.mark.parametrize("body", [
    "So 2 + 3 = 5.\n**Bob [13]:",  # not complete yet: the closing `**` is still to come
    "So 2 + 3 = 5.\n**Bob [13]",
    "As **Bob** said, 2 + 3 = 5.",  # a name in bold is not a header
    "As **Bob [13]** said",  # no colon
    "**Bob:** hello",  # no [n]
    "**Bob [x]:**",  # no number
    "**Bobby [2]:**",  # not a worker's name
    "**Step [2]:**",
    "Code:\n```\n**Bob [2]:**\n",  # inside a code fence
    "Then $$\n**Bob [2]:**",  # inside display math
])
def test_text_that_is_no_header(body):
    assert imitated_header(body) is None
    assert not is_step_boundary(HDR + body, HDR)


def test_the_forced_header_is_not_an_imitation():
    for w, k in [(0, 1), (1, 13), (20, 2)]:
        header = step_header(w, k)
        assert not is_step_boundary(header, header)
        assert not is_step_boundary(header + "Some text", header)
        assert is_step_boundary(header + "Some text **Alice [5]:**", header)
    # a header that decoded to slightly other text is still the step's own, not an imitation
    assert not is_step_boundary("**Bob [2]:**  Some text", "**Bob [2]:** \u200b")
    assert is_step_boundary("**Bob [2]:**  Some text\n**Bob [3]:**", "**Bob [2]:** \u200b")
    # without a header argument the whole text is what the worker wrote
    assert is_step_boundary("**Bob [2]:** Some text")


def test_open_fence_states():
    assert not open_fence("")
    assert not open_fence("plain text with $x$ inline")
    assert open_fence("```")
    assert not open_fence("``````")
    assert open_fence("$$")
    assert not open_fence("$$ $$")
    assert open_fence("\\[")
    assert not open_fence("\\[ \\]")
    assert not open_fence("\\]")
    assert open_fence("```\n\\]\n")  # a bracket in code closes nothing
    assert open_fence("$$ ``` $$ $$")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["```", "$$", "\\[", "\\]", "x", " ", "\n"]), max_size=12))
def test_open_fence_matches_a_scan(parts):
    """A left-to-right scan: an opener starts a fence, only its own closer ends it."""
    text = "".join(parts)
    closers = {"```": "```", "$$": "$$", "\\[": "\\]"}
    i, close = 0, None
    while i < len(text):
        if close is None:
            opener = next((o for o in closers if text.startswith(o, i)), None)
            if opener:
                close, i = closers[opener], i + len(opener)
                continue
        elif text.startswith(close, i):
            i, close = i + len(close), None
            continue
        i += 1
    assert open_fence(text) == (close is not None)
    assert is_step_boundary("Text " + text + "\n\n") == (close is None)


# ---- answers ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("so \\boxed{ \\frac{1}{\\sqrt{2}} } done", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{  7 \n}", "7"),
    ("\\boxed{1} and then \\boxed{2", "1"),
    ("\\boxed{1} and then \\boxed{\\frac{2}{3}", "1"),
    ("\\boxed{3} and \\boxed{}", "3"),
    ("\\boxed{3} and \\boxed{  }", "3"),
    ("\\boxed{x \\in \\{1, 2\\}}", "x \\in \\{1, 2\\}"),
    ("\\boxed{\\{}", "\\{"),
    ("\\boxed{a \\\\ b}", "a \\\\ b"),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


@pytest.mark.parametrize("text", [
    "", "no answer here", "\\boxed{", "\\boxed{12", "\\boxed{\\frac{1}{2}", "boxed{3}",
    "\\boxed 3", "\\boxed{}", "write the result inside \\boxed{}.",
])
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


# ---- names, prompts ---------------------------------------------------------------------

def test_worker_names():
    assert [worker_name(i) for i in range(16)] == list(NAMES)
    assert worker_name(16) == "Worker17"
    assert worker_name(99) == "Worker100"
    names = [worker_name(i) for i in range(40)]
    assert len(set(names)) == 40
    assert step_header(0, 1) == "**Alice [1]:** "
    assert step_header(20, 3) == "**Worker21 [3]:** "


@pytest.mark.parametrize("n", [2, 3, 5, 16, 17, 20])
def test_system_prompt_names_every_worker(n):
    text = system_prompt(n)
    for i in range(n):
        assert worker_name(i) in text
    assert worker_name(n) not in text
    assert str(n) in text and "\\boxed{}" in text


def test_system_prompt_single_worker():
    text = system_prompt(1)
    assert "\\boxed{}" in text and "Bob" not in text and system_prompt(2) != text


QWEN3_LIKE = ("{% for m in messages %}{% if '<think>' in m.content %}...{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template, rendered, want", [
    (QWEN3_LIKE, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<think>\n"),
    (QWEN3_LIKE, "<|im_start|>assistant\n<think>\n", ""),
    (QWEN3_LIKE, "<|im_start|>assistant\n<think>", ""),
    (QWEN3_LIKE, "<|im_start|>assistant\n<think>\n\n</think>\n\n", ""),
    ("{{ messages }}<|assistant|>", "<|assistant|>", ""),
    (None, "<|assistant|>", ""),
    ("", "<|assistant|>", ""),
])
def test_think_prefix(template, rendered, want):
    assert think_prefix(template, rendered) == want


# ---- the per-worker protocol ------------------------------------------------------------

def test_headers_are_numbered():
    p = WorkerProtocol(2, ProtocolOptions(redundancy_every=None))
    assert [p.next_step_prefix() for _ in range(3)] == [
        "**Carol [1]:** ", "**Carol [2]:** ", "**Carol [3]:** "]
    assert p.step == 3 and p.checks == 0


def test_redundancy_question_every_so_many_tokens():
    p = WorkerProtocol(0, ProtocolOptions(redundancy_every=10))
    assert p.next_step_prefix() == "**Alice [1]:** "
    p.since_check = 9
    assert p.next_step_prefix() == "**Alice [2]:** "
    assert p.since_check == 9 and p.checks == 0
    p.since_check = 10
    assert p.next_step_prefix() == "**Alice [3]:** " + REDUNDANCY_QUESTION
    assert p.since_check == 0 and p.checks == 1
    assert p.next_step_prefix() == "**Alice [4]:** "  # the clock was reset
    p.since_check = 25
    assert p.next_step_prefix().endswith(REDUNDANCY_QUESTION)
    assert p.since_check == 0 and p.checks == 2 and p.step == 5


def test_redundancy_off_never_asks():
    p = WorkerProtocol(1, ProtocolOptions(redundancy_every=None))
    for _ in range(5):
        p.since_check += 10_000
        assert REDUNDANCY_QUESTION not in p.next_step_prefix()
    assert p.checks == 0


def test_protocol_disabled_gives_no_prefix():
    p = WorkerProtocol(0, ProtocolOptions(enabled=False, redundancy_every=1))
    p.since_check = 100
    assert p.next_step_prefix() == ""
    assert p.checks == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"redundancy_every": 0}, "redundancy_every"),
    ({"redundancy_every": -5}, "redundancy_every"),
    ({"redundancy_every": 2.5}, "redundancy_every"),
    ({"redundancy_every": "10"}, "redundancy_every"),
    ({"redundancy_every": True}, "redundancy_every"),
    ({"finisher_tokens": 0}, "finisher_tokens"),
    ({"finisher_tokens": None}, "finisher_tokens"),
    ({"finisher_tokens": 1.0}, "finisher_tokens"),
    ({"finisher_tokens": True}, "finisher_tokens"),
])
def test_protocol_options_validation(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        ProtocolOptions(**kwargs)


def test_protocol_options_defaults_and_valid_values():
    o = ProtocolOptions()
    assert o.enabled and o.redundancy_every == 128 and o.finisher_tokens >= 1
    assert ProtocolOptions(redundancy_every=None, finisher_tokens=1).redundancy_every is None
    assert ProtocolOptions(redundancy_every=1).redundancy_every == 1
