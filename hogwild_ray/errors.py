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
