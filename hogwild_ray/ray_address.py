"""Whether a Ray cluster answers at an address, within seconds.

`ray.init(address=...)` naming a dead head keeps retrying for minutes; a plain TCP connect to
the address tells in seconds and lets the error say what to check. Pure: sockets only.
"""

from __future__ import annotations

import socket

from .errors import InvalidRequestError

GCS_PORT = 6379  # `ray start --head` default
CLIENT_PORT = 10001  # Ray Client (ray://) default
NOT_NETWORK = (None, "", "auto", "local")  # Ray finds or starts these itself


def host_port(address: str) -> tuple[str, int]:
    """`ray://host[:port]`, `host[:port]` or `[v6]:port` -> (host, port), Ray's default ports filled in."""
    rest, default = address, GCS_PORT
    if "://" in address:
        scheme, rest = address.split("://", 1)
        if scheme != "ray":
            raise InvalidRequestError(f"--address {address}: a Ray cluster address is host:port (the head's GCS, "
                                      f"default port {GCS_PORT}) or ray://host:port (Ray Client, default "
                                      f"{CLIENT_PORT}); {scheme}:// addresses are not Ray's")
        default = CLIENT_PORT
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if not host or (port and not port.isdigit()):
        raise InvalidRequestError(f"--address {address} is not host:port or ray://host:port")
    return host, int(port) if port else default


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise a clear error when nothing listens at a named cluster address (None/auto/local pass)."""
    if address in NOT_NETWORK:
        return
    host, port = host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        reason = f"no answer within {timeout_s:g} s" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise InvalidRequestError(
            f"no Ray cluster answers at {address} ({host}:{port}: {reason.lower()}); check the "
            "address and that the head runs (`ray status` on it), or start one with `ray start --head`"
        ) from e
