"""Tests needing the built-in model skip only where the machine says it lacks it."""

from __future__ import annotations

import pytest

from conftest import default_checkpoint_or_skip


def _missing():
    from hogwild_ray.errors import ModelNotFoundError

    raise ModelNotFoundError("not installed")


def test_a_machine_given_only_a_tokenizer_skips_and_any_other_fails(monkeypatch, tmp_path):
    import hogwild_ray.model.loader as loader

    monkeypatch.setattr(loader, "default_checkpoint", _missing)
    monkeypatch.setenv("HOGWILD_TEST_TOKENIZER", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="HOGWILD_TEST_TOKENIZER is set"):
        default_checkpoint_or_skip()
    monkeypatch.delenv("HOGWILD_TEST_TOKENIZER")
    from hogwild_ray.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        default_checkpoint_or_skip()
