"""Connecting to Ray, or starting a Ray of our own, without leaving a token file behind.

A `ray.init()` that starts a new local instance turns Ray's token authentication on and, when
no token is set, writes a new one to ~/.ray/auth_token (readable by every user of the machine,
and left there after the instance is gone). A Ray the engine starts for itself is its own: it
gets a fresh random token in this process's environment instead, which Ray's processes inherit
and nobody else can read, and which ends with them. Settings the user made are kept: a token
in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, RAY_AUTH_MODE=disabled, a cluster to connect to.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from ..errors import HogwildError

AUTH_SETTINGS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def starts_own_ray(address: str | None) -> bool:
    """True when ray.init(address) would start a new local instance (no cluster named or found)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address) is None
    except Exception:  # an address Ray cannot parse: ray.init says why
        return False


class ClusterConnectionError(HogwildError, ConnectionError):
    """A cluster that answers but would not let this process in (most often a token it lacks)."""


def init_ray(address: str | None, **options: Any) -> None:
    """ray.init(address, **options), a new local instance with a token of its own (see above)."""
    import ray

    own = starts_own_ray(address)
    if (own and os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
            and not any(os.environ.get(name) for name in AUTH_SETTINGS)):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        ray.init(address=address, **options)  # a new instance turns token mode on (and reads the token) itself
    except ConnectionError as e:
        if own or not str(e).startswith("Failed to connect to Ray cluster"):
            raise
        raise ClusterConnectionError(f"{e}: {token_hint()}") from None


def token_hint() -> str:
    """What to check when a cluster that answers refuses this process (Ray's token authentication)."""
    if any(os.environ.get(name) for name in AUTH_SETTINGS):
        return ("the token this process has (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) is likely not the cluster's; "
                "use the head's (its ~/.ray/auth_token)")
    if Path("~/.ray/auth_token").expanduser().is_file():
        return ("the token in ~/.ray/auth_token is likely not the cluster's; set RAY_AUTH_TOKEN to the head's "
                "(its ~/.ray/auth_token)")
    return ("if the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "to its token (the head's ~/.ray/auth_token)")
