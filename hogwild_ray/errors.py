"""Errors a user can act on: each message names the problem and the fix."""


class HogwildError(Exception):
    """Base class of every error hogwild-ray raises on purpose."""


class ModelNotFoundError(HogwildError, FileNotFoundError):
    """The model path does not exist or holds no loadable model."""


class UnsupportedModelError(HogwildError, ValueError):
    """The model's architecture or options cannot be served exactly."""


class InvalidRequestError(HogwildError, ValueError):
    """An engine, session or sampling argument is out of range."""


class CacheFullError(HogwildError, RuntimeError):
    """The paged K/V pool has no free page for the request."""


class ContextLengthError(HogwildError, ValueError):
    """A prompt or view is longer than the model's context."""


def check_int(name: str, value: object, lo: int, hi: int | None = None, *, none: str | None = None,
              hint: str = "", hi_text: str | None = None) -> None:
    """An integer (not a bool) with lo <= value (< hi), else InvalidRequestError naming the rule.

    none: None is allowed too, and this says what it means ("" for nothing to say);
    hint: what a value means, after the rule ("0 turns it off"); hi_text: the bound as written."""
    if value is None and none is not None:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value < hi):
        return
    rule = f">= {lo}" if hi is None else f"in [{lo}, {hi_text or hi})"
    extra = f" ({hint})" if hint else ""
    alt = "" if none is None else f" or None{f' ({none})' if none else ''}"
    raise InvalidRequestError(f"{name} must be an integer {rule}{extra}{alt}, got {value!r}")
