"""Incremental detokenization agrees with decoding everything, multi-byte characters included."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hogwild_ray.core.detokenize import IncrementalText

TEXTS = [
    "Let me compute 12 * 7.\n\nFirst, 12 * 7 = 84. So the answer is \\boxed{84}.",
    "Größe: 5 µm, 世界 🙂🙂 naïve café\n\n```python\nprint('x')\n```\n\nDone.",
    "  leading spaces,\ttabs and\n\n\nnewlines  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer_dir, text):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc, seen = IncrementalText(), []
    for i in ids:
        seen.append(i)
        full = tok.decode(seen)
        got = inc.update(tok, seen)
        if not full.endswith("\ufffd"):  # inside a multi-byte character the text waits for the rest
            assert got == full
        else:
            assert full.startswith(got)
    assert inc.update(tok, seen) == tok.decode(ids)


def test_chunks_of_several_tokens(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    inc = IncrementalText()
    for end in range(3, len(ids) + 3, 3):
        inc.update(tok, ids[:end])
    assert inc.text == tok.decode(ids)
