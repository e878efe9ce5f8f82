"""Incremental detokenization agrees with decoding everything, multi-byte characters included;
the fast decode it runs on equals the tokenizer's own."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hogwild_ray.core.detokenize import IncrementalText
from hogwild_ray.model.fast_decode import ids_decoder
from hogwild_ray.model.shapes import FoldedTokenizer

TEXTS = [
    "Let me compute 12 * 7.\n\nFirst, 12 * 7 = 84. So the answer is \\boxed{84}.",
    "Größe: 5 µm, 世界 🙂🙂 naïve café\n\n```python\nprint('x')\n```\n\nDone.",
    "  leading spaces,\ttabs and\n\n\nnewlines  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer_dir, text):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc, seen, decode = IncrementalText(), [], ids_decoder(tok)
    for i in ids:
        seen.append(i)
        full = tok.decode(seen)
        got = inc.update(decode, seen)
        if not full.endswith("\ufffd"):  # inside a multi-byte character the text waits for the rest
            assert got == full
        else:
            assert full.startswith(got)
    assert inc.update(decode, seen) == tok.decode(ids)


def test_chunks_of_several_tokens(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    inc = IncrementalText()
    for end in range(3, len(ids) + 3, 3):
        inc.update(tok.decode, ids[:end])
    assert inc.text == tok.decode(ids)


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir):
    """The built-in tokenizer (byte-level BPE), as models load it and folded for random shapes."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok, FoldedTokenizer(tok)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60_000), max_size=12))
def test_the_fast_decode_equals_the_tokenizers(tokenizers, ids):
    """Any ids, special tokens and (folded) ids past the vocab included."""
    tok, folded = tokenizers
    assert ids_decoder(tok) is not tok.decode  # the backend's own decode serves
    assert ids_decoder(folded)(ids) == folded.decode(ids)
    ids = [i % len(tok) for i in ids]
    assert ids_decoder(tok)(ids) == tok.decode(ids)


def wordpiece(**kwargs) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", ",", ".", "!", "##s", "it"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **kwargs)


def test_tokenizers_that_decode_otherwise_keep_their_own_decode():
    """A clean-up of spaces after the backend (a WordPiece tokenizer's), or a class with its own
    decoding, keeps transformers' decode."""
    cleaned = wordpiece(clean_up_tokenization_spaces=True)
    ids = [1, 3, 2, 6, 4, 7, 5]
    assert ids_decoder(cleaned) == cleaned.decode and ids_decoder(cleaned)(ids) == "hello, worlds. it!"
    plain = wordpiece(clean_up_tokenization_spaces=False)
    assert ids_decoder(plain)(ids) == plain.decode(ids) == "hello , worlds . it !"

    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    loud = Shouting(tokenizer_object=plain.backend_tokenizer, unk_token="[UNK]", clean_up_tokenization_spaces=False)
    assert ids_decoder(loud)(ids) == loud.decode(ids) == "HELLO , WORLDS . IT !"
