"""The token ids of text: a session's prompt, and text from outside (a problem, an injection).

Special-token strings in text from outside are encoded as text, so that no problem or
injection can open a chat turn or end the text; a chat template's own control tokens stay
special. Also the checks such text must pass before it is encoded.
"""

from __future__ import annotations

import re
import threading
import uuid
from typing import Callable

from .core.protocol import HISTORY_HEADER, ProtocolOptions, system_prompt, think_prefix
from .errors import ContextLengthError, InvalidRequestError

_TOKENIZER = threading.Lock()  # fast tokenizers keep split_special_tokens as state: one encode at a time


def _encode(tok, text: str, *, as_text: bool, add_special_tokens: bool = False) -> list[int]:
    """`tok(text)`'s ids; as_text: special-token strings in `text` are encoded as text."""
    with _TOKENIZER:
        return list(tok(text, add_special_tokens=add_special_tokens, split_special_tokens=as_text)["input_ids"])


def special_pattern(tok) -> re.Pattern | None:
    """A regex matching the text of the tokenizer's special tokens (`<|im_start|>`, `<|endoftext|>`,
    ...), longest first as the tokenizer matches them; None when it has none."""
    added = getattr(tok, "added_tokens_decoder", None) or {}
    strings = {t.content for t in added.values() if getattr(t, "special", False)}
    strings |= set(getattr(tok, "all_special_tokens", None) or ())
    strings = sorted((s for s in strings if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def encode_text(tok, text: str, add_special_tokens: bool = False) -> list[int]:
    """The ids of text from outside (a problem, an injection) or of forced text. Special-token
    strings in it are encoded as text, so that no text can open a chat turn or end the text;
    text without them gets the ids the tokenizer always gave it."""
    if not text and not add_special_tokens:
        return []
    return _encode(tok, text, as_text=True, add_special_tokens=add_special_tokens)


def chat_ids(tok, render: Callable[[str], str], user: str) -> list[int]:
    """The ids of `render(user)`, a prompt rendered by a chat template around user text: the
    template's control tokens are special tokens, while special-token strings in `user` are text.

    User text without such strings is encoded with the rest, as the tokenizer always did. Else
    they are hidden behind markers while the template renders (so it treats the text as it
    would, e.g. trims it); the rendered text is split at the template's own control tokens and
    the text between them, the user's strings restored, is encoded as text."""
    specials = special_pattern(tok)
    if specials is None or not specials.search(user):
        return _encode(tok, render(user), as_text=False)
    nonce = uuid.uuid4().hex
    hidden: dict[str, str] = {}

    def hide(m: re.Match) -> str:  # letters and digits only: templates that escape or trim keep them as they are
        key = f"hw{nonce}x{len(hidden)}x"
        hidden[key] = m.group(0)
        return key

    rendered = render(specials.sub(hide, user))
    if any(rendered.count(key) != 1 for key in hidden):
        raise InvalidRequestError("the problem holds special-token text (such as <|im_start|>) and the model's chat "
                                  "template does not write the problem exactly once, so that text cannot be kept "
                                  "apart from the template's; remove it from the problem, or pass chat_template=False")
    markers = re.compile("|".join(map(re.escape, hidden)))

    def as_text(piece: str) -> list[int]:
        return encode_text(tok, markers.sub(lambda m: hidden[m.group(0)], piece))

    ids, pos = [], 0
    for m in specials.finditer(rendered):  # only the template's: the user's are hidden
        ids += as_text(rendered[pos:m.start()]) + _encode(tok, m.group(0), as_text=False)
        pos = m.end()
    return ids + as_text(rendered[pos:])


def prompt_ids(tok, problem: str, workers: int, o: ProtocolOptions) -> list[int]:
    """The token ids of a session's prompt (the system prompt, the problem, the history header).
    Special-token strings in the problem are text (see `encode_text`, `chat_ids`)."""
    if not o.enabled and not o.chat_template:
        return encode_text(tok, problem, add_special_tokens=True)
    template = getattr(tok, "chat_template", None)
    system = system_prompt(workers)
    if o.chat_template and template:
        def render(content: str) -> str:
            msgs = [{"role": "user", "content": content}]
            if o.enabled:
                msgs.insert(0, {"role": "system", "content": system})
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return text + think_prefix(template, text) + (HISTORY_HEADER if o.enabled else "")

        return chat_ids(tok, render, problem)
    text = (system + "\n\n" if o.enabled else "") + f"Problem: {problem}\n\nSolution:\n\n"
    if o.enabled:
        text += HISTORY_HEADER
    return encode_text(tok, text)


def check_unicode(name: str, text: str) -> None:
    """Text a tokenizer can take: no lone surrogate (what a bad decode with surrogateescape leaves)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{name} is not valid Unicode text: {text[e.start:e.end]!a} at character "
                                  f"{e.start} is a lone surrogate; decode its bytes as UTF-8 "
                                  "(errors='replace')") from None


def check_prompt(tokens: int, max_context: int) -> None:
    if tokens >= max_context:
        raise ContextLengthError(f"the prompt is {tokens} tokens (the problem and the collaboration prompt, "
                                 f"which grows with the workers), the context holds {max_context}; shorten the "
                                 "problem, use fewer workers, or load the model with a larger max_context")
