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
from typing import Any

AUTH_SETTINGS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def starts_own_ray(address: str | None) -> bool:
    """True when ray.init(address) would start a new local instance (no cluster named or found)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address) is None
    except Exception:  # an address Ray cannot parse: ray.init says why
        return False


def init_ray(address: str | None, **options: Any) -> None:
    """ray.init(address, **options), a new local instance with a token of its own (see above)."""
    import ray

    if (starts_own_ray(address) and os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
            and not any(os.environ.get(name) for name in AUTH_SETTINGS)):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray.init(address=address, **options)  # a new instance turns token mode on (and reads the token) itself
