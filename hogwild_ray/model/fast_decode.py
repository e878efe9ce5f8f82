"""A tokenizer's `decode` of a list of ids, without transformers' per-call wrapper where that
gives the same text.

The protocol decodes a short window of every worker's newest tokens on every pass (see
core/detokenize.py): 256 calls a pass at 32 sessions x 4 workers. For a Hugging Face fast
tokenizer, `decode` converts its argument, checks for a batch, reads its options and then
calls the Rust tokenizer; on such windows the wrapper is about two thirds of the call's
time. Where the tokenizer's class decodes exactly as the backend does (it does not override
`decode` or `_decode`, and no clean-up of spaces follows), the backend's own decode is used.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def ids_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """A function equal to `tokenizer.decode(ids)` for a list of int ids."""
    fold = getattr(tokenizer, "fold", None)  # a random shape's tokenizer folds its ids into range first
    backend = _backend_decode(tokenizer.tokenizer if fold is not None else tokenizer)
    if backend is None:
        return tokenizer.decode
    if fold is not None:
        return lambda ids: backend(fold(ids))
    return backend


def _backend_decode(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """The Rust tokenizer's decode, where it is all that `tokenizer.decode(ids)` does; else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers: keep its decode
        return None
    cls = type(tokenizer)
    if (not isinstance(tokenizer, TokenizersBackend) or cls.decode is not PreTrainedTokenizerBase.decode
            or cls._decode is not TokenizersBackend._decode):
        return None
    if tokenizer.clean_up_tokenization_spaces:
        bpe = type(tokenizer.backend_tokenizer.model).__name__ == "BPE"
        forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        if not bpe or forced:  # the clean-up applies: transformers' decode does it
            return None
    return functools.partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=False)
