"""The built-in model's config and tokenizer kept as Hugging Face files after the first read
(hogwild_ray.model.gguf_cache): the copies equal what the GGUF file gives, a complete entry is
used without parsing the file, and a damaged, unwritable or switched-off cache never fails a load
or leaves a partial entry."""

from __future__ import annotations

import pytest

from hogwild_ray.model import gguf_cache
from hogwild_ray.model.loader import default_checkpoint, load_config, load_tokenizer

TEXTS = ["What is 17 * 23?", "<|im_start|>user\nhi<|im_end|>", "  spaces\tand\nlines  ", "ünïcödé ∑ 😀", ""]


def test_the_cached_config_and_tokenizer_equal_the_files_and_skip_the_parse(tmp_path, monkeypatch, builtin_model):
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    ckpt = default_checkpoint()
    config, tok = load_config(ckpt), load_tokenizer(ckpt)  # parsed from the GGUF file, then saved
    entries = sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache" / "gguf").iterdir())
    assert entries == ["config", "tokenizer"]

    def no_parse():
        raise AssertionError("the GGUF file was parsed again")

    gguf = ckpt.directory / ckpt.gguf_file
    from transformers import AutoConfig, AutoTokenizer

    again = gguf_cache.cached(gguf, "config", no_parse, AutoConfig.from_pretrained)
    tok2 = gguf_cache.cached(gguf, "tokenizer", no_parse, AutoTokenizer.from_pretrained)
    assert {**again.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}
    assert load_config(ckpt).to_dict() == config.to_dict()  # the loader's path takes the entry too
    for text in TEXTS:
        assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert tok2.encode(text) == tok.encode(text)
    assert tok2.chat_template == tok.chat_template and len(tok2) == len(tok)
    assert (tok2.eos_token_id, tok2.bos_token_id, tok2.all_special_tokens) == (
        tok.eos_token_id, tok.bos_token_id, tok.all_special_tokens)
    assert not list((tmp_path / "cache" / "gguf").glob(".partial-*"))


class Saved:
    """Something with save_pretrained, as transformers' configs and tokenizers have."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, where: str) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        (gguf_cache.Path(where) / "value.txt").write_text("saved")


def reload(where):
    text = (where / "value.txt").read_text()
    if text != "saved":
        raise ValueError("damaged")
    return text


def test_a_damaged_full_unwritable_or_disabled_cache_never_fails_a_load(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    first = gguf_cache.cached(gguf, "config", Saved, reload)
    assert isinstance(first, Saved)  # parsed, and saved for next time
    assert gguf_cache.cached(gguf, "config", lambda: pytest.fail("parsed again"), reload) == "saved"
    where = gguf_cache.entry(gguf, "config")
    (where / "value.txt").write_text("garbage")  # damaged: parsed again and replaced
    assert isinstance(gguf_cache.cached(gguf, "config", Saved, reload), Saved)
    assert (where / "value.txt").read_text() == "saved"
    gguf.write_bytes(b"GGUF, changed")  # another size: another entry
    assert gguf_cache.entry(gguf, "config") != where
    assert isinstance(gguf_cache.cached(gguf, "tokenizer", lambda: Saved(fail=True), reload), Saved)  # disk full
    assert gguf_cache.entry(gguf, "tokenizer") is not None and not gguf_cache.entry(gguf, "tokenizer").exists()
    assert not list((tmp_path / "cache" / "gguf").glob(".partial-*"))  # no half-written entry
    (tmp_path / "blocked").write_text("a file where the cache directory would go")
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "blocked"))
    assert isinstance(gguf_cache.cached(gguf, "config", Saved, reload), Saved)
    monkeypatch.setenv("HOGWILD_CACHE", "none")
    assert gguf_cache.entry(gguf, "config") is None
    assert isinstance(gguf_cache.cached(gguf, "config", Saved, reload), Saved)
